import type { CallerRecord, CredentialRecord, RecordKind } from './records.ts';

/** Every record a store holds, as last read. Records are validated and frozen. */
export interface StoreSnapshot {
  readonly credentials: ReadonlyMap<string, CredentialRecord>;
  readonly callers: ReadonlyMap<string, CallerRecord>;
  /** Admin API tokens, as caller-shaped records. */
  readonly admins: ReadonlyMap<string, CallerRecord>;
  /** Records that failed validation: they fail closed, the rest keep working. */
  readonly damaged: ReadonlyMap<string, string>;
}

export type RecordOf<K extends RecordKind> = K extends 'credential' ? CredentialRecord : CallerRecord;

/**
 * A backend holds ciphertext records. Writes are compare-and-set on the record's revision:
 * `expectedRevision` 0 means "must not exist yet". A lost race throws ConflictError.
 */
export interface StoreBackend {
  readonly description: string;
  load(): Promise<StoreSnapshot>;
  put<K extends RecordKind>(kind: K, record: RecordOf<K>, expectedRevision: number): Promise<void>;
  /** Call `listener` soon after any writer (this process or another) changed the store. */
  watch(listener: () => void): () => void;
  close(): Promise<void>;
}
