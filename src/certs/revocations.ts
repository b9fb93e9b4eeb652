import { watch as fsWatch, type FSWatcher } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { UserError } from '../errors.ts';
import { withFileLock } from '../store/lock-file.ts';
import { replaceFile } from '../store/temp-files.ts';

/** Revoked caller certificates: serial numbers (lower-case hex) in certs/revoked.json. */
export const REVOKED_FILE = 'revoked.json';

/** How long a CLI run waits for another's lock on revoked.json or issued.json, and when a lock is stale. */
export const CERTS_LOCK = { waitMs: 10_000, staleMs: 60_000, what: 'the certificate lists in EGRESS_CERTS' } as const;

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

/**
 * The revocation list; empty when the file does not exist (nothing was ever revoked). A file that
 * exists but cannot be read as a list throws: treated as empty, it would lift every revocation.
 */
export async function readRevoked(certsDir: string): Promise<RevokedDoc> {
  const doc = await readCertsList(join(certsDir, REVOKED_FILE), { list: 'a revocation list', unknown: 'which caller certificates are revoked' }, (d) => {
    const serials = (d as Partial<RevokedDoc> | undefined)?.serials;
    return typeof serials === 'object' && serials !== null && !Array.isArray(serials);
  });
  return { serials: Object.assign(Object.create(null), (doc as RevokedDoc | undefined)?.serials) as RevokedDoc['serials'] };
}

/**
 * One of the certificate lists in EGRESS_CERTS (revoked.json, issued.json), parsed; undefined when
 * the file does not exist. One that exists but cannot be read, or is not `valid`, throws, naming
 * what is unknown without it: read as empty, the next write would drop everything in it.
 */
export async function readCertsList(path: string, what: { readonly list: string; readonly unknown: string }, valid: (doc: unknown) => boolean): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new UserError(`${path} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'}): ${what.unknown} is unknown`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    doc = undefined;
  }
  if (!valid(doc)) throw new UserError(`${path} is damaged (not ${what.list}): ${what.unknown} is unknown; restore it from a backup`);
  return doc;
}

/**
 * Add serials to the list; a damaged list is not overwritten (its revocations would be lost): that
 * fails. The read and the write hold the list's lock: two revoke-caller runs at once each wrote
 * the list they had read plus their own serials, and the last rename dropped the other's.
 */
export async function addRevoked(certsDir: string, serials: readonly string[], caller: string): Promise<void> {
  const path = join(certsDir, REVOKED_FILE);
  await withFileLock(path, CERTS_LOCK, async (held) => {
    const doc = await readRevoked(certsDir);
    const now = new Date().toISOString();
    for (const s of serials) doc.serials[s.toLowerCase()] = { caller, revoked_at: now };
    // Checked just before the rename, as the store's and the keyring's writers do: a writer held up
    // past the lock's stale age has lost it, and writing back what it read would undo the
    // revocations made since.
    await replaceFile(path, `${JSON.stringify(doc, null, 2)}\n`, 0o644, undefined, () => held.confirm());
  });
}


/**
 * The listener's live view of revoked serials, re-read on change (and polled, in case a watch is
 * missed). A list that cannot be read at start stops the start; later, the last good list stays in
 * force and `onDamaged` is told (once, until the file reads again).
 */
export class RevocationList {
  readonly #dir: string;
  #serials = new Set<string>();
  #timer: NodeJS.Timeout | undefined;
  #watcher: FSWatcher | undefined;
  #damaged = false;
  /**
   * Reloads overlap (a watch event, the poll): each is numbered when it starts, and one whose read
   * ends after a later one's was applied is dropped. Applied as they ended, an earlier read of the
   * file (the list before a revocation) could land last and lift the revocation until the next poll.
   */
  #started = 0;
  #applied = 0;
  readonly #onChange: (serials: ReadonlySet<string>) => void;
  readonly #onDamaged: (reason: string) => void;

  constructor(certsDir: string, onChange: (serials: ReadonlySet<string>) => void, onDamaged: (reason: string) => void = () => {}) {
    this.#dir = certsDir;
    this.#onChange = onChange;
    this.#onDamaged = onDamaged;
  }

  has(serial: string): boolean {
    return this.#serials.has(serialKey(serial));
  }

  async start(): Promise<void> {
    this.#apply(await readRevoked(this.#dir));
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
    const reload = ++this.#started;
    let doc: RevokedDoc | Error;
    try {
      doc = await readRevoked(this.#dir);
    } catch (err) {
      doc = err as Error;
    }
    if (reload < this.#applied) return;
    this.#applied = reload;
    if (doc instanceof Error) {
      if (!this.#damaged) this.#onDamaged(doc.message);
      this.#damaged = true;
      return;
    }
    this.#damaged = false;
    this.#apply(doc);
  }

  #apply(doc: RevokedDoc): void {
    const next = new Set(Object.keys(doc.serials).map(serialKey));
    if (next.size === this.#serials.size && [...next].every((s) => this.#serials.has(s))) return;
    this.#serials = next;
    this.#onChange(next);
  }

  close(): void {
    clearInterval(this.#timer);
    this.#watcher?.close();
  }
}
