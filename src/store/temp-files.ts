import { readdir, unlink } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * A writer killed between writing its temp file and renaming it leaves the temp file behind: a
 * full copy of the store, or of the keyring. Remove those whose writer (pid in the name) is gone.
 */
export async function removeStaleTemps(dir: string, ...bases: string[]): Promise<void> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return;
  }
  const alternatives = bases.map((base) => base.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('|');
  const pattern = new RegExp(`^\\.(?:${alternatives})\\.(\\d+)\\.(?:\\d+\\.)?tmp$`);
  for (const name of names) {
    const pid = Number(pattern.exec(name)?.[1]);
    if (!pid || pid === process.pid || alive(pid)) continue;
    await unlink(join(dir, name)).catch(() => {});
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
