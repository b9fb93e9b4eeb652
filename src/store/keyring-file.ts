import { watch as fsWatch, type FSWatcher } from 'node:fs';
import { stat } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import type { Logger } from '../observe/log.ts';
import { readKeyring, type Keyring } from './keyring.ts';

const POLL_MS = 500;

/**
 * The live keyring. `master-key rotate` adds a key and re-wraps data keys with it while proxies
 * run, so a proxy re-reads the file when it changes; a bad new file is refused and the last good
 * keyring stays in use (a record wrapped by a key it lacks then fails closed, 503). A refusal is
 * handed to `onRejected` (the reload_rejected alert), with the reason (which never quotes the file).
 */
export class KeyringFile {
  readonly path: string;
  readonly #log: Logger;
  readonly #onRejected: (reason: string) => void;
  #current: Keyring;
  #sig = '';
  #timer: NodeJS.Timeout | undefined;
  #watcher: FSWatcher | undefined;

  constructor(path: string, initial: Keyring, log: Logger, onRejected: (reason: string) => void) {
    this.path = path;
    this.#current = initial;
    this.#log = log;
    this.#onRejected = onRejected;
  }

  get current(): Keyring {
    return this.#current;
  }

  async start(): Promise<void> {
    // Read once more with the signature taken: a `master-key rotate` finishing between the caller's
    // first read and this point was otherwise the starting signature, and its key never loaded (the
    // records it re-wrapped failed closed until the next keyring change).
    await this.check(false);
    this.#timer = setInterval(() => void this.check(), POLL_MS);
    this.#timer.unref();
    try {
      this.#watcher = fsWatch(dirname(this.path), { persistent: false }, (_e, name) => {
        if (name === basename(this.path)) void this.check();
      });
      this.#watcher.on('error', () => this.#watcher?.close());
    } catch {
      // Polling alone is enough.
    }
  }

  async check(announce = true): Promise<void> {
    const sig = await this.#signature();
    if (sig === this.#sig) return;
    this.#sig = sig;
    try {
      const previous = this.#current;
      this.#current = await readKeyring(this.path);
      if (announce || JSON.stringify(this.#current.versions()) !== JSON.stringify(previous.versions())) this.#log.info({ active_key_version: this.#current.active, versions: this.#current.versions().map((v) => v.version) }, 'master key file reloaded');
    } catch (err) {
      this.#onRejected((err as Error).message);
    }
  }

  async #signature(): Promise<string> {
    try {
      const s = await stat(this.path);
      return `${s.ino}:${s.size}:${s.mtimeMs}:${s.mode}`;
    } catch {
      return 'missing';
    }
  }

  close(): void {
    clearInterval(this.#timer);
    this.#watcher?.close();
  }
}
