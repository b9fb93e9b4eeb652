import { randomInt } from 'node:crypto';
import { link, mkdir, open, readFile, stat, unlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConflictError } from '../errors.ts';

/**
 * Lock files with their holder's identity in them, shared by the file store's writer lock, the
 * keyring's, revoked.json's and issued.json's writer locks, and the audit log's one-writer lock.
 */

/**
 * Create `lock` holding `content`, or report that it exists (false). The content is written aside
 * and linked into place, which fails if a lock exists: a claimant killed at any moment never leaves
 * an empty lock (only a stray claim file, which removeStaleTemps clears).
 */
export async function claimLock(lock: string, content: string): Promise<boolean> {
  const claim = join(dirname(lock), `.${basename(lock)}.${process.pid}.${Date.now()}${randomInt(1e9)}.tmp`);
  try {
    try {
      await writeFile(claim, content, { mode: 0o600 });
      await link(claim, lock);
    } finally {
      // Also when the write failed half-way (a full disk made the file but could not fill it).
      await unlink(claim).catch(() => {});
    }
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    return false;
  }
}

/**
 * Remove a dead holder's lock, one claimant at a time: the claimant that creates `<lock>.steal`
 * first asks `holderGone` again (the lock may meanwhile be a new, live holder's) and removes it
 * only if it still is. Only a steal-file holder removes a lock, so two claimants cannot each
 * remove the other's fresh lock. A steal file left by a crashed claimant is removed once older
 * than `stealStaleMs`.
 */
export async function takeOverLock(lock: string, holderGone: () => Promise<boolean>, stealStaleMs: number): Promise<void> {
  const steal = `${lock}.steal`;
  let handle;
  try {
    handle = await open(steal, 'wx', 0o600);
  } catch {
    const age = await stat(steal).then((s) => Date.now() - s.mtimeMs, () => 0);
    if (age > stealStaleMs) await unlink(steal).catch(() => {});
    return;
  }
  try {
    await handle.close();
    if (await holderGone()) await unlink(lock).catch(() => {});
  } finally {
    await unlink(steal).catch(() => {});
  }
}

/**
 * Run `fn` holding `<path>.lock` (see acquireLock), for a read-modify-write of the file at `path`.
 * `lockFailed` may turn a file-system error from taking the lock into a plainer one.
 */
export async function withFileLock<T>(path: string, options: AcquireOptions & { readonly lockFailed?: (err: unknown) => unknown }, fn: () => Promise<T>): Promise<T> {
  const lock = `${path}.lock`;
  try {
    await acquireLock(lock, options);
  } catch (err) {
    throw options.lockFailed ? options.lockFailed(err) : err;
  }
  try {
    return await fn();
  } finally {
    await unlink(lock).catch(() => {});
  }
}

export interface AcquireOptions {
  /** Wait this long for a live holder, then throw a ConflictError naming `what`. */
  readonly waitMs: number;
  /** A lock older than this is taken over even if its holder's pid answers (a pid reused, another host). */
  readonly staleMs: number;
  readonly what: string;
}

/**
 * Take `lock` (its content: this process's pid), waiting for a live holder. A writer killed
 * mid-write leaves its lock behind: if its process is gone, the lock is taken over at once (one
 * waiter at a time: see takeOverLock) instead of after it goes stale.
 */
export async function acquireLock(lock: string, { waitMs, staleMs, what }: AcquireOptions): Promise<void> {
  await mkdir(dirname(lock), { recursive: true, mode: 0o700 });
  const deadline = Date.now() + waitMs;
  const gone = () => writerGone(lock, staleMs);
  for (let delay = 5; ; delay = Math.min(delay * 2, 100)) {
    if (await claimLock(lock, String(process.pid))) return;
    if (await gone()) {
      await takeOverLock(lock, gone, staleMs);
      continue;
    }
    if (Date.now() > deadline) throw new ConflictError(`${what} is locked by another writer (${lock})`);
    await sleep(delay);
  }
}

/** The lock is stale, or its writer's process is gone (a lock younger than 100 ms is still being made). */
async function writerGone(lock: string, staleMs: number): Promise<boolean> {
  const age = await stat(lock).then((s) => Date.now() - s.mtimeMs, () => 0);
  return age > staleMs || (age > 100 && !(await holderAlive(lock)));
}

/** Is the process that wrote this lock file (its pid is the content) still running on this machine? */
async function holderAlive(lock: string): Promise<boolean> {
  const pid = Number(await readFile(lock, 'utf8').catch(() => ''));
  if (!Number.isSafeInteger(pid) || pid <= 0) return true; // Half-written: give its writer a moment.
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
