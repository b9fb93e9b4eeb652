import { randomInt } from 'node:crypto';
import { readFileSync, unlinkSync } from 'node:fs';
import { mkdir, readFile, stat, unlink } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { UserError } from '../errors.ts';
import { claimLock, takeOverLock } from '../store/lock-file.ts';
import { removeStaleTemps } from '../store/temp-files.ts';

/**
 * One writer per audit file. Each line carries the hash of the line before it, so two processes
 * appending to one file would break the chain at every interleaving. `egress serve` takes
 * `<audit log>.lock` (its pid and the process's start time) for as long as it runs; a second
 * process given the same file refuses to start while the holder is alive.
 *
 * The lock appears with its content already in it (written aside, then linked into place, which
 * fails if a lock exists), so a process killed at any moment never leaves an empty lock. A lock
 * whose holder is gone (killed, crashed, or a pid since reused by another program: the start time
 * tells them apart on Linux) is taken over, one claimant at a time (see takeOverLock).
 *
 * The check sees processes of this machine (one pid namespace): instances in separate containers
 * sharing a volume must still be given separate files.
 */

/** A steal file older than this, left by a claimant that died mid take-over, is removed. */
const STEAL_STALE_MS = 10_000;
/** Give up (with an error) after this long without taking the lock or finding a live holder. */
const ACQUIRE_MS = STEAL_STALE_MS + 5_000;

export interface AuditLock {
  readonly path: string;
  /** Remove the lock, if it is still this process's. Idempotent. */
  release(): Promise<void>;
}

interface Holder {
  readonly pid: number;
  /** Process start time in clock ticks since boot (/proc/<pid>/stat field 22), when known. */
  readonly start: string | undefined;
}

/**
 * Take the audit file's lock, or throw a UserError naming the live holder. Nothing to lock (undefined)
 * when the audit log is stdout (`-`) or not a regular file (a device, a pipe). Other file-system
 * errors (a read-only folder) are thrown as they are.
 */
export async function lockAuditLog(auditLog: string): Promise<AuditLock | undefined> {
  if (auditLog === '-') return undefined;
  const existing = await stat(auditLog).catch(() => undefined);
  if (existing && !existing.isFile()) return undefined;
  await mkdir(dirname(auditLog), { recursive: true, mode: 0o700 });
  const lock = `${auditLog}.lock`;
  const content = `${process.pid} ${startTime(process.pid) ?? '-'}\n`;
  const deadline = Date.now() + ACQUIRE_MS;
  for (let attempt = 0; attempt < 1000 && Date.now() < deadline; attempt++) {
    const linked = await claimLock(lock, content);
    if (linked) {
      // A claimant killed between writing its claim and linking it leaves the claim behind.
      await removeStaleTemps(dirname(lock), basename(lock));
      return held(lock, content);
    }
    const holder = await readHolder(lock);
    if (holder && alive(holder)) {
      throw new UserError(`the audit log ${auditLog} is in use by another running egress process (pid ${holder.pid}; lock file ${lock}): every instance needs its own EGRESS_AUDIT_LOG, since one file has one writer`);
    }
    await takeOverLock(lock, async () => {
      const current = await readHolder(lock);
      return !current || !alive(current);
    }, STEAL_STALE_MS);
    await new Promise((r) => setTimeout(r, 20 + randomInt(40)));
  }
  throw new UserError(`could not take the audit log lock ${lock}: it kept changing hands`);
}

function held(lock: string, content: string): AuditLock {
  let released = false;
  // A process that exits without closing (process.exit on a fatal error) still removes its lock.
  const onExit = () => {
    if (released) return;
    released = true;
    try {
      if (readFileSync(lock, 'utf8') === content) unlinkSync(lock);
    } catch {
      // gone already
    }
  };
  process.once('exit', onExit);
  return {
    path: lock,
    release: async () => {
      if (released) return;
      released = true;
      process.off('exit', onExit);
      if ((await readFile(lock, 'utf8').catch(() => undefined)) === content) await unlink(lock).catch(() => {});
    },
  };
}

/** The lock's holder; undefined when the lock is gone or unreadable (no live holder writes such a lock). */
async function readHolder(lock: string): Promise<Holder | undefined> {
  const text = await readFile(lock, 'utf8').catch(() => undefined);
  const match = text === undefined ? null : /^(\d+) (\d+|-)\n$/.exec(text);
  if (!match) return undefined;
  const pid = Number(match[1]);
  return Number.isSafeInteger(pid) && pid > 0 ? { pid, start: match[2] === '-' ? undefined : match[2] } : undefined;
}

function alive(holder: Holder): boolean {
  // This process holds no lock before it takes one: a lock naming our pid is a previous run's
  // (a container's pid 1 comes back as pid 1).
  if (holder.pid === process.pid) return false;
  try {
    process.kill(holder.pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  // Alive, but is it the same process? A pid reused by another program has another start time.
  const start = startTime(holder.pid);
  return holder.start === undefined || start === undefined || start === holder.start;
}

/** Start time of a process in clock ticks since boot (Linux /proc); undefined elsewhere. */
function startTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may contain spaces and parentheses): state is field 3, starttime 22.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}
