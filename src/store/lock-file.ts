import { createHash, randomBytes, randomInt } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { link, mkdir, readdir, readFile, stat, unlink, utimes, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConflictError } from '../errors.ts';

/**
 * Lock files with their holder's identity in them, shared by the file store's writer lock, the
 * keyring's, revoked.json's and issued.json's writer locks, and the audit log's one-writer lock.
 *
 * A lock holds `<pid> <start time> <tag>`: the holder's pid, its start time (Linux; `-` elsewhere),
 * which tells a pid reused by another program from the holder, and a random tag, which makes every
 * claim's content unique. A lock whose holder is gone is taken over (see takeOverLock), and the
 * unique content is what lets that happen without ever removing a live holder's lock.
 */

export interface Holder {
  readonly pid: number;
  /** Process start time in clock ticks since boot (/proc/<pid>/stat field 22), when known. */
  readonly start: string | undefined;
}

/** The content this process writes into a lock it claims: unique to this claim. */
export function lockContent(): string {
  return `${process.pid} ${startTime(process.pid) ?? '-'} ${randomBytes(8).toString('hex')}\n`;
}

/**
 * Create `lock` holding `content`, or report that it exists (false). The content is written aside
 * and linked into place, which fails if a lock exists: a claimant killed at any moment never leaves
 * an empty lock (only a stray claim file, which removeDeadClaims clears).
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

export interface TakeOverOptions {
  /** A lock older than this is taken over even if its holder's pid answers (a pid reused, another host). */
  readonly staleMs: number;
  /** A lock naming this process's pid is a previous run's (a container's pid 1 comes back as pid 1). */
  readonly ownPidIsPrevious?: boolean;
  /** A lock naming no holder (content no egress process writes) is gone, not left to go stale. */
  readonly unreadableIsGone?: boolean;
}

/**
 * Remove `lock` if its holder is gone; true when this call removed it. Only the claimant that
 * creates `<lock>.steal-<digest of the dead lock's content>` may remove that lock, and it removes
 * it only if the lock still holds exactly that content. Every claim's content is unique, so a lock
 * claimed afresh in the meantime (by a live holder) has other content and stays, and two claimants
 * can never each remove the other's fresh lock.
 *
 * A claimant killed while holding a steal file leaves it behind; that file is a lock like any other
 * and is taken over the same way (its own steal file), so a crash at any moment blocks nobody.
 */
export async function takeOverLock(lock: string, options: TakeOverOptions): Promise<boolean> {
  const text = await readFile(lock, 'utf8').catch(() => undefined);
  if (text === undefined || !(await contentGone(lock, text, options))) return false;
  const steal = stealPath(lock, text);
  if (!(await claimLock(steal, lockContent()))) {
    // Another claimant is taking it over, or died doing so: then its steal file goes the same way.
    await takeOverLock(steal, { staleMs: options.staleMs });
    return false;
  }
  try {
    if ((await readFile(lock, 'utf8').catch(() => undefined)) !== text) return false;
    await unlink(lock);
    return true;
  } catch {
    return false;
  } finally {
    await unlink(steal).catch(() => {});
  }
}

/** The steal file that guards the removal of `lock` while it holds `content`. */
export function stealPath(lock: string, content: string): string {
  return `${lock}.steal-${createHash('sha256').update(content).digest('hex').slice(0, 16)}`;
}

/**
 * Remove what claimants of `lock` that are gone left behind: claim files (`.<lock>.<pid>.<n>.tmp`
 * and `.<steal file>.<pid>.<n>.tmp`, from one killed between writing its claim and linking it), and
 * steal files (from one killed mid take-over). A steal file names a lock content that is gone for
 * good; a live claimant that still holds one only finds that the lock it meant to remove is no
 * longer there. Run by whoever has just taken the lock.
 */
export async function removeDeadClaims(lock: string): Promise<void> {
  const dir = dirname(lock);
  const prefix = `${basename(lock)}.steal-`;
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const name of names) {
    const claim = name.startsWith(`.${basename(lock)}.`) ? /\.(\d+)\.\d+\.tmp$/.exec(name) : null;
    if (claim) {
      const pid = Number(claim[1]);
      if (pid !== process.pid && !holderAlive({ pid, start: undefined })) await unlink(join(dir, name)).catch(() => {});
      continue;
    }
    if (!name.startsWith(prefix)) continue;
    const path = join(dir, name);
    const text = await readFile(path, 'utf8').catch(() => undefined);
    const holder = text === undefined ? undefined : parseHolder(text);
    if (holder && !holderAlive(holder)) await unlink(path).catch(() => {});
  }
}

/** A lock that is released only while it still holds this claim's content. */
export interface HeldLock {
  readonly path: string;
  readonly content: string;
  /**
   * Throw a ConflictError unless the lock still holds this claim's content. A holder that was held
   * up past the lock's stale age (a stalled disk, a paused process) has had its lock taken over,
   * and another writer may have written since: a file it replaces now would undo that write.
   */
  confirm(): Promise<void>;
  /** Remove the lock if it is still this claim's (a lock taken over as stale is another's now). Idempotent. */
  release(): Promise<void>;
}

export interface AcquireOptions {
  /** Wait this long for a live holder, then throw a ConflictError naming `what`. */
  readonly waitMs: number;
  readonly staleMs: number;
  readonly what: string;
}

/**
 * Take `lock`, waiting for a live holder. A writer killed mid-write leaves its lock behind: if its
 * process is gone, the lock is taken over at once instead of after it goes stale. The lock is
 * refreshed while held (see heldLock), so only a holder that stopped running for `staleMs` loses
 * it; one that resumes finds that out with HeldLock.confirm before it writes.
 */
export async function acquireLock(lock: string, { waitMs, staleMs, what }: AcquireOptions): Promise<HeldLock> {
  await mkdir(dirname(lock), { recursive: true, mode: 0o700 });
  const deadline = Date.now() + waitMs;
  const content = lockContent();
  for (let delay = 5; ; delay = Math.min(delay * 2, 100)) {
    if (await claimLock(lock, content)) {
      await removeDeadClaims(lock);
      return heldLock(lock, content, staleMs / 3);
    }
    if (await takeOverLock(lock, { staleMs })) continue;
    if (Date.now() > deadline) throw new ConflictError(`${what} is locked by another writer (${lock})`);
    await sleep(delay + randomInt(delay));
  }
}

/**
 * A claim of `lock` with `content`. With `refreshMs`, the holder touches its lock that often while
 * it holds it: a lock is judged stale by its age (a holder on another host, or one whose pid answers
 * for another program), and a live holder whose work outlasts the stale age (a slow disk) would
 * otherwise have its lock taken over from under it.
 */
export function heldLock(lock: string, content: string, refreshMs?: number): HeldLock {
  let released = false;
  const mine = async () => (await readFile(lock, 'utf8').catch(() => undefined)) === content;
  const refresh = async () => {
    if (!(await mine())) return;
    const now = new Date();
    await utimes(lock, now, now).catch(() => {});
  };
  const timer = refreshMs !== undefined && Number.isFinite(refreshMs) && refreshMs > 0 ? setInterval(() => void refresh(), refreshMs) : undefined;
  timer?.unref();
  return {
    path: lock,
    content,
    confirm: async () => {
      if (!(await mine())) throw new ConflictError(`the lock ${lock} was taken over by another writer while this one held it past its stale age; nothing was written, try again`);
    },
    release: async () => {
      if (released) return;
      released = true;
      clearInterval(timer);
      if (await mine()) await unlink(lock).catch(() => {});
    },
  };
}

/**
 * Run `fn` holding `<path>.lock` (see acquireLock), for a read-modify-write of the file at `path`;
 * `fn` is given the lock, to confirm it still holds it before it replaces the file.
 * `lockFailed` may turn a file-system error from taking the lock into a plainer one.
 */
export async function withFileLock<T>(path: string, options: AcquireOptions & { readonly lockFailed?: (err: unknown) => unknown }, fn: (held: HeldLock) => Promise<T>): Promise<T> {
  let held: HeldLock;
  try {
    held = await acquireLock(`${path}.lock`, options);
  } catch (err) {
    throw options.lockFailed ? options.lockFailed(err) : err;
  }
  try {
    return await fn(held);
  } finally {
    await held.release();
  }
}

/** The holder a lock's content names; undefined when it names none (a lock from no version of egress). */
export function parseHolder(text: string): Holder | undefined {
  // `<pid>` alone is the store lock of earlier versions; `<pid> <start>` the audit lock's.
  const match = /^(\d+)(?: (\d+|-))?(?: [0-9a-f]+)?\n?$/.exec(text);
  if (!match) return undefined;
  const pid = Number(match[1]);
  return Number.isSafeInteger(pid) && pid > 0 ? { pid, start: match[2] === undefined || match[2] === '-' ? undefined : match[2] } : undefined;
}

/**
 * Is this holder's process still running on this machine (and the same process, where start times
 * are known)? A zombie (exited, not yet reaped by its parent: a parent that never reaps, or a
 * container's pid 1 that does not) still answers signal 0, but holds nothing any more: it is gone.
 */
export function holderAlive(holder: Holder): boolean {
  try {
    process.kill(holder.pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const stat = procStat(holder.pid);
  if (stat && (stat.state === 'Z' || stat.state === 'X')) return false;
  return holder.start === undefined || stat === undefined || stat.start === holder.start;
}

/** Has the holder of a lock with this content gone (or the lock gone stale)? */
async function contentGone(lock: string, text: string, { staleMs, ownPidIsPrevious = false, unreadableIsGone = false }: TakeOverOptions): Promise<boolean> {
  const age = await stat(lock).then((s) => Date.now() - s.mtimeMs, () => 0);
  if (age > staleMs) return true;
  const holder = parseHolder(text);
  if (!holder) return unreadableIsGone;
  if (ownPidIsPrevious && holder.pid === process.pid) return true;
  return !holderAlive(holder);
}

/** Start time of a process in clock ticks since boot (Linux /proc); undefined elsewhere. */
export function startTime(pid: number): string | undefined {
  return procStat(pid)?.start;
}

/** A process's state letter and start time, from /proc/<pid>/stat (Linux); undefined elsewhere. */
function procStat(pid: number): { readonly state: string | undefined; readonly start: string | undefined } | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may contain spaces and parentheses): state is field 3, starttime 22.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { state: fields[0], start: fields[19] };
  } catch {
    return undefined;
  }
}
