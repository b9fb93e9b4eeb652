import { statSync, watch, type FSWatcher } from 'node:fs';
import type { Logger } from '../observe/log.ts';
import type { CompiledConfig } from './compile-routes.ts';
import { ConfigError, formatProblem, loadRoutes } from './load-routes.ts';

export interface ReloadOutcome {
  readonly ok: boolean;
  readonly errors: readonly string[];
}

/**
 * Holds the live route configuration. A reload builds a whole new frozen config and swaps one
 * reference; an invalid folder is rejected whole and the last good configuration stays live.
 */
export class RouteReloader {
  readonly dir: string;
  readonly #log: Logger;
  readonly #onSwap: (config: CompiledConfig, ok: boolean) => void;
  #config: CompiledConfig;
  #lastError: { at: string; errors: readonly string[] } | undefined;
  #watcher: FSWatcher | undefined;
  /** The folder the watcher is on (device and inode), to notice the path now naming another folder. */
  #watched: string | undefined;
  #identityCheck: NodeJS.Timeout | undefined;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<ReloadOutcome> | undefined;
  #again = false;

  constructor(dir: string, initial: CompiledConfig, log: Logger, onSwap: (config: CompiledConfig, ok: boolean) => void) {
    this.dir = dir;
    this.#config = initial;
    this.#log = log;
    this.#onSwap = onSwap;
  }

  get config(): CompiledConfig {
    return this.#config;
  }

  status(): { files: number; routes: number; loaded_at: string; last_reload_error?: { at: string; errors: readonly string[] } } {
    return {
      files: this.#config.files.length,
      routes: this.#config.routes.length,
      loaded_at: this.#config.loadedAt.toISOString(),
      ...(this.#lastError ? { last_reload_error: this.#lastError } : {}),
    };
  }

  /**
   * Watch the folder; editors write in several steps, so changes are debounced. A watch follows the
   * folder, not its path: a deploy that moves a new folder into place (mv routes.new routes, or a
   * symlink swapped to a new release) would leave it on the old one, and later edits would never
   * reload. The path is checked every second, and the watch moves to the folder it now names.
   */
  watch(debounceMs = 150, identityCheckMs = 1_000): void {
    this.#arm(debounceMs);
    this.#identityCheck = setInterval(() => {
      if (identityOf(this.dir) === this.#watched) return;
      this.#arm(debounceMs);
      void this.reload('folder replaced');
    }, identityCheckMs);
    this.#identityCheck.unref();
  }

  #arm(debounceMs: number): void {
    this.#watcher?.close();
    this.#watcher = undefined;
    this.#watched = identityOf(this.dir);
    // Nothing to watch until the folder is back; the identity check arms the watch when it is.
    if (this.#watched === undefined) return;
    try {
      this.#watcher = watch(this.dir, { persistent: false }, () => {
        clearTimeout(this.#timer);
        this.#timer = setTimeout(() => void this.reload('change'), debounceMs);
      });
      this.#watcher.on('error', (err: NodeJS.ErrnoException) => this.#log.warn({ code: err.code }, 'route folder watch failed; SIGHUP still reloads'));
    } catch (err) {
      this.#log.warn({ code: (err as NodeJS.ErrnoException).code }, 'cannot watch the route folder; SIGHUP still reloads');
    }
  }

  /** Reload now. Concurrent triggers coalesce into one more reload after the running one. */
  reload(trigger: string): Promise<ReloadOutcome> {
    if (this.#running) {
      this.#again = true;
      return this.#running;
    }
    this.#running = (async () => {
      let outcome: ReloadOutcome;
      do {
        this.#again = false;
        outcome = await this.#reloadOnce(trigger);
      } while (this.#again);
      return outcome;
    })().finally(() => {
      this.#running = undefined;
    });
    return this.#running;
  }

  async #reloadOnce(trigger: string): Promise<ReloadOutcome> {
    try {
      const next = await loadRoutes(this.dir);
      this.#config = next;
      this.#lastError = undefined;
      this.#log.info({ trigger, routes: next.routes.map((r) => r.name) }, 'routes reloaded');
      this.#onSwap(next, true);
      return { ok: true, errors: [] };
    } catch (err) {
      const errors = err instanceof ConfigError ? err.problems.map(formatProblem) : [(err as Error).message];
      this.#lastError = { at: new Date().toISOString(), errors };
      this.#log.error({ trigger, errors }, 'route reload rejected; the last good configuration stays live');
      this.#onSwap(this.#config, false);
      return { ok: false, errors };
    }
  }

  close(): void {
    clearTimeout(this.#timer);
    clearInterval(this.#identityCheck);
    this.#watcher?.close();
  }
}

/** "device:inode" of the folder a path names now, or undefined when there is none. */
function identityOf(dir: string): string | undefined {
  try {
    const info = statSync(dir, { bigint: true });
    return info.isDirectory() ? `${info.dev}:${info.ino}` : undefined;
  } catch {
    return undefined;
  }
}
