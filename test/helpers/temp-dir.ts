import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach } from 'vitest';

/**
 * Call at the top of a test file (or describe block): returns a function that makes a fresh
 * directory under os.tmpdir(), and removes every directory it made after each test.
 */
export function useTempDirs(label = 'egress-test-'): () => Promise<string> {
  const made: string[] = [];
  afterEach(async () => {
    await Promise.all(made.splice(0).map((dir) => rm(dir, { recursive: true, force: true })));
  });
  return async () => {
    const dir = await mkdtemp(join(tmpdir(), label));
    made.push(dir);
    return dir;
  };
}
