import type { AdminRecord, CallerRecord, CredentialRecord, RecordKind } from './records.ts';

/** Every record a store holds, as last read. Records are validated and frozen. */
export interface StoreSnapshot {
  readonly credentials: ReadonlyMap<string, CredentialRecord>;
  readonly callers: ReadonlyMap<string, CallerRecord>;
  /** Admin API tokens, as caller-shaped records (with read_only). */
  readonly admins: ReadonlyMap<string, AdminRecord>;
  /** Records that failed validation: they fail closed, the rest keep working. */
  readonly damaged: ReadonlyMap<string, string>;
}

/** When a caller last used a credential version (kept to the latest per credential, version and caller). */
export interface UsageEntry {
  readonly credential: string;
  readonly version: number;
  readonly caller: string;
  readonly at: string;
}

export type RecordOf<K extends RecordKind> = K extends 'credential' ? CredentialRecord : K extends 'admin' ? AdminRecord : CallerRecord;

/**
 * A backend holds ciphertext records. Writes are compare-and-set on the record's revision:
 * `expectedRevision` 0 means "must not exist yet". A lost race throws ConflictError, and so does a
 * data key wrapped by a master key version below the store's floor.
 */
export interface StoreBackend {
  readonly description: string;
  load(): Promise<StoreSnapshot>;
  put<K extends RecordKind>(kind: K, record: RecordOf<K>, expectedRevision: number): Promise<void>;
  /**
   * From now on, refuse (ConflictError) a put that wraps a new data key with a master key version
   * below `version` (see kek-floor.ts). The floor only rises; a lower `version` changes nothing.
   */
  raiseKekFloor(version: number): Promise<void>;
  /** The floor now: 0 when there is none (never raised, or edited by hand into something that is not a whole number). */
  kekFloor(): Promise<number>;
  /** Merge last-use times, keeping the latest per (credential, version, caller). Not compare-and-set: usage is a hint. */
  recordUsage(entries: readonly UsageEntry[]): Promise<void>;
  readUsage(credential: string): Promise<UsageEntry[]>;
  /** Call `listener` soon after any writer (this process or another) changed the store. */
  watch(listener: () => void): () => void;
  /**
   * The store's own clock in epoch ms, when every instance reads the same one (Redis TIME). Grace
   * ends are judged on it, so an instance whose clock is wrong cannot retire a version early or
   * late for all of them. Without it (a file on one host), the host's clock is that shared clock.
   */
  now?(): Promise<number>;
  close(): Promise<void>;
}
