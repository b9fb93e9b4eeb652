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
 * each transition, and the others see it through the store. Grace ends are judged on the store's
 * clock when it has one (Redis TIME): otherwise one instance whose clock runs an hour fast would
 * destroy the previous version an hour early for every instance (FLT-09). (Requests never use a
 * previous version past its grace end in the meantime: resolve-credential checks the time itself.)
 */
export class GraceSweeper {
  readonly #backend: StoreBackend;
  readonly #log: Logger;
  readonly #metrics: Metrics;
  readonly #actor: string;
  readonly #afterSweep: () => void;
  #timer: NodeJS.Timeout | undefined;
  /** Bumped by every schedule(), so an older one whose clock read returns late does not re-arm. */
  #generation = 0;
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
    const generation = ++this.#generation;
    if (earliest === Number.POSITIVE_INFINITY) return;
    void this.#now().then(
      (now) => Math.min(Math.max(0, earliest - now), MAX_SLEEP_MS),
      // The clock cannot be read (the store is down): look again shortly.
      () => 1_000,
    ).then((delay) => {
      if (this.#closed || generation !== this.#generation) return;
      clearTimeout(this.#timer);
      this.#timer = setTimeout(() => void this.sweep(), delay);
      this.#timer.unref();
    });
  }

  /** The clock grace ends are judged on: the store's when it has one, else this host's. */
  async #now(): Promise<number> {
    return (await this.#backend.now?.()) ?? Date.now();
  }

  async sweep(): Promise<void> {
    try {
      const now = new Date(await this.#now());
      const retired = await expireDue({ store: this.#backend, actor: this.#actor, now: () => now });
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
