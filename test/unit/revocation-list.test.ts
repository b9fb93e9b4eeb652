import { execFileSync } from 'node:child_process';
import { constants } from 'node:fs';
import { link, open, rename, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { REVOKED_FILE, RevocationList } from '../../src/certs/revocations.ts';
import { useTempDirs } from '../helpers/temp-dir.ts';

const tempDir = useTempDirs('egress-revocations-');

const listOf = (serials: readonly string[]) => JSON.stringify({ serials: Object.fromEntries(serials.map((s) => [s, { caller: 'svc', revoked_at: '2026-01-01T00:00:00.000Z' }])) });

/** The writing end of a FIFO, opened once a reader waits on it (before that, a non-blocking open fails with ENXIO). */
async function writerOnceRead(fifo: string): Promise<FileHandle> {
  for (;;) {
    try {
      return await open(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENXIO') throw err;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}

describe('RevocationList', () => {
  it('a reload that started later wins: an earlier read of revoked.json that ends after it is not applied', async () => {
    const dir = await tempDir();
    const path = join(dir, REVOKED_FILE);
    const applied: string[][] = [];
    const list = new RevocationList(dir, (serials) => applied.push([...serials].sort()));
    // The earlier read finds a FIFO in revoked.json's place: it ends when the test writes to it.
    execFileSync('mkfifo', [path]);
    await link(path, join(dir, 'earlier-read'));
    const earlier = list.reload();
    const writer = await writerOnceRead(join(dir, 'earlier-read'));
    try {
      // Meanwhile a revocation replaces revoked.json, and a later reload reads it at once.
      await writeFile(join(dir, 'next.json'), listOf(['aa', 'bb']));
      await rename(join(dir, 'next.json'), path);
      await list.reload();
      expect(list.has('bb')).toBe(true);
      // The earlier read ends now, with the list as it was before the revocation.
      await writer.write(listOf(['aa']));
    } finally {
      await writer.close();
    }
    await earlier;
    expect(list.has('bb'), 'the later revocation still in force').toBe(true);
    expect(applied).toEqual([['aa', 'bb']]);
  });
});
