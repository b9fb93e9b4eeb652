import { stat } from 'node:fs/promises';
import { PathWatch } from '../config/path-watch.ts';
import { listenerDateWarnings, readListenerFile, type CheckedListenerFiles } from '../certs/listener-files.ts';
import { UserError } from '../errors.ts';
import type { Logger } from '../observe/log.ts';
import { checkListenerFiles } from './tls.ts';
import { Coalesced } from '../config/coalesced.ts';

/** Where the TLS listener's files are: EGRESS_TLS_CERT, EGRESS_TLS_KEY and EGRESS_CLIENT_CA (default the forward-mode CA). */
export interface ListenerPaths {
  readonly cert: string;
  readonly key: string;
  readonly clientCa: string;
}

/**
 * Read the three files and check them (checkListenerFiles: the key belongs to the certificate,
 * every client CA is a CA); warn about dates and a key others can read. Throws a UserError naming
 * the setting and the file, never quoting it.
 */
export async function loadListenerFiles(paths: ListenerPaths, log: Logger): Promise<CheckedListenerFiles> {
  const cert = await readListenerFile(paths.cert, 'EGRESS_TLS_CERT');
  const key = await readListenerFile(paths.key, 'EGRESS_TLS_KEY');
  const clientCa = await readListenerFile(paths.clientCa, 'EGRESS_CLIENT_CA');
  const checked = checkListenerFiles(cert, key, clientCa);
  for (const { setting, message } of listenerDateWarnings(checked, Date.now())) log.warn({ setting }, message);
  // Whoever can read the listener's key can pose as the proxy to its callers and collect their
  // tokens. Warned, not refused (as master.key and ca.key are): Kubernetes mounts secrets 0644
  // unless told otherwise (defaultMode).
  const keyMode = (await stat(key.path)).mode & 0o777;
  if ((keyMode & 0o077) !== 0) log.warn({ setting: key.setting, path: key.path, mode: keyMode.toString(8) }, `${key.setting} ${key.path} is readable by group or others (mode ${keyMode.toString(8)}): run "chmod 600" on it (on Kubernetes, give the secret volume defaultMode: 0400)`);
  return checked;
}

/**
 * The TLS listener's files, live. They are renewed in place (cert-manager, certbot, a CA
 * change-over), so they are watched as the route folder is (PathWatch: a rename over a file, a
 * swapped symlink, a file back after vanishing), and re-read on SIGHUP. A change is read whole and
 * checked as at start; only files that pass are handed to `onSwap`. A certificate and its key
 * written one after the other are a mismatched pair in between: refused, and the files before stay
 * in use until the pair matches. A refusal is handed to `onRejected` (the reload_rejected alert).
 */
export class ListenerFilesReloader {
  readonly paths: ListenerPaths;
  readonly #log: Logger;
  readonly #onSwap: (files: CheckedListenerFiles) => void;
  readonly #onRejected: (reason: string) => void;
  #live: CheckedListenerFiles | undefined;
  #loadedAt: Date | undefined;
  #lastError: { at: string; errors: readonly string[] } | undefined;
  #watches: PathWatch[] = [];
  #debounceMs = 150;
  #identityCheck: NodeJS.Timeout | undefined;
  #timer: NodeJS.Timeout | undefined;
  readonly #reloads = new Coalesced<boolean>();
  #closed = false;

  constructor(paths: ListenerPaths, log: Logger, onSwap: (files: CheckedListenerFiles) => void, onRejected: (reason: string) => void) {
    this.paths = paths;
    this.#log = log;
    this.#onSwap = onSwap;
    this.#onRejected = onRejected;
  }

  /** The first read, at start: a file that fails stops the start (the UserError says which). */
  async load(): Promise<CheckedListenerFiles> {
    this.#live = await loadListenerFiles(this.paths, this.#log);
    this.#loadedAt = new Date();
    return this.#live;
  }

  status(): { cert: string; key: string; client_ca: string; loaded_at?: string; last_reload_error?: { at: string; errors: readonly string[] } } {
    return {
      cert: this.paths.cert,
      key: this.paths.key,
      client_ca: this.paths.clientCa,
      ...(this.#loadedAt ? { loaded_at: this.#loadedAt.toISOString() } : {}),
      ...(this.#lastError ? { last_reload_error: this.#lastError } : {}),
    };
  }

  /**
   * Watch the three paths (one named twice, a certificate and key in one PEM, is watched once).
   * Changes come in bursts (a write is several events, a pair is two files), so they are
   * debounced; every second each path is checked for naming something new, as the route files are.
   */
  watch(debounceMs = 150, identityCheckMs = 1_000): void {
    this.#debounceMs = debounceMs;
    const changed = () => {
      clearTimeout(this.#timer);
      this.#timer = setTimeout(() => void this.reload('change'), this.#debounceMs);
    };
    this.#watches = [...new Set([this.paths.cert, this.paths.key, this.paths.clientCa])].map((path) => new PathWatch(path, 'file', changed, this.#log, 'a TLS listener file'));
    this.#identityCheck = setInterval(() => {
      let replaced = false;
      for (const watch of this.#watches) replaced = watch.moved() || replaced;
      if (replaced) void this.reload('file replaced');
    }, identityCheckMs);
    this.#identityCheck.unref();
    // A file changed between the first read and now sent no event to watches armed just now.
    const live = this.#live;
    void this.#changedSince(live).then((moved) => {
      if (moved && !this.#closed && this.#live === live) void this.reload('changed while starting');
    });
  }

  async #changedSince(files: CheckedListenerFiles | undefined): Promise<boolean> {
    if (!files) return false;
    try {
      const now = await Promise.all([files.cert, files.key, files.clientCa].map((f) => readListenerFile(f.path, f.setting)));
      return now.some((f, i) => f.pem !== [files.cert, files.key, files.clientCa][i]!.pem);
    } catch {
      return true;
    }
  }

  /** Read and check the files now; true when they were taken up. Concurrent triggers coalesce into one more read after the running one. */
  reload(trigger: string): Promise<boolean> {
    return this.#reloads.run(() => this.#reloadOnce(trigger));
  }

  async #reloadOnce(trigger: string): Promise<boolean> {
    let next: CheckedListenerFiles;
    try {
      next = await loadListenerFiles(this.paths, this.#log);
      // Closed while reading: the listener is going away.
      if (this.#closed) return false;
      // A context OpenSSL refuses all the same is not swapped in either (setSecureContext keeps the old one when it throws).
      this.#onSwap(next);
    } catch (err) {
      // The reason names the setting, the file and what is wrong; nothing else is said (an
      // unexpected error could carry what it was parsing).
      const reason = err instanceof UserError ? err.message : `unexpected error (${(err as NodeJS.ErrnoException).code ?? (err as Error).name})`;
      this.#lastError = { at: new Date().toISOString(), errors: [reason] };
      this.#log.error({ trigger, reason }, 'TLS listener files rejected; the last good certificate, key and client CAs stay in use');
      this.#onRejected(reason);
      return false;
    }
    this.#live = next;
    this.#loadedAt = new Date();
    this.#lastError = undefined;
    this.#log.info({ trigger, certificate: next.certificate.subject.replaceAll('\n', ', '), valid_to: next.certificate.validTo, client_cas: next.clientCas.length }, 'TLS listener files reloaded');
    return true;
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
    clearInterval(this.#identityCheck);
    for (const watch of this.#watches) watch.close();
    this.#watches = [];
  }
}
