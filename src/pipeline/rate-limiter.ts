import type { RateLimitOptions } from '../config/route-schema.ts';

/** One bucket a request draws from, named by a tuple of structured parts. */
export interface Bucket {
  readonly key: readonly (string | number)[];
  readonly limit: RateLimitOptions;
  readonly policy: 'caller' | 'upstream';
}

export type RateCheck =
  | { readonly allowed: true }
  | {
      readonly allowed: false;
      /** The bucket that refused, or undefined when the route is paused after an upstream 429. */
      readonly bucket: Bucket | undefined;
      /** Milliseconds until a request would be allowed. */
      readonly retryAfterMs: number;
    };

/**
 * Takes one request from every bucket, or from none (a request refused by one bucket does not
 * spend the others). `scope` is the route: a route can be paused for everyone after an upstream 429.
 */
export interface RateLimiter {
  check(scope: string, buckets: readonly Bucket[]): RateCheck | Promise<RateCheck>;
  pause(scope: string, ms: number): void;
  /** Learn what holds already (pauses other instances took): awaited before the proxy listens; never rejects. */
  start?(): Promise<void>;
  close?(): Promise<void>;
}

export function intervalOf(limit: RateLimitOptions): number {
  return limit.rate.periodMs / limit.rate.count;
}

export function burstOf(limit: RateLimitOptions): number {
  return limit.burst ?? limit.rate.count;
}

/** The longest pause a route takes after an upstream 429 (its Retry-After, or one broadcast through Redis). */
export const MAX_PAUSE_MS = 3_600_000;

/** The answer for every allowed request: nothing about it varies. */
const ALLOWED: RateCheck = Object.freeze({ allowed: true });

/**
 * GCRA (the generic cell rate algorithm: a token bucket kept as one "theoretical arrival time" per
 * key) in memory. Used when the store is a file (one instance), and as the per-instance fallback
 * when Redis cannot answer. Keys are bounded by the configuration.
 */
export class MemoryRateLimiter implements RateLimiter {
  readonly #tat = new Map<string, number>();
  readonly #paused = new Map<string, number>();
  /** Each bucket's map key, made once per bucket object (the request path reuses its buckets). */
  readonly #keys = new WeakMap<Bucket, { readonly scope: string; readonly key: string }>();

  check(scope: string, buckets: readonly Bucket[], now = performance.now()): RateCheck {
    const pausedUntil = this.#paused.get(scope);
    if (pausedUntil !== undefined) {
      if (pausedUntil > now) return { allowed: false, bucket: undefined, retryAfterMs: pausedUntil - now };
      this.#paused.delete(scope);
    }
    // Every bucket is checked before any is spent: a request one bucket refuses takes nothing from the others.
    for (const bucket of buckets) {
      const interval = intervalOf(bucket.limit);
      const tat = this.#tatOf(this.#keyOf(scope, bucket), bucket.limit, now);
      // GCRA: a request may come at most (burst - 1) intervals ahead of the theoretical arrival time.
      // Not tat + interval - burst * interval: the clock is fractional, and with a burst of 1 that
      // sum came out a rounding error above tat, so a full bucket refused its request.
      const allowAt = tat - (burstOf(bucket.limit) - 1) * interval;
      if (now < allowAt) return { allowed: false, bucket, retryAfterMs: allowAt - now };
    }
    for (const bucket of buckets) {
      const key = this.#keyOf(scope, bucket);
      this.#tat.set(key, this.#tatOf(key, bucket.limit, now) + intervalOf(bucket.limit));
    }
    return ALLOWED;
  }

  /**
   * The bucket's theoretical arrival time, no earlier than now (a full bucket) and no later than a
   * spent bucket under its current limit, as the Redis script has it: a tat left by a slower limit
   * before a reload (1/day, then 10/s) would otherwise refuse the faster one for the rest of the day.
   * Such a tat is replaced by a spent bucket's, which then refills.
   */
  #tatOf(key: string, limit: RateLimitOptions, now: number): number {
    const tat = this.#tat.get(key);
    if (tat === undefined || tat < now) return now;
    const spent = now + burstOf(limit) * intervalOf(limit);
    if (tat <= spent) return tat;
    this.#tat.set(key, spent);
    return spent;
  }

  #keyOf(scope: string, bucket: Bucket): string {
    const known = this.#keys.get(bucket);
    if (known?.scope === scope) return known.key;
    // A JSON tuple, not a concatenation: ("a:b","c") and ("a","b:c") are different buckets.
    const key = JSON.stringify([scope, ...bucket.key]);
    this.#keys.set(bucket, { scope, key });
    return key;
  }

  pause(scope: string, ms: number, now = performance.now()): void {
    if (!(ms > 0)) return;
    this.#paused.set(scope, Math.max(this.#paused.get(scope) ?? 0, now + Math.min(ms, MAX_PAUSE_MS)));
  }
}
