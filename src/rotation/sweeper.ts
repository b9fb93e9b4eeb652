import type { Logger } from '../observe/log.ts';
import type { Metrics } from '../observe/metrics.ts';
import type { StoreSnapshot } from '../store/types.ts';
import type { StoreBackend } from '../store/types.ts';
import { expireDue } from './operations.ts';
import { nextExpiry } from './transitions.ts';

/** Re-check at least this often, so a changed clock or a missed change cannot delay an expiry for long. */
const MAX_SLEEP_MS = 30_000;

/**
 * Retires previous versions when their grace window ends, on time even with no traffic. Every
 * instance schedules the next expiry it knows of; compare-and-set lets exactly one of them make
 * each transition, and the others see it through the store. (Requests never use a previous version
 * past its grace end in the meantime: resolve-credential checks the time itself.)
 */
export class GraceSweeper {
  readonly #backend: StoreBackend;
  readonly #log: Logger;
  readonly #metrics: Metrics;
  readonly #actor: string;
  readonly #afterSweep: () => void;
  #timer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(backend: StoreBackend, log: Logger, metrics: Metrics, actor: string, afterSweep: () => void) {
    this.#backend = backend;
    this.#log = log;
    this.#metrics = metrics;
    this.#actor = actor;
    this.#afterSweep = afterSweep;
  }

  /** Called with every new view of the store: (re)arm the timer for the earliest grace end. */
  schedule(snapshot: StoreSnapshot): void {
    if (this.#closed) return;
    let earliest = Number.POSITIVE_INFINITY;
    for (const record of snapshot.credentials.values()) earliest = Math.min(earliest, nextExpiry(record) ?? Number.POSITIVE_INFINITY);
    clearTimeout(this.#timer);
    if (earliest === Number.POSITIVE_INFINITY) return;
    const delay = Math.min(Math.max(0, earliest - Date.now()), MAX_SLEEP_MS);
    this.#timer = setTimeout(() => void this.sweep(), delay);
    this.#timer.unref();
  }

  async sweep(): Promise<void> {
    try {
      const retired = await expireDue({ store: this.#backend, actor: this.#actor });
      for (const id of retired) {
        this.#metrics.retirements.inc();
        this.#log.info({ credential: id }, 'grace window ended: previous version retired and its ciphertext destroyed');
      }
    } catch (err) {
      this.#log.warn({ reason: (err as Error).message }, 'grace sweep failed; retrying shortly');
      clearTimeout(this.#timer);
      this.#timer = setTimeout(() => void this.sweep(), 1_000);
      this.#timer.unref();
      return;
    }
    this.#afterSweep();
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
  }
}
