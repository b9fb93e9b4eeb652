import { statSync, watch, type FSWatcher } from 'node:fs';
import type { Logger } from '../observe/log.ts';

/**
 * A watch on what a path names now: the routes folder, a file a route names (upstream_ca), or one
 * of the TLS listener's files (EGRESS_TLS_CERT, EGRESS_TLS_KEY, EGRESS_CLIENT_CA).
 * fs.watch follows what it was opened on, not the path: a deploy that moves a new folder into
 * place (mv routes.new routes), a file renamed over the old one (an atomic write), or a swapped
 * symlink (a mounted secret's new release) would leave it on the old one, and later changes would
 * never be seen. `moved()` compares the path's device and inode with the watched ones and moves
 * the watch to what the path names now, also when it comes back after vanishing.
 */
export class PathWatch {
  readonly path: string;
  /** What the log says when the watch cannot be made or fails. */
  readonly #what: { readonly failed: string; readonly cannot: string };
  readonly #folder: boolean;
  readonly #onChange: () => void;
  readonly #log: Logger;
  #watcher: FSWatcher | undefined;
  /** "device:inode" of what the watch is on; undefined while the path names nothing. */
  #identity: string | undefined;

  /** `name` is what the log calls it ("the route folder", "a file a route names", "a TLS listener file"). */
  constructor(path: string, kind: 'folder' | 'file', onChange: () => void, log: Logger, name = kind === 'folder' ? 'the route folder' : 'a file a route names') {
    this.path = path;
    this.#folder = kind === 'folder';
    this.#what = { failed: `watch on ${name} failed; SIGHUP still reloads`, cannot: `cannot watch ${name}; SIGHUP still reloads` };
    this.#onChange = onChange;
    this.#log = log;
    this.#arm();
  }

  /** Whether the path now names something other than what was watched; the watch has then moved to it. */
  moved(): boolean {
    if (identityOf(this.path, this.#folder) === this.#identity) return false;
    this.#arm();
    return true;
  }

  #arm(): void {
    this.#watcher?.close();
    this.#watcher = undefined;
    this.#identity = identityOf(this.path, this.#folder);
    // Nothing to watch until the path names something again; moved() arms the watch when it does.
    if (this.#identity === undefined) return;
    const facts = this.#folder ? {} : { file: this.path };
    try {
      this.#watcher = watch(this.path, { persistent: false }, (event) => {
        // A file's own inode was removed or moved away (an rm, a rename over the path): this watch
        // sees no more changes. Move it now, not at the next check: a file written at once under
        // the same name may get the same inode number back, and the check would take it for the
        // one already watched.
        if (event === 'rename' && !this.#folder) this.#arm();
        this.#onChange();
      });
      this.#watcher.on('error', (err: NodeJS.ErrnoException) => this.#log.warn({ ...facts, code: err.code }, this.#what.failed));
    } catch (err) {
      this.#log.warn({ ...facts, code: (err as NodeJS.ErrnoException).code }, this.#what.cannot);
    }
  }

  close(): void {
    this.#watcher?.close();
    this.#watcher = undefined;
  }
}

/** "device:inode" of what a path names now (through symlinks), or undefined when there is none (or not a folder where one is wanted). */
function identityOf(path: string, folder: boolean): string | undefined {
  try {
    const info = statSync(path, { bigint: true });
    return !folder || info.isDirectory() ? `${info.dev}:${info.ino}` : undefined;
  } catch {
    return undefined;
  }
}
