import { ConflictError, NotFoundError, StateError, UserError } from '../errors.ts';
import { ADMIN_TOKEN_PREFIX, generateToken, hashToken, newTokenId, tokenLive, TOKEN_PREFIX } from '../store/callers.ts';
import { newCredentialRecord, unwrapDek, wrapDek, type FieldValues } from '../store/credentials.ts';
import type { Keyring } from '../store/keyring.ts';
import type { AdminRecord, CallerRecord, CredentialRecord } from '../store/records.ts';
import type { StoreBackend } from '../store/types.ts';
import { checkCertificateFields } from '../store/tls-material.ts';
import * as t from './transitions.ts';

/**
 * Every change to credentials, callers and admin tokens, shared by the CLI and the admin API.
 * Each reads the record, applies one transition and writes it back compare-and-set: a concurrent
 * change makes it fail with ConflictError (exit 3 / HTTP 409), never overwrite.
 */
export interface Operator {
  readonly store: StoreBackend;
  /** Who is acting: recorded in the record's history and the audit log. */
  readonly actor: string;
  readonly now?: () => Date;
  /**
   * The routes in force (name, credential, the fields their templates read), when known: a version
   * is made current only if every route using the credential finds its fields in it.
   */
  readonly routes?: () => readonly RouteFields[];
}

export interface RouteFields {
  readonly name: string;
  readonly credential: string;
  readonly fields: readonly string[];
}

/**
 * A version missing a field a route sends would turn every request on that route into a 503 the
 * moment it became current (a typo in a rotation file is an outage, and the previous version in
 * grace is no help: resolution stops at the current one). Refuse the change instead; nothing moves.
 */
function checkRoutesServed(op: Operator, before: CredentialRecord, after: CredentialRecord): CredentialRecord {
  const current = after.versions.find((v) => v.state === 'current');
  // Only a version that becomes current here: staging leaves the current one as it was.
  if (!current || !op.routes || before.versions.some((v) => v.state === 'current' && v.version === current.version)) return after;
  const gaps = op.routes()
    .filter((r) => r.credential === after.id)
    .map((r) => ({ route: r.name, missing: r.fields.filter((f) => !current.fields.includes(f)) }))
    .filter((g) => g.missing.length > 0);
  if (gaps.length === 0) return after;
  const what = gaps.map((g) => `route "${g.route}" needs ${g.missing.map((f) => `"${f}"`).join(', ')}`).join('; ');
  throw new StateError(`version ${current.version} of "${after.id}" would become current without fields its routes send (${what}); nothing was changed`);
}

/**
 * Who acts, and when: on the store's clock when it has one (Redis TIME), the clock grace ends are
 * judged on (sweeper.ts). A writer whose own clock is an hour behind would otherwise write a
 * 30-minute grace that ended half an hour ago, and the previous version would be retired (its
 * ciphertext destroyed) at once; an hour ahead, the old key would stay usable an hour too long.
 */
async function by(op: Operator): Promise<t.Actor> {
  return { actor: op.actor, now: op.now?.() ?? (op.store.now ? new Date(await op.store.now()) : new Date()) };
}

async function credential(op: Operator, id: string): Promise<CredentialRecord> {
  const snapshot = await op.store.load();
  const record = snapshot.credentials.get(id);
  if (!record) throw snapshot.damaged.has(`credential:${id}`) ? new StateError(`credential "${id}" is damaged in the store`) : new NotFoundError(`no credential "${id}"`);
  return record;
}

async function save(op: Operator, before: CredentialRecord, after: CredentialRecord): Promise<CredentialRecord> {
  await op.store.put('credential', after, before.revision);
  return after;
}

export async function putCredential(op: Operator, keyring: Keyring, id: string, fields: FieldValues): Promise<CredentialRecord> {
  const snapshot = await op.store.load();
  if (snapshot.credentials.has(id) || snapshot.damaged.has(`credential:${id}`)) throw new StateError(`credential "${id}" already exists; a new version is a rotation ("keys rotate ${id}")`);
  const actor = await by(op);
  checkCertificateFields(fields, actor.now);
  const record = newCredentialRecord(keyring, id, fields, actor.now, op.actor);
  await op.store.put('credential', record, 0);
  return record;
}

export async function rotateCredential(op: Operator, keyring: Keyring, id: string, fields: FieldValues, options: { stage: boolean; graceMs: number }): Promise<CredentialRecord> {
  const before = await credential(op, id);
  const actor = await by(op);
  checkCertificateFields(fields, actor.now);
  return save(op, before, checkRoutesServed(op, before, t.rotate(before, keyring, fields, options, actor)));
}

export async function promoteCredential(op: Operator, id: string, graceMs: number): Promise<CredentialRecord> {
  const before = await credential(op, id);
  return save(op, before, checkRoutesServed(op, before, t.promote(before, { graceMs }, await by(op))));
}

export async function rollbackCredential(op: Operator, id: string): Promise<CredentialRecord> {
  const before = await credential(op, id);
  return save(op, before, checkRoutesServed(op, before, t.rollback(before, await by(op))));
}

export async function revokeCredential(op: Operator, id: string, version: number | undefined): Promise<CredentialRecord> {
  const before = await credential(op, id);
  return save(op, before, t.revoke(before, version, await by(op)));
}

/**
 * Retire every previous version whose grace has ended. Instances race to do it; compare-and-set
 * lets exactly one win each transition, and the losers simply see the result.
 */
export async function expireDue(op: Operator): Promise<string[]> {
  const retired: string[] = [];
  const actor = await by(op);
  for (const record of (await op.store.load()).credentials.values()) {
    const after = t.expire(record, actor);
    if (!after) continue;
    try {
      await op.store.put('credential', after, record.revision);
      retired.push(record.id);
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
    }
  }
  return retired;
}

/** How many times the re-wrap of one record is tried again after a concurrent change to it. */
const REWRAP_ATTEMPTS = 5;

/**
 * Re-wrap every data key with the active KEK; returns how many records changed. Safe to re-run
 * after a crash. A record changed by another writer between the read and the write (a promote, a
 * grace sweep on a running instance) is read again and re-wrapped as it is now: a re-wrap changes
 * no state, and stopping there left `master-key rotate` with exit 3 half-way, which run again
 * (without --resume) added yet another key.
 */
export async function rewrapAll(op: Operator, keyring: Keyring): Promise<number> {
  let changed = 0;
  const actor = await by(op);
  for (let record of (await op.store.load()).credentials.values()) {
    for (let attempt = 1; ; attempt++) {
      const current = record;
      const after = t.rewrap(current, keyring, (v) => unwrapDek(keyring, current.id, v), (dek, v) => wrapDek(keyring, current.id, v, dek), actor);
      if (!after) break;
      try {
        await op.store.put('credential', after, current.revision);
        changed++;
        break;
      } catch (err) {
        if (!(err instanceof ConflictError) || attempt === REWRAP_ATTEMPTS) throw err;
      }
      const again = (await op.store.load()).credentials.get(current.id);
      // Gone, or damaged, since: nothing of it to re-wrap (master-key remove refuses while a record is damaged).
      if (!again) break;
      record = again;
    }
  }
  return changed;
}

export type TokenKind = 'caller' | 'admin';

const PREFIX: Record<TokenKind, string> = { caller: TOKEN_PREFIX, admin: ADMIN_TOKEN_PREFIX };

async function named(op: Operator, kind: TokenKind, name: string): Promise<AdminRecord | undefined> {
  const snapshot = await op.store.load();
  return (kind === 'caller' ? snapshot.callers : snapshot.admins).get(name);
}

function entry(by: t.Actor, action: string, detail?: string) {
  return { at: by.now.toISOString(), actor: by.actor, action, ...(detail ? { detail } : {}) };
}

/** The hashes of tokens that no longer work, the last 100 kept: one presented again is recognised (retired_credential_used). */
function retired(existing: CallerRecord, hashes: readonly string[]): string[] {
  return [...(existing.revoked_tokens ?? []), ...hashes].slice(-100);
}

/**
 * A new identity with one token, printed once by the caller of this function. A revoked name can be
 * reused, with the access asked for now: `readOnly` (admin tokens only) makes a token that may only read.
 */
export async function addToken(op: Operator, kind: TokenKind, name: string, options: { readOnly?: boolean } = {}): Promise<{ record: AdminRecord; token: string }> {
  if (options.readOnly && kind !== 'admin') throw new UserError('only admin tokens can be read-only');
  const existing = await named(op, kind, name);
  if (existing && !existing.revoked_at) throw new StateError(`${kind === 'caller' ? 'caller' : 'admin token'} "${name}" already exists; rotate or revoke it`);
  const token = generateToken(PREFIX[kind]);
  const actor = await by(op);
  const now = actor.now.toISOString();
  // A name added again is a new incarnation of its record (created_at: the certificates issued
  // before it stop identifying anyone), and must be later than the revoked one even when this
  // host's clock is behind the one that added it first: instances keep the later incarnation.
  const later = new Date(existing ? Date.parse(existing.created_at) + 1 : Number.NaN);
  const revoked = existing ? retired(existing, existing.tokens.map((t) => t.hash)) : [];
  const record: AdminRecord = {
    name,
    revision: (existing?.revision ?? 0) + 1,
    created_at: later.getTime() > Date.parse(now) ? later.toISOString() : now,
    updated_at: now,
    tokens: [{ id: newTokenId(), hash: hashToken(token), created_at: now }],
    // The revoked identity's tokens are still recognised, so one presented again raises
    // retired_credential_used (a leaked token being tried) rather than passing as an unknown one.
    ...(revoked.length > 0 ? { revoked_tokens: revoked } : {}),
    history: [...(existing?.history ?? []), entry(actor, 'add', options.readOnly ? 'read-only' : undefined)].slice(-100),
    // Written only when set: a full token's record stays as it was before the field existed.
    ...(options.readOnly ? { read_only: true } : {}),
  };
  await op.store.put(kind, record, existing?.revision ?? 0);
  return { record, token };
}

/** A new token; the old ones keep working until the grace ends (0: they stop now). The record's access (read_only) stays as it was. */
export async function rotateToken(op: Operator, kind: TokenKind, name: string, graceMs: number): Promise<{ record: AdminRecord; token: string }> {
  const existing = await named(op, kind, name);
  if (!existing || existing.revoked_at) throw new NotFoundError(`no active ${kind === 'caller' ? 'caller' : 'admin token'} "${name}"`);
  const actor = await by(op);
  const now = actor.now;
  const until = new Date(now.getTime() + graceMs).toISOString();
  const token = generateToken(PREFIX[kind]);
  const kept = graceMs > 0 ? existing.tokens.filter((tk) => tokenLive(tk, now.getTime())).map((tk) => ({ ...tk, expires_at: tk.expires_at && tk.expires_at < until ? tk.expires_at : until })) : [];
  // Tokens that stop now are remembered by hash only, so a service still presenting one is noticed.
  const dropped = existing.tokens.filter((tk) => !kept.some((k) => k.id === tk.id)).map((tk) => tk.hash);
  const record: AdminRecord = {
    ...existing,
    revision: existing.revision + 1,
    updated_at: now.toISOString(),
    tokens: [...kept, { id: newTokenId(), hash: hashToken(token), created_at: now.toISOString() }],
    revoked_tokens: retired(existing, dropped),
    history: [...(existing.history ?? []), entry(actor, 'rotate', graceMs > 0 ? `old tokens valid until ${until}` : 'old tokens stopped at once')].slice(-100),
  };
  await op.store.put(kind, record, existing.revision);
  return { record, token };
}

/** Immediate: every token of the identity stops working. */
export async function revokeToken(op: Operator, kind: TokenKind, name: string): Promise<AdminRecord> {
  const existing = await named(op, kind, name);
  if (!existing) throw new NotFoundError(`no ${kind === 'caller' ? 'caller' : 'admin token'} "${name}"`);
  if (existing.revoked_at) return existing;
  const actor = await by(op);
  const now = actor.now.toISOString();
  const revokedHashes = retired(existing, existing.tokens.map((t) => t.hash));
  const record: AdminRecord = { ...existing, revision: existing.revision + 1, updated_at: now, revoked_at: now, tokens: [], revoked_tokens: revokedHashes, history: [...(existing.history ?? []), entry(actor, 'revoke')].slice(-100) };
  await op.store.put(kind, record, existing.revision);
  return record;
}
