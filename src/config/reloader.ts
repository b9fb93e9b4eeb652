import type { Logger } from '../observe/log.ts';
import { unclaimedHosts, type CompiledConfig } from './compile-routes.ts';
import { changedSinceLoad, ConfigError, formatProblem, loadRoutes } from './load-routes.ts';
import { PathWatch } from './path-watch.ts';
import { Coalesced } from './coalesced.ts';

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
  #folder: PathWatch | undefined;
  /** Watches on the files the routes name, by resolved path. */
  readonly #files = new Map<string, PathWatch>();
  #debounceMs = 150;
  #identityCheck: NodeJS.Timeout | undefined;
  #timer: NodeJS.Timeout | undefined;
  readonly #reloads = new Coalesced<ReloadOutcome>();

  constructor(dir: string, initial: CompiledConfig, log: Logger, onSwap: (config: CompiledConfig, ok: boolean) => void) {
    this.dir = dir;
    this.#config = initial;
    this.#log = log;
    this.#onSwap = onSwap;
    warnUnclaimed(initial, log);
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
   * Watch the folder, and the files the routes name (upstream_ca), which may live outside it: a CA
   * bundle renewed at its path is trusted without a SIGHUP. Editors write in several steps, so
   * changes are debounced. Every second each path is checked for naming something new (a folder
   * or file moved into place, a swapped symlink, a file back after vanishing): the watch moves to
   * it, with a reload.
   */
  watch(debounceMs = 150, identityCheckMs = 1_000): void {
    this.#debounceMs = debounceMs;
    this.#folder = new PathWatch(this.dir, 'folder', () => this.#changed(), this.#log);
    this.#watchFiles(this.#config.namedFiles);
    this.#identityCheck = setInterval(() => {
      if (this.#folder!.moved()) void this.reload('folder replaced');
      let replaced = false;
      for (const file of this.#files.values()) replaced = file.moved() || replaced;
      if (replaced) void this.reload('file replaced');
    }, identityCheckMs);
    this.#identityCheck.unref();
    // An edit between the first load and now sent no event to watches armed just now.
    const initial = this.#config;
    void changedSinceLoad(initial).then((changed) => {
      if (changed && this.#folder && this.#config === initial) void this.reload('changed while starting');
    });
  }

  #changed(): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => void this.reload('change'), this.#debounceMs);
  }

  /**
   * Watch exactly these files. After a reload they are those of the live configuration and those
   * the attempt named: a file that vanished or turned invalid is still watched, and a reload
   * follows when it is fixed; so is a new path that an edit named before the file was there.
   */
  #watchFiles(paths: Iterable<string>): void {
    if (!this.#folder) return;
    const wanted = new Set(paths);
    for (const [path, watch] of this.#files) {
      if (wanted.has(path)) continue;
      watch.close();
      this.#files.delete(path);
    }
    for (const path of wanted) {
      if (!this.#files.has(path)) this.#files.set(path, new PathWatch(path, 'file', () => this.#changed(), this.#log));
    }
  }

  /** Reload now. Concurrent triggers coalesce into one more reload after the running one. */
  reload(trigger: string): Promise<ReloadOutcome> {
    return this.#reloads.run(() => this.#reloadOnce(trigger));
  }

  async #reloadOnce(trigger: string): Promise<ReloadOutcome> {
    const named = new Set<string>();
    try {
      const next = await loadRoutes(this.dir, named);
      this.#config = next;
      this.#lastError = undefined;
      this.#log.info({ trigger, routes: next.routes.map((r) => r.name) }, 'routes reloaded');
      warnUnclaimed(next, this.#log);
      this.#onSwap(next, true);
      this.#watchFiles(next.namedFiles);
      return { ok: true, errors: [] };
    } catch (err) {
      const errors = err instanceof ConfigError ? err.problems.map(formatProblem) : [(err as Error).message];
      this.#lastError = { at: new Date().toISOString(), errors };
      this.#log.error({ trigger, errors }, 'route reload rejected; the last good configuration stays live');
      this.#onSwap(this.#config, false);
      this.#watchFiles([...this.#config.namedFiles, ...named]);
      return { ok: false, errors };
    }
  }

  close(): void {
    clearTimeout(this.#timer);
    clearInterval(this.#identityCheck);
    this.#folder?.close();
    // No watch is made after this, by a reload still running either (#watchFiles checks #folder).
    this.#folder = undefined;
    for (const file of this.#files.values()) file.close();
    this.#files.clear();
  }
}

/** Hosts forward mode will not intercept though routes point at them: said at every load, as nothing else would. */
function warnUnclaimed(config: CompiledConfig, log: Logger): void {
  for (const u of unclaimedHosts(config.routes)) log.warn({ host: u.host, files: u.files }, u.message);
}
