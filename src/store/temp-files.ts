import { mkdir, open, readdir, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { holderAlive } from './lock-file.ts';

let replaces = 0;

/** One file of a replaceFiles: its path, its new text, and the mode it gets (whatever the umask). */
export interface Replacement {
  readonly path: string;
  readonly text: string;
  readonly mode: number;
}

/**
 * Replace a file whole, so that a reader, and the file after a crash or a power cut, has the old
 * text or the new one, never a part: a hidden temp file beside it (`mode`), fsync, rename,
 * directory fsync. A failure before the rename removes the temp file, leaves the file as it was,
 * and is thrown as `unchanged` makes it (the store's and the keyring's say so in their own words);
 * a temp file a killed writer left is removed by the next replace of the same file.
 */
export async function replaceFile(path: string, text: string, mode: number, unchanged: (err: unknown) => unknown = (err) => err, fence?: () => Promise<void>): Promise<void> {
  await replaceFiles([{ path, text, mode }], unchanged, fence);
}

/**
 * replaceFile for files that belong together (a CA's key and certificate): every one is written in
 * full (temp file, fsync) before any takes its name, so a failure on the way (a full disk) leaves
 * them all as they were, thrown as `unchanged` makes it. Only a crash between the renames, a
 * moment, leaves some new and some old. `fence`, when given, runs after the last fsync and before
 * the first rename: a writer that must still hold its lock checks it there (HeldLock.confirm), and
 * what it throws leaves the files as they were too.
 */
export async function replaceFiles(files: readonly Replacement[], unchanged: (err: unknown) => unknown = (err) => err, fence?: () => Promise<void>): Promise<void> {
  const staged: { readonly tmp: string; readonly path: string }[] = [];
  let renamed = 0;
  try {
    for (const { path, text, mode } of files) {
      const dir = dirname(path);
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await removeStaleTemps(dir, basename(path));
      const tmp = join(dir, `.${basename(path)}.${process.pid}.${++replaces}.tmp`);
      const handle = await open(tmp, 'wx', mode);
      staged.push({ tmp, path });
      try {
        // The mode asked for, whatever the umask (a certificate that others must read is 0644).
        await handle.chmod(mode);
        await handle.writeFile(text);
        await handle.sync();
      } finally {
        await handle.close();
      }
    }
    await fence?.();
    for (const { tmp, path } of staged) {
      await rename(tmp, path);
      renamed++;
    }
  } catch (err) {
    for (const { tmp } of staged.slice(renamed)) await unlink(tmp).catch(() => {});
    throw renamed === 0 ? unchanged(err) : err;
  }
  for (const dir of new Set(files.map((f) => dirname(f.path)))) {
    const folder = await open(dir, 'r');
    try {
      await folder.sync();
    } finally {
      await folder.close();
    }
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
