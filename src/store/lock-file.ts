import { randomInt } from 'node:crypto';
import { link, open, stat, unlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/**
 * Lock files with their holder's identity in them, shared by the file store's writer lock and the
 * audit log's one-writer lock.
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
