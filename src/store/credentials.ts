import { randomBytes, type KeyObject } from 'node:crypto';
import { Secret } from '../secret.ts';
import type { ResolvedCredential } from '../injectors/types.ts';
import { aad, IntegrityError, KEY_BYTES, open, seal, toKeyObject } from './crypto.ts';
import type { Keyring } from './keyring.ts';
import type { CredentialRecord, CredentialVersionRecord, VersionState } from './records.ts';

/** Envelope encryption of credential versions: a random DEK per version, wrapped by the active KEK. */

export type FieldValues = Readonly<Record<string, string>>;

const FIELD_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;

/** Check a JSON value given as credential fields: a non-empty object of non-empty strings. */
export function validateFields(value: unknown): { ok: true; fields: FieldValues } | { ok: false; message: string } {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return { ok: false, message: 'credential fields must be a JSON object of strings' };
  const entries = Object.entries(value);
  if (entries.length === 0) return { ok: false, message: 'credential fields must not be empty' };
  const fields: Record<string, string> = Object.create(null);
  for (const [name, v] of entries) {
    if (!FIELD_NAME.test(name)) return { ok: false, message: `field name "${name.slice(0, 64)}" must be letters, digits and "_"` };
    if (typeof v !== 'string' || v.length === 0) return { ok: false, message: `field "${name}" must be a non-empty string` };
    if (v.length > 65_536) return { ok: false, message: `field "${name}" is longer than 64 KiB` };
  }
  for (const [name, v] of entries) fields[name] = v as string;
  return { ok: true, fields };
}

export function sealVersion(keyring: Keyring, id: string, version: number, state: VersionState, fields: FieldValues, now: Date): CredentialVersionRecord {
  const dek = randomBytes(KEY_BYTES);
  const kek = keyring.get(keyring.active)!;
  try {
    return {
      version,
      state,
      created_at: now.toISOString(),
      ...(state === 'current' ? { activated_at: now.toISOString() } : {}),
      fields: Object.keys(fields).sort(),
      kek: keyring.active,
      dek: seal(kek, dek, aad('dek', id, version, keyring.active)),
      data: seal(dek, Buffer.from(JSON.stringify(fields), 'utf8'), aad('fields', id, version)),
    };
  } finally {
    dek.fill(0);
  }
}

/**
 * Unwrapped data keys, as KeyObjects, per keyring: unwrapping and preparing a key on every request
 * was the largest single cost of a proxied request. The cache key is everything the unwrap reads
 * (credential id, version, KEK version and the wrapped bytes), so a changed or tampered record is a
 * miss and is checked afresh. A new keyring (rotation, reload) starts with an empty cache. (The
 * request path also keeps each opened version while its record is unchanged: see
 * pipeline/resolve-credential.ts.)
 */
const dekCache = new WeakMap<Keyring, Map<string, KeyObject>>();
const DEK_CACHE_LIMIT = 10_000;

function dataKey(keyring: Keyring, id: string, v: CredentialVersionRecord & { dek: NonNullable<CredentialVersionRecord['dek']> }): KeyObject {
  let cache = dekCache.get(keyring);
  if (!cache) {
    cache = new Map();
    dekCache.set(keyring, cache);
  }
  const key = JSON.stringify([id, v.version, v.kek, v.dek.nonce, v.dek.ct, v.dek.tag]);
  let dek = cache.get(key);
  if (!dek) {
    const raw = unwrapDek(keyring, id, v);
    try {
      dek = toKeyObject(raw);
    } finally {
      raw.fill(0);
    }
    if (cache.size >= DEK_CACHE_LIMIT) cache.clear();
    cache.set(key, dek);
  }
  return dek;
}

/**
 * Decrypt one version. Any mismatch (tampered bytes, a record copied from another credential id or
 * version, a missing KEK) throws IntegrityError and nothing partial is returned.
 */
export function openVersion(keyring: Keyring, id: string, v: CredentialVersionRecord): ResolvedCredential {
  if (!v.dek || !v.data) throw new IntegrityError(`credential "${id}" version ${v.version} has no ciphertext`);
  if (!keyring.get(v.kek)) throw new IntegrityError(`credential "${id}" version ${v.version} is wrapped by key-encryption key ${v.kek}, which the keyring does not hold`);
  const what = `credential "${id}" version ${v.version}`;
  const plaintext = open(dataKey(keyring, id, { ...v, dek: v.dek }), v.data, aad('fields', id, v.version), what);
  let parsed: unknown;
  try {
    parsed = JSON.parse(plaintext.toString('utf8'));
  } catch {
    throw new IntegrityError(what);
  } finally {
    plaintext.fill(0);
  }
  const fields = new Map<string, Secret>();
  for (const [name, value] of Object.entries(parsed as Record<string, unknown>)) {
    if (typeof value === 'string') fields.set(name, new Secret(value));
  }
  return { id, version: v.version, createdAt: v.created_at, fields };
}

/** The version's data key, unwrapped (caller zeroes it). Throws IntegrityError on any mismatch. */
export function unwrapDek(keyring: Keyring, id: string, v: CredentialVersionRecord): Buffer {
  const kek = keyring.get(v.kek);
  if (!kek || !v.dek) throw new IntegrityError(`credential "${id}" version ${v.version} cannot be unwrapped`);
  return open(kek, v.dek, aad('dek', id, v.version, v.kek), `credential "${id}" version ${v.version}`);
}

/** The same version with its data key wrapped by the active KEK; `data` is untouched. */
export function wrapDek(keyring: Keyring, id: string, v: CredentialVersionRecord, dek: Buffer): CredentialVersionRecord {
  return { ...v, kek: keyring.active, dek: seal(keyring.get(keyring.active)!, dek, aad('dek', id, v.version, keyring.active)) };
}

/** Whole days from `since` (an ISO time) to `now`. */
export function ageDays(since: string, now: number): number {
  return Math.floor((now - Date.parse(since)) / 86_400_000);
}

/** A credential whose current version is older than a maximum age (`keys due`, `GET /v1/credentials?due=`). */
export interface DueCredential {
  readonly id: string;
  readonly version: number;
  readonly age_days: number;
}

/** The credentials whose current version has been current (or, never activated, existed) longer than `maxAgeMs`. */
export function dueForRotation(records: Iterable<CredentialRecord>, maxAgeMs: number, now: number): DueCredential[] {
  return [...records].flatMap((r) => {
    const current = currentVersion(r);
    const since = current?.activated_at ?? current?.created_at;
    return current && since && now - Date.parse(since) > maxAgeMs ? [{ id: r.id, version: current.version, age_days: ageDays(since, now) }] : [];
  });
}

export function currentVersion(record: CredentialRecord): CredentialVersionRecord | undefined {
  return record.versions.find((v) => v.state === 'current');
}

export function newCredentialRecord(keyring: Keyring, id: string, fields: FieldValues, now: Date, actor = 'system'): CredentialRecord {
  return {
    id,
    revision: 1,
    created_at: now.toISOString(),
    updated_at: now.toISOString(),
    versions: [sealVersion(keyring, id, 1, 'current', fields, now)],
    history: [{ at: now.toISOString(), actor, action: 'put', version: 1 }],
  };
}

/** Metadata only, for `keys list` / `keys show`: never a value. */
export function describeCredential(record: CredentialRecord, now: Date, lastUse: ReadonlyMap<number, readonly { caller: string; at: string }[]> = new Map()) {
  return {
    id: record.id,
    revision: record.revision,
    created_at: record.created_at,
    updated_at: record.updated_at,
    versions: record.versions.map((v) => ({
      version: v.version,
      state: v.state,
      fields: v.fields,
      created_at: v.created_at,
      // Never below 0: the answer to a write is described with the time the request came in, just
      // before the version's created_at, and another instance's clock may run a little ahead.
      age_days: Math.max(0, Math.floor((now.getTime() - Date.parse(v.created_at)) / 86_400_000)),
      ...(v.activated_at ? { activated_at: v.activated_at } : {}),
      ...(v.grace_until ? { grace_until: v.grace_until } : {}),
      ...(v.retired_at ? { retired_at: v.retired_at } : {}),
      ...(v.revoked_at ? { revoked_at: v.revoked_at } : {}),
      kek: v.kek,
      has_ciphertext: v.data !== undefined,
      last_used: lastUse.get(v.version) ?? [],
    })),
    history: record.history ?? [],
  };
}
