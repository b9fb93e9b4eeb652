import { randomInt } from 'node:crypto';
import { readFileSync, unlinkSync } from 'node:fs';
import { mkdir, readFile, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { UserError } from '../errors.ts';
import { claimLock, heldLock, holderAlive, lockContent, parseHolder, removeDeadClaims, takeOverLock } from '../store/lock-file.ts';

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

/** Give up (with an error) after this long without taking the lock or finding a live holder. */
const ACQUIRE_MS = 15_000;

export interface AuditLock {
  readonly path: string;
  /** Remove the lock, if it is still this process's. Idempotent. */
  release(): Promise<void>;
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
  const content = lockContent();
  const deadline = Date.now() + ACQUIRE_MS;
  for (let attempt = 0; attempt < 1000 && Date.now() < deadline; attempt++) {
    if (await claimLock(lock, content)) {
      // Claims and steal files left by claimants killed on the way.
      await removeDeadClaims(lock);
      return held(lock, content);
    }
    const text = await readFile(lock, 'utf8').catch(() => undefined);
    const holder = text === undefined ? undefined : parseHolder(text);
    if (holder && holder.pid !== process.pid && holderAlive(holder)) {
      throw new UserError(`the audit log ${auditLog} is in use by another running egress process (pid ${holder.pid}; lock file ${lock}): every instance needs its own EGRESS_AUDIT_LOG, since one file has one writer`);
    }
    // This process holds no lock before it takes one: a lock naming our pid is a previous run's.
    // Never by age: a live holder keeps its lock for as long as it runs.
    if (await takeOverLock(lock, { staleMs: Infinity, ownPidIsPrevious: true, unreadableIsGone: true })) continue;
    await new Promise((r) => setTimeout(r, 20 + randomInt(40)));
  }
  throw new UserError(`could not take the audit log lock ${lock}: it kept changing hands`);
}

function held(lock: string, content: string): AuditLock {
  const heldLock_ = heldLock(lock, content);
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
      await heldLock_.release();
    },
  };
}
