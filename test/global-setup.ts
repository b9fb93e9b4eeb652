import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * One temporary folder per test run: the data folders, master keys, stores and audit logs that the
 * tests make (with os.tmpdir(), in the workers and in every process they start) go under it, and it
 * is removed when the run ends instead of leaving a hundred-odd folders in /tmp each time.
 */
export default function setup(): () => void {
  const dir = mkdtempSync(join(tmpdir(), 'egress-tests-'));
  // Others may pass through (the image test runs as nobody below it) but not list it; each test's own
  // folder is 0700.
  chmodSync(dir, 0o711);
  process.env.TMPDIR = dir;
  return () => rmSync(dir, { recursive: true, force: true });
}
