import { parseDuration } from '../config/units.ts';
import { NotFoundError, StateError } from '../errors.ts';
import type { FieldValues } from '../store/credentials.ts';
import { sealVersion } from '../store/credentials.ts';
import type { Keyring } from '../store/keyring.ts';
import type { CredentialRecord, CredentialVersionRecord, HistoryEntry } from '../store/records.ts';
import { repeatedState } from '../store/records.ts';

/**
 * Credential version transitions, as pure functions from one record to the next. Each returns a new
 * record (revision + 1, a history entry) or throws a StateError or NotFoundError saying why the move is not allowed.
 * Invariant after every transition: at most one pending, one current, one previous.
 *
 *   pending --promote--> current --promote(grace)--> previous --grace ends--> retired
 *      ^                    |  ^                         |
 *      +----rollback--------+  +--------rollback---------+
 *   any live state --revoke--> revoked     (retired and revoked versions keep no ciphertext)
 */

export interface Actor {
  readonly actor: string;
  readonly now: Date;
}

const HISTORY_LIMIT = 100;

function next(record: CredentialRecord, versions: CredentialVersionRecord[], by: Actor, entry: Omit<HistoryEntry, 'at' | 'actor'>): CredentialRecord {
  const history = [...(record.history ?? []), { at: by.now.toISOString(), actor: by.actor, ...entry }].slice(-HISTORY_LIMIT);
  const out = { ...record, revision: record.revision + 1, updated_at: by.now.toISOString(), versions, history };
  assertInvariant(out);
  return out;
}

export function assertInvariant(record: CredentialRecord): void {
  const state = repeatedState(record.versions);
  if (state) throw new Error(`credential "${record.id}" would have more than one ${state} version`);
}

/** Destroy a version's ciphertext, keeping its metadata. */
function destroyed(v: CredentialVersionRecord, state: 'retired' | 'revoked', now: Date): CredentialVersionRecord {
  const { dek: _dek, data: _data, grace_until: _grace, ...meta } = v;
  return { ...meta, state, ...(state === 'retired' ? { retired_at: now.toISOString() } : { revoked_at: now.toISOString() }) };
}

function find(record: CredentialRecord, state: CredentialVersionRecord['state']): CredentialVersionRecord | undefined {
  return record.versions.find((v) => v.state === state);
}

/** A new version from new field values: pending with `stage`, otherwise promoted in the same transition. */
export function rotate(record: CredentialRecord, keyring: Keyring, fields: FieldValues, options: { stage: boolean; graceMs: number }, by: Actor): CredentialRecord {
  if (find(record, 'pending')) throw new StateError(`credential "${record.id}" already has a pending version ${find(record, 'pending')!.version}; promote or revoke it first`);
  const version = Math.max(0, ...record.versions.map((v) => v.version)) + 1;
  const pending = sealVersion(keyring, record.id, version, 'pending', fields, by.now);
  const versions = [...record.versions, pending];
  if (options.stage) return next(record, versions, by, { action: 'stage', version });
  return next(record, promoted(versions, pending, options.graceMs, by.now), by, { action: 'rotate', version, detail: graceDetail(options.graceMs, by.now) });
}

/**
 * pending -> current; current -> previous until now + grace (grace 0: retired at once, the cutover
 * for providers that cannot hold two keys); an older previous -> retired.
 */
export function promote(record: CredentialRecord, options: { graceMs: number }, by: Actor): CredentialRecord {
  const pending = find(record, 'pending');
  if (!pending) throw new StateError(`credential "${record.id}" has no pending version to promote; stage one with "keys rotate ${record.id} --stage"`);
  return next(record, promoted(record.versions, pending, options.graceMs, by.now), by, { action: 'promote', version: pending.version, detail: graceDetail(options.graceMs, by.now) });
}

function promoted(versions: readonly CredentialVersionRecord[], pending: CredentialVersionRecord, graceMs: number, now: Date): CredentialVersionRecord[] {
  const graceUntil = new Date(now.getTime() + graceMs).toISOString();
  return versions.map((v): CredentialVersionRecord => {
    if (v === pending) return { ...v, state: 'current', activated_at: now.toISOString() };
    if (v.state === 'current') return graceMs > 0 ? { ...v, state: 'previous', grace_until: graceUntil } : destroyed(v, 'retired', now);
    if (v.state === 'previous') return destroyed(v, 'retired', now);
    return v;
  });
}

function graceDetail(graceMs: number, now: Date): string {
  return graceMs > 0 ? `previous valid until ${new Date(now.getTime() + graceMs).toISOString()}` : 'cutover: previous retired at once';
}

/**
 * previous -> current, inside its grace window; the rolled-back current goes back to pending, so
 * it can be promoted again once fixed, or revoked.
 */
export function rollback(record: CredentialRecord, by: Actor): CredentialRecord {
  const previous = find(record, 'previous');
  if (!previous || !inGrace(previous, by.now)) throw new StateError(`credential "${record.id}" has no previous version inside its grace window to roll back to`);
  if (find(record, 'pending')) throw new StateError(`credential "${record.id}" has a pending version; promote or revoke it before rolling back`);
  const versions = record.versions.map((v): CredentialVersionRecord => {
    if (v === previous) {
      // It keeps the time it first went live: `keys due`, the credential_max_age alert and the age
      // metric measure how long a key has been in use, and a rollback does not make it younger.
      const { grace_until: _g, ...rest } = v;
      return { ...rest, state: 'current', activated_at: rest.activated_at ?? by.now.toISOString() };
    }
    if (v.state === 'current') {
      const { activated_at: _a, ...rest } = v;
      return { ...rest, state: 'pending' };
    }
    return v;
  });
  return next(record, versions, by, { action: 'rollback', version: previous.version });
}

/** Immediate, no grace: the compromise path. Without a version, the current one. */
export function revoke(record: CredentialRecord, version: number | undefined, by: Actor): CredentialRecord {
  const target = version === undefined ? find(record, 'current') : record.versions.find((v) => v.version === version);
  if (!target) throw new (version === undefined ? StateError : NotFoundError)(version === undefined ? `credential "${record.id}" has no current version` : `credential "${record.id}" has no version ${version}`);
  if (target.state === 'revoked') throw new StateError(`version ${target.version} of "${record.id}" is already revoked`);
  const versions = record.versions.map((v) => (v === target ? destroyed(v, 'revoked', by.now) : v));
  return next(record, versions, by, { action: 'revoke', version: target.version, detail: `was ${target.state}` });
}

/** Previous versions whose grace has ended become retired, their ciphertext destroyed. Undefined when nothing is due. */
export function expire(record: CredentialRecord, by: Actor): CredentialRecord | undefined {
  const due = record.versions.filter((v) => v.state === 'previous' && !inGrace(v, by.now));
  if (due.length === 0) return undefined;
  const versions = record.versions.map((v) => (due.includes(v) ? destroyed(v, 'retired', by.now) : v));
  return next(record, versions, by, { action: 'retire', version: due[0]!.version, detail: 'grace window ended' });
}

/**
 * The longest grace window, a year: a previous version (or caller token) kept longer is not rotated
 * in any useful sense, and a few thousand years on its end is no longer a date at all.
 */
export const MAX_GRACE_MS = 365 * 86_400_000;

/** A grace window as written ("0", "30m", "24h", "7d"): its length, or undefined if malformed or over MAX_GRACE_MS. */
export function parseGrace(text: string): number | undefined {
  const ms = parseDuration(text);
  return ms !== undefined && ms <= MAX_GRACE_MS ? ms : undefined;
}

export function inGrace(v: CredentialVersionRecord, now: Date): boolean {
  return v.state === 'previous' && v.grace_until !== undefined && Date.parse(v.grace_until) > now.getTime();
}

/** The earliest grace end among a record's previous versions, in epoch ms. */
export function nextExpiry(record: CredentialRecord): number | undefined {
  const ends = record.versions.filter((v) => v.state === 'previous' && v.grace_until).map((v) => Date.parse(v.grace_until!));
  return ends.length ? Math.min(...ends) : undefined;
}

/** Every version's DEK re-wrapped with the keyring's active KEK; the encrypted fields are untouched. */
export function rewrap(record: CredentialRecord, keyring: Keyring, unwrap: (v: CredentialVersionRecord) => Buffer, wrap: (dek: Buffer, v: CredentialVersionRecord) => CredentialVersionRecord, by: Actor): CredentialRecord | undefined {
  const stale = record.versions.filter((v) => v.dek && v.kek !== keyring.active);
  if (stale.length === 0) return undefined;
  const versions = record.versions.map((v) => {
    if (!stale.includes(v)) return v;
    const dek = unwrap(v);
    try {
      return wrap(dek, v);
    } finally {
      dek.fill(0);
    }
  });
  return next(record, versions, by, { action: 'rewrap', detail: `data keys wrapped by key-encryption key ${keyring.active}` });
}
