import { ConflictError } from '../errors.ts';

/**
 * The store's key-encryption-key floor: the lowest master key version a write may wrap a new data
 * key with. `master-key rotate` raises it to the new active version before it re-wraps, and
 * `remove` to the active one before it counts, both under the keyring lock. Without it, a writer
 * that read the keyring before a rotation (a `keys put` between its wrap and its commit, an admin
 * API whose keyring has not been reloaded yet, an instance with an older copy of the master key
 * file) committed a data key wrapped by the old version after the re-wrap had passed, and `remove`
 * could then take that version out of the keyring: the credential was lost for good.
 *
 * The check is part of each backend's atomic write (the file store's lock, the Redis store's
 * script), so it holds for every writer on every host; reads never look at it. A wrap the stored
 * record already holds is carried over, not made: promoting or revoking a version of a record that
 * is not re-wrapped yet still works.
 */

interface MaybeVersion {
  readonly version?: unknown;
  readonly kek?: unknown;
  readonly dek?: { readonly nonce?: unknown; readonly ct?: unknown; readonly tag?: unknown };
}

function versionsOf(record: unknown): readonly MaybeVersion[] {
  const versions = (record as { versions?: unknown } | null | undefined)?.versions;
  return Array.isArray(versions) ? (versions as MaybeVersion[]).filter((v) => typeof v === 'object' && v !== null) : [];
}

/** One wrapped data key, as a tuple: the same wrap in the stored and the new record gives the same key. */
function wrapKey(v: MaybeVersion): string {
  return JSON.stringify([v.version, v.kek, v.dek?.nonce, v.dek?.ct, v.dek?.tag]);
}

/**
 * The master key version of the first data key that `record` wraps anew (not held by `stored`, the
 * record it replaces) below `floor`; undefined when there is none. Caller records hold no data keys.
 */
export function newWrapBelow(stored: unknown, record: unknown, floor: number): number | undefined {
  const held = new Set(versionsOf(stored).filter((v) => v.dek).map(wrapKey));
  for (const v of versionsOf(record)) {
    if (!v.dek || held.has(wrapKey(v))) continue;
    if (typeof v.kek !== 'number' || v.kek < floor) return typeof v.kek === 'number' ? v.kek : 0;
  }
  return undefined;
}

/** The refusal, a conflict with a concurrent rotation (CLI exit 3, HTTP 409): nothing was written. */
export function belowFloorError(key: string, kek: number, floor: number): ConflictError {
  return new ConflictError(`credential "${key}" was not written: its new data key is wrapped by master key version ${kek}, but the store takes new data keys from master key version ${floor} on ("master-key rotate" ran after this master key file was read, or the file is an older copy); nothing was changed, try again`);
}
