import { watch as fsWatch, type FSWatcher } from 'node:fs';
import { readFile, rename, stat } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { ConflictError, StoreUnavailableError, UserError } from '../errors.ts';
import { belowFloorError, newWrapBelow } from './kek-floor.ts';
import { acquireLock, type HeldLock } from './lock-file.ts';
import { replaceFile } from './temp-files.ts';
import type { AdminRecord, CallerRecord, CredentialRecord, RecordKind } from './records.ts';
import { adminRecordSchema, callerRecordSchema, credentialRecordSchema } from './records.ts';
import type { RecordOf, StoreBackend, StoreSnapshot, UsageEntry } from './types.ts';

const FORMAT = 'egress-store/1';

interface FileDocument {
  format: typeof FORMAT;
  credentials: Record<string, unknown>;
  callers: Record<string, unknown>;
  admins: Record<string, unknown>;
  /** credential id -> "version|caller" -> ISO time of last use */
  usage?: Record<string, Record<string, string>>;
  /** The lowest master key version a new data key may be wrapped by (kek-floor.ts). */
  kek_floor?: number;
}

const TABLE = { credential: 'credentials', caller: 'callers', admin: 'admins' } as const satisfies Record<RecordKind, keyof FileDocument>;

/** The key a record is stored under: a credential's id, a caller's or admin token's name. */
export function recordKey(kind: RecordKind, record: CredentialRecord | CallerRecord): string {
  return kind === 'credential' ? (record as CredentialRecord).id : (record as CallerRecord).name;
}

/** How often a watcher re-checks the file, in case fs.watch missed an event (it can, across renames). */
const POLL_MS = 250;
const LOCK_WAIT_MS = 5_000;
const LOCK_STALE_MS = 30_000;

/**
 * The default backend: one JSON file of ciphertext records. Writers take a lock file, re-read,
 * compare revisions, and replace the file atomically (temp file, fsync, rename, directory fsync).
 */
export class FileStore implements StoreBackend {
  readonly path: string;
  readonly description: string;

  constructor(path: string) {
    this.path = path;
    this.description = `file:${path}`;
  }

  async exists(): Promise<boolean> {
    try {
      await stat(this.path);
      return true;
    } catch {
      return false;
    }
  }

  async load(): Promise<StoreSnapshot> {
    return toSnapshot(await this.#read());
  }

  async put<K extends RecordKind>(kind: K, record: RecordOf<K>, expectedRevision: number): Promise<void> {
    const key = recordKey(kind, record);
    await this.#withLock(async (held) => {
      const doc = await this.#read();
      const table: Record<string, unknown> = doc[TABLE[kind]];
      const existing = Object.hasOwn(table, key) ? table[key] : undefined;
      const revision = existing === undefined ? 0 : Number((existing as { revision?: unknown }).revision ?? -1);
      if (revision !== expectedRevision) {
        throw new ConflictError(`${kind} "${key}" was changed by another writer (revision ${revision}, expected ${expectedRevision}); re-read and try again`);
      }
      const below = doc.kek_floor === undefined ? undefined : newWrapBelow(existing, record, doc.kek_floor);
      if (below !== undefined) throw belowFloorError(key, below, doc.kek_floor!);
      table[key] = record;
      await this.#write(doc, held);
    });
  }

  async raiseKekFloor(version: number): Promise<void> {
    await this.#withLock(async (held) => {
      const doc = await this.#read();
      if ((doc.kek_floor ?? 0) >= version) return;
      doc.kek_floor = version;
      await this.#write(doc, held);
    });
  }

  async kekFloor(): Promise<number> {
    return (await this.#read()).kek_floor ?? 0;
  }

  async recordUsage(entries: readonly UsageEntry[]): Promise<void> {
    if (entries.length === 0) return;
    await this.#withLock(async (held) => {
      const doc = await this.#read();
      const usage = doc.usage ?? (doc.usage = Object.create(null) as Record<string, Record<string, string>>);
      for (const e of entries) {
        const byKey = Object.hasOwn(usage, e.credential) ? usage[e.credential]! : (usage[e.credential] = Object.create(null) as Record<string, string>);
        const key = `${e.version}|${e.caller}`;
        if (!Object.hasOwn(byKey, key) || byKey[key]! < e.at) byKey[key] = e.at;
      }
      await this.#write(doc, held);
    });
  }

  async readUsage(credential: string): Promise<UsageEntry[]> {
    const usage = (await this.#read()).usage ?? {};
    return Object.hasOwn(usage, credential) ? decodeUsage(credential, usage[credential]!) : [];
  }

  watch(listener: () => void): () => void {
    let last = '';
    let watcher: FSWatcher | undefined;
    const check = async () => {
      try {
        const s = await stat(this.path);
        const sig = `${s.ino}:${s.size}:${s.mtimeMs}`;
        if (sig !== last) {
          // The first sight too: the reader's first read may have been made before this stat, and a
          // write between the two would otherwise be this watch's starting point, never read.
          last = sig;
          listener();
        }
      } catch {
        // Missing file: nothing to report until it appears. Missing from the start (a first run,
        // before any record was written), its appearance is the first change: `keys put` or
        // `callers add` creating it was otherwise taken for the starting point and never read.
        if (last === '') last = 'missing';
      }
    };
    void check();
    const timer = setInterval(() => void check(), POLL_MS);
    timer.unref();
    try {
      watcher = fsWatch(dirname(this.path), { persistent: false }, (_event, name) => {
        if (name === basename(this.path)) void check();
      });
      watcher.on('error', () => watcher?.close());
    } catch {
      // Polling alone still meets the one-second propagation promise.
    }
    return () => {
      clearInterval(timer);
      watcher?.close();
    };
  }

  async close(): Promise<void> {}

  async #read(): Promise<FileDocument> {
    let text: string;
    try {
      text = await readFile(this.path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { format: FORMAT, credentials: {}, callers: {}, admins: {} };
      throw new UserError(`store ${this.path} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
    }
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch {
      throw new UserError(`store ${this.path} is not valid JSON`);
    }
    const d = doc as Partial<FileDocument> | null;
    if (!d || d.format !== FORMAT || typeof d.credentials !== 'object' || typeof d.callers !== 'object' || !d.credentials || !d.callers) {
      throw new UserError(`store ${this.path} is not an egress store (format "${FORMAT}")`);
    }
    return {
      format: FORMAT,
      credentials: nullProto(d.credentials),
      callers: nullProto(d.callers),
      admins: nullProto(d.admins ?? {}),
      usage: readableUsage(d.usage),
      ...(Number.isSafeInteger(d.kek_floor) ? { kek_floor: d.kek_floor } : {}),
    };
  }

  /** A filesystem error before the new file is in place (read-only, full, no such folder): the store is as it was. */
  #unchanged(err: unknown): unknown {
    const code = (err as NodeJS.ErrnoException)?.code;
    return typeof code === 'string' && !(err instanceof UserError) ? new StoreUnavailableError(`cannot write store ${this.path} (${code}); it is unchanged`) : err;
  }

  /**
   * Replace the file, if `held` is still this writer's lock just before the rename. A writer held
   * up past LOCK_STALE_MS (a stalled disk, a paused process) has had its lock taken over, and what
   * it read may have been replaced since: its file would undo the other writer's change.
   */
  async #write(doc: FileDocument, held: HeldLock): Promise<void> {
    await replaceFile(this.path, `${JSON.stringify(doc, null, 2)}\n`, 0o600, (err) => this.#unchanged(err), async () => {
      try {
        await held.confirm();
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err;
        throw new ConflictError(`store ${this.path} was not written: this writer held its lock past ${LOCK_STALE_MS / 1000} s and another writer took it over, and may have changed the store since; nothing was changed, try again`);
      }
    });
  }

  async #withLock<T>(fn: (held: HeldLock) => Promise<T>): Promise<T> {
    const lock = `${this.path}.lock`;
    let held: HeldLock;
    try {
      held = await acquireLock(lock, { waitMs: LOCK_WAIT_MS, staleMs: LOCK_STALE_MS, what: `store ${this.path}` });
    } catch (err) {
      throw this.#unchanged(err);
    }
    try {
      return await fn(held);
    } finally {
      await held.release();
    }
  }
}

export function decodeUsage(credential: string, byKey: Record<string, string>): UsageEntry[] {
  return Object.entries(byKey).flatMap(([key, at]) => {
    const bar = key.indexOf('|');
    const version = Number(key.slice(0, bar));
    return bar > 0 && Number.isSafeInteger(version) && typeof at === 'string' ? [{ credential, version, caller: key.slice(bar + 1), at }] : [];
  });
}

/**
 * The usage table as it can be read and merged into: a credential's entry that is not an object
 * (a hand edit) is no usage, dropped, rather than a `keys show` and every usage write that fail on
 * it. Usage is a hint; the next write for that credential starts it afresh.
 */
function readableUsage(usage: unknown): Record<string, Record<string, string>> {
  const out: Record<string, Record<string, string>> = Object.create(null);
  if (!isTable(usage)) return out;
  for (const [credential, byKey] of Object.entries(usage)) if (isTable(byKey)) out[credential] = nullProto(byKey) as Record<string, string>;
  return out;
}

function isTable(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function nullProto(obj: object): Record<string, unknown> {
  return Object.assign(Object.create(null), obj);
}

/** Validate every record on its own: one damaged record fails closed without taking the others down. */
export function toSnapshot(doc: { credentials: Record<string, unknown>; callers: Record<string, unknown>; admins?: Record<string, unknown> }): StoreSnapshot {
  const credentials = new Map<string, CredentialRecord>();
  const damaged = new Map<string, string>();
  for (const [key, value] of Object.entries(doc.credentials)) {
    const parsed = credentialRecordSchema.safeParse(value);
    if (parsed.success && parsed.data.id === key) credentials.set(key, deepFreeze(parsed.data));
    else damaged.set(`credential:${key}`, parsed.success ? 'record id does not match its key' : 'record does not match the record format');
  }
  // Admin tokens have one field more than callers (read_only); a caller record carrying it is damaged.
  const named = (kind: 'caller' | 'admin', schema: typeof callerRecordSchema | typeof adminRecordSchema, table: Record<string, unknown>) => {
    const out = new Map<string, AdminRecord>();
    for (const [key, value] of Object.entries(table)) {
      const parsed = schema.safeParse(value);
      if (parsed.success && parsed.data.name === key) out.set(key, deepFreeze(parsed.data));
      else damaged.set(`${kind}:${key}`, parsed.success ? 'record name does not match its key' : 'record does not match the record format');
    }
    return out;
  };
  return { credentials, callers: named('caller', callerRecordSchema, doc.callers), admins: named('admin', adminRecordSchema, doc.admins ?? {}), damaged };
}

function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object') {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}
