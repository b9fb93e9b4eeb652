import { z } from 'zod';

/**
 * Stored records. They hold ciphertext and metadata only; the same format is used by every backend.
 * Credential versions are designed for rotation: pending -> current -> previous (grace) -> retired,
 * and revoked from any state. A retired or revoked version keeps its metadata, not its ciphertext.
 */

export const VERSION_STATES = ['pending', 'current', 'previous', 'retired', 'revoked'] as const;
export type VersionState = (typeof VERSION_STATES)[number];

const sealed = z.strictObject({ nonce: z.string(), ct: z.string(), tag: z.string() });

export const credentialVersionSchema = z.strictObject({
  version: z.number().int().min(1),
  state: z.enum(VERSION_STATES),
  created_at: z.string(),
  activated_at: z.string().optional(),
  grace_until: z.string().optional(),
  retired_at: z.string().optional(),
  revoked_at: z.string().optional(),
  /** Field names (not values), so `keys show` and route checks need no decryption. */
  fields: z.array(z.string()),
  /** The KEK version that wraps `dek`. */
  kek: z.number().int().min(1),
  dek: sealed.optional(),
  data: sealed.optional(),
});

/** Who changed what, kept in the record itself (bounded), and written to each instance's audit log. */
export const historyEntrySchema = z.strictObject({
  at: z.string(),
  actor: z.string(),
  action: z.string(),
  version: z.number().int().optional(),
  detail: z.string().optional(),
});

/**
 * The state that more than one version holds, of those a credential has at most one of (pending,
 * current, previous); undefined when none. The state machine never writes such a record, and the
 * store refuses to read one.
 */
export function repeatedState(versions: readonly { readonly state: VersionState }[]): 'pending' | 'current' | 'previous' | undefined {
  return (['pending', 'current', 'previous'] as const).find((state) => versions.filter((v) => v.state === state).length > 1);
}

export const credentialRecordSchema = z.strictObject({
  id: z.string(),
  revision: z.number().int().min(1),
  created_at: z.string(),
  updated_at: z.string(),
  // What the state machine never writes (two current versions, two with one number) is a damaged
  // record, refused like any other: which of two current keys to send is not the proxy's guess.
  versions: z.array(credentialVersionSchema).refine(
    (versions) => new Set(versions.map((v) => v.version)).size === versions.length && repeatedState(versions) === undefined,
    'at most one pending, one current and one previous version, each version number once',
  ),
  history: z.array(historyEntrySchema).optional(),
});

export const callerTokenSchema = z.strictObject({
  id: z.string(),
  /** SHA-256 of the whole token, hex. Tokens carry 256 random bits, so a fast hash is enough. */
  hash: z.string().regex(/^[0-9a-f]{64}$/),
  created_at: z.string(),
  /** Set when a newer token replaced this one: it works until then. */
  expires_at: z.string().optional(),
});

export const callerRecordSchema = z.strictObject({
  name: z.string(),
  revision: z.number().int().min(1),
  created_at: z.string(),
  updated_at: z.string(),
  revoked_at: z.string().optional(),
  tokens: z.array(callerTokenSchema),
  /** Hashes of tokens that were revoked: kept only to recognise them if they are presented again. */
  revoked_tokens: z.array(z.string().regex(/^[0-9a-f]{64}$/)).max(100).optional(),
  history: z.array(historyEntrySchema).optional(),
});

/**
 * An admin token is a caller-shaped record in its own table, with one field more. `read_only`: the
 * token may only read (GET and HEAD of the admin API, the status page), for monitoring that must
 * not also be able to revoke every key. Absent is a full token: records written before the field
 * existed keep the access they had. Anything but a boolean is a damaged record, which fails closed
 * (the token opens nothing), never a guess at which access was meant.
 */
export const adminRecordSchema = callerRecordSchema.extend({
  read_only: z.boolean().optional(),
});

/**
 * A record's created_at as epoch ms; NaN unless it is an ISO 8601 UTC time as the proxy writes it
 * (a hand-edited date must not decide which of two copies is newer).
 */
function createdMs(record: { readonly created_at: string }): number {
  return /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?Z$/.test(record.created_at) ? Date.parse(record.created_at) : Number.NaN;
}

/**
 * Which of two copies of one record (same kind and key) is newer: negative when `a` is older than
 * `b`, 0 when neither is (one incarnation, one revision), positive when newer. Copies are ordered by incarnation, then
 * by revision. A record made afresh starts again at revision 1 (`keys put`, `callers add` after
 * the store lost its data) with a later created_at: it is a new incarnation, newer than any
 * revision of the record it replaces. A copy of an older incarnation (an earlier created_at), or
 * of this one at a lower revision (a backup, a replayed write), is older. When either created_at
 * is not a time, only revisions are compared.
 */
export function compareCopies(a: { readonly created_at: string; readonly revision: number }, b: { readonly created_at: string; readonly revision: number }): number {
  const incarnation = createdMs(a) - createdMs(b);
  return incarnation !== 0 && !Number.isNaN(incarnation) ? incarnation : a.revision - b.revision;
}

/** `a` is a later incarnation of the record than `b` (see compareCopies). */
export function laterIncarnation(a: { readonly created_at: string }, b: { readonly created_at: string }): boolean {
  return createdMs(a) > createdMs(b);
}

export type CredentialVersionRecord = z.infer<typeof credentialVersionSchema>;
export type CredentialRecord = z.infer<typeof credentialRecordSchema>;
export type CallerToken = z.infer<typeof callerTokenSchema>;
export type CallerRecord = z.infer<typeof callerRecordSchema>;
export type AdminRecord = z.infer<typeof adminRecordSchema>;
export type HistoryEntry = z.infer<typeof historyEntrySchema>;

/** Admin tokens (for the admin API) have the caller record's shape and read_only (adminRecordSchema), in their own table. */
export type RecordKind = 'credential' | 'caller' | 'admin';
