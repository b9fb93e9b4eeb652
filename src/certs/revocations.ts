import { watch as fsWatch, type FSWatcher } from 'node:fs';
import { mkdir, open, readFile, rename } from 'node:fs/promises';
import { dirname, join } from 'node:path';

/** Revoked caller certificates: serial numbers (lower-case hex) in certs/revoked.json. */
export const REVOKED_FILE = 'revoked.json';

/**
 * A serial number as the revocation list compares it: lower-case hex without leading zeros. Node's
 * X509Certificate.serialNumber drops leading zero bytes that an issued serial ("00…") may have kept.
 */
export function serialKey(hex: string): string {
  return hex.toLowerCase().replace(/^0+(?=.)/, '');
}

interface RevokedDoc {
  readonly serials: Record<string, { caller: string; revoked_at: string }>;
}

export async function readRevoked(certsDir: string): Promise<RevokedDoc> {
  try {
    const doc = JSON.parse(await readFile(join(certsDir, REVOKED_FILE), 'utf8')) as Partial<RevokedDoc>;
    return { serials: Object.assign(Object.create(null), doc.serials ?? {}) as RevokedDoc['serials'] };
  } catch {
    return { serials: Object.create(null) as RevokedDoc['serials'] };
  }
}

export async function addRevoked(certsDir: string, serials: readonly string[], caller: string): Promise<void> {
  const doc = await readRevoked(certsDir);
  const now = new Date().toISOString();
  for (const s of serials) doc.serials[s.toLowerCase()] = { caller, revoked_at: now };
  const path = join(certsDir, REVOKED_FILE);
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const tmp = `${path}.${process.pid}.tmp`;
  const handle = await open(tmp, 'w', 0o644);
  try {
    await handle.writeFile(`${JSON.stringify(doc, null, 2)}\n`);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(tmp, path);
}

/** The listener's live view of revoked serials, re-read on change (and polled, in case a watch is missed). */
export class RevocationList {
  readonly #dir: string;
  #serials = new Set<string>();
  #timer: NodeJS.Timeout | undefined;
  #watcher: FSWatcher | undefined;
  readonly #onChange: (serials: ReadonlySet<string>) => void;

  constructor(certsDir: string, onChange: (serials: ReadonlySet<string>) => void) {
    this.#dir = certsDir;
    this.#onChange = onChange;
  }

  has(serial: string): boolean {
    return this.#serials.has(serialKey(serial));
  }

  async start(): Promise<void> {
    await this.reload();
    this.#timer = setInterval(() => void this.reload(), 500);
    this.#timer.unref();
    try {
      this.#watcher = fsWatch(this.#dir, { persistent: false }, () => void this.reload());
      this.#watcher.on('error', () => this.#watcher?.close());
    } catch {
      // Polling covers it.
    }
  }

  async reload(): Promise<void> {
    const next = new Set(Object.keys((await readRevoked(this.#dir)).serials).map(serialKey));
    if (next.size === this.#serials.size && [...next].every((s) => this.#serials.has(s))) return;
    this.#serials = next;
    this.#onChange(next);
  }

  close(): void {
    clearInterval(this.#timer);
    this.#watcher?.close();
  }
}
