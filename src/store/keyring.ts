import { randomBytes } from 'node:crypto';
import { link, lstat, mkdir, open as openFile, readFile, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { ConflictError, UserError } from '../errors.ts';
import type { KeyObject } from 'node:crypto';
import { KEY_BYTES, toKeyObject } from './crypto.ts';
import { withFileLock, type HeldLock } from './lock-file.ts';
import { removeStaleTemps, replaceFile } from './temp-files.ts';

/**
 * The key-encryption keyring: versioned 256-bit KEKs in a file only its owner may read. New data
 * keys are wrapped with the active version; older versions stay to unwrap what they wrapped.
 */

export interface KekEntry {
  readonly version: number;
  readonly createdAt: string;
  readonly key: Buffer;
}


export class Keyring {
  readonly active: number;
  readonly #keys: ReadonlyMap<number, KekEntry>;
  readonly #objects: ReadonlyMap<number, KeyObject>;

  constructor(active: number, keys: readonly KekEntry[]) {
    this.active = active;
    this.#keys = new Map(keys.map((k) => [k.version, k]));
    this.#objects = new Map(keys.map((k) => [k.version, toKeyObject(k.key)]));
    if (!this.#keys.has(active)) throw new Error('the active key version is not in the keyring');
  }

  get(version: number): KeyObject | undefined {
    return this.#objects.get(version);
  }

  versions(): { version: number; createdAt: string; active: boolean }[] {
    return [...this.#keys.values()].map((k) => ({ version: k.version, createdAt: k.createdAt, active: k.version === this.active }));
  }

  /** A keyring with one more, freshly generated key, made the active one. */
  withNewKey(now: Date): Keyring {
    const version = Math.max(...this.#keys.keys()) + 1;
    return new Keyring(version, [...this.#keys.values(), { version, createdAt: now.toISOString(), key: randomBytes(KEY_BYTES) }]);
  }

  /** A keyring without `version` (never the active one). */
  without(version: number): Keyring {
    if (version === this.active) throw new UserError(`key version ${version} is the active one and cannot be removed`);
    if (!this.#keys.has(version)) throw new UserError(`the keyring has no key version ${version}`);
    return new Keyring(this.active, [...this.#keys.values()].filter((k) => k.version !== version));
  }

  /** The file body. Only the keyring file ever holds key material. */
  serialize(): string {
    const keys = [...this.#keys.values()].map((k) => ({ version: k.version, created_at: k.createdAt, key: k.key.toString('base64') }));
    return `${JSON.stringify({ format: FORMAT, active: this.active, keys }, null, 2)}\n`;
  }

  toJSON(): string {
    return '[REDACTED]';
  }
}

/**
 * Run `fn` holding the keyring's writer lock (`<file>.lock`), so keyring changes happen one at a
 * time. Without it, two `master-key rotate` runs that read the file at once each added their own
 * key under the same version number: the last rename kept one, and the data keys the other had
 * already re-wrapped with its key could never be unwrapped again. `fn` reads the keyring itself,
 * under the lock. A rotation re-wraps every record, so a live holder is waited for a while
 * (then ConflictError, exit 3), and a lock is only taken over from a holder that is gone.
 */
export async function withKeyringLock<T>(path: string, fn: (held: HeldLock) => Promise<T>): Promise<T> {
  return withFileLock(path, {
    waitMs: KEYRING_LOCK_WAIT_MS,
    staleMs: KEYRING_LOCK_STALE_MS,
    what: `master key file ${path}`,
    // A read-only or full file system: say so plainly; nothing was changed.
    lockFailed: (err) => (err instanceof UserError ? err : new UserError(`cannot lock master key file ${path} (${(err as NodeJS.ErrnoException).code ?? 'error'}); it is unchanged`)),
  }, fn);
}

const KEYRING_LOCK_WAIT_MS = 30_000;
const KEYRING_LOCK_STALE_MS = 60 * 60_000;

/**
 * Replace the keyring file atomically (temp file 0600, fsync, rename, directory fsync). With `held`
 * (the keyring's lock, from withKeyringLock), only while that lock is still this command's: one
 * held up past KEYRING_LOCK_STALE_MS has had it taken over, and its keyring, read before, would
 * drop the key another rotate added since (and re-wrapped every data key with).
 */
export async function writeKeyring(path: string, keyring: Keyring, held?: HeldLock): Promise<void> {
  const fence = held && (async () => {
    try {
      await held.confirm();
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
      throw new ConflictError(`master key file ${path} was not written: this command held its lock past ${KEYRING_LOCK_STALE_MS / 60_000} min and another took it over, and may have changed the keyring since; nothing was changed, run it again`);
    }
  });
  await replaceFile(path, keyring.serialize(), 0o600, (err) => (err instanceof ConflictError ? err : new UserError(`cannot write master key file ${path} (${(err as NodeJS.ErrnoException).code ?? 'error'}); it is unchanged`)), fence);
}

const FORMAT = 'egress-keyring/1';

export async function readKeyring(path: string): Promise<Keyring> {
  let info;
  try {
    info = await stat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new UserError(`master key file ${path} does not exist; create it with "egress master-key init"`);
    }
    throw new UserError(`master key file ${path} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  if (!info.isFile()) throw new UserError(`master key file ${path} is not a regular file`);
  if ((info.mode & 0o077) !== 0) {
    throw new UserError(`master key file ${path} is readable by group or others (mode ${(info.mode & 0o777).toString(8)}); run "chmod 600 ${path}"`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(path, 'utf8'));
  } catch {
    throw new UserError(`master key file ${path} is not a valid keyring (not JSON)`);
  }
  return parseKeyring(raw, path);
}

function parseKeyring(raw: unknown, path: string): Keyring {
  const malformed = (why: string) => new UserError(`master key file ${path} is not a valid keyring: ${why}`);
  if (typeof raw !== 'object' || raw === null) throw malformed('not an object');
  const doc = raw as { format?: unknown; active?: unknown; keys?: unknown };
  if (doc.format !== FORMAT) throw malformed(`format must be "${FORMAT}"`);
  if (!Array.isArray(doc.keys) || doc.keys.length === 0) throw malformed('no keys');
  const keys: KekEntry[] = doc.keys.map((k: unknown, i: number) => {
    const entry = k as { version?: unknown; created_at?: unknown; key?: unknown };
    if (!Number.isSafeInteger(entry.version) || (entry.version as number) < 1) throw malformed(`key ${i + 1} has no valid version`);
    if (typeof entry.key !== 'string') throw malformed(`key version ${String(entry.version)} has no key`);
    const key = Buffer.from(entry.key, 'base64');
    if (key.length !== KEY_BYTES || key.toString('base64') !== entry.key) throw malformed(`key version ${String(entry.version)} is not 32 bytes of base64`);
    if (key.every((b) => b === 0)) throw malformed(`key version ${String(entry.version)} is all zeros`);
    return { version: entry.version as number, createdAt: typeof entry.created_at === 'string' ? entry.created_at : '', key };
  });
  if (new Set(keys.map((k) => k.version)).size !== keys.length) throw malformed('duplicate key versions');
  if (!keys.some((k) => k.version === doc.active)) throw malformed('"active" names no key in the file');
  return new Keyring(doc.active as number, keys);
}

/**
 * Create a new keyring with one fresh key. Refuses to overwrite: losing a keyring loses every
 * credential. The file is written in full beside its place (0600, fsync) and linked into place,
 * which fails if a file is there: a write cut short (a full disk) or a kill on the way leaves no
 * master key file, rather than an empty one that every later init refused as existing and every
 * start refused as not a keyring.
 */
export async function createKeyring(path: string): Promise<Keyring> {
  const exists = () => new UserError(`master key file ${path} already exists; refusing to overwrite it`);
  const cannot = (err: unknown) => new UserError(`cannot create master key file ${path} (${(err as NodeJS.ErrnoException).code ?? 'error'}); nothing was created`);
  if (await lstat(path).then(() => true, () => false)) throw exists();
  const dir = dirname(path);
  const entry: KekEntry = { version: 1, createdAt: new Date().toISOString(), key: randomBytes(KEY_BYTES) };
  const keyring = new Keyring(1, [entry]);
  // Named as replaceFile names its temp files, so one a killed init left is removed by the next write.
  const tmp = join(dir, `.${basename(path)}.${process.pid}.${Date.now()}.tmp`);
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await removeStaleTemps(dir, basename(path));
    const handle = await openFile(tmp, 'wx', 0o600);
    try {
      await handle.writeFile(keyring.serialize());
      await handle.sync();
    } finally {
      await handle.close();
    }
    await link(tmp, path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw exists();
    throw cannot(err);
  } finally {
    await unlink(tmp).catch(() => {});
  }
  const folder = await openFile(dir, 'r');
  try {
    await folder.sync();
  } finally {
    await folder.close();
  }
  return keyring;
}
