import { mkdir, open, readdir, rename, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { holderAlive } from './lock-file.ts';

let replaces = 0;

/**
 * Replace a file whole, so that a reader, and the file after a crash or a power cut, has the old
 * text or the new one, never a part: a hidden temp file beside it (`mode`), fsync, rename,
 * directory fsync. A failure before the rename removes the temp file, leaves the file as it was,
 * and is thrown as `unchanged` makes it (the store's and the keyring's say so in their own words);
 * a temp file a killed writer left is removed by the next replace of the same file.
 */
export async function replaceFile(path: string, text: string, mode: number, unchanged: (err: unknown) => unknown = (err) => err): Promise<void> {
  const dir = dirname(path);
  const tmp = join(dir, `.${basename(path)}.${process.pid}.${++replaces}.tmp`);
  let handle: FileHandle | undefined;
  let made = false;
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await removeStaleTemps(dir, basename(path));
    handle = await open(tmp, 'wx', mode);
    made = true;
    await handle.writeFile(text);
    await handle.sync();
    await handle.close();
    handle = undefined;
    await rename(tmp, path);
  } catch (err) {
    await handle?.close().catch(() => {});
    if (made) await unlink(tmp).catch(() => {});
    throw unchanged(err);
  }
  const folder = await open(dir, 'r');
  try {
    await folder.sync();
  } finally {
    await folder.close();
  }
}

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
    if (!pid || pid === process.pid || holderAlive({ pid, start: undefined })) continue;
    await unlink(join(dir, name)).catch(() => {});
  }
}
