import type { RateLimitOptions } from '../config/route-schema.ts';

export interface RateDecision {
  readonly allowed: boolean;
  /** Milliseconds until one more request would be allowed (0 when allowed). */
  readonly retryAfterMs: number;
  readonly remaining: number;
  /** Milliseconds until the bucket is full again. */
  readonly resetMs: number;
}

/** A limiter takes one request from a bucket named by a tuple of structured parts. */
export interface RateLimiter {
  take(key: readonly (string | number)[], limit: RateLimitOptions, now?: number): RateDecision;
}

/**
 * GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp per key) in memory:
 * used when the store is a file, i.e. one instance. Keys are bounded by the configuration.
 */
export class MemoryRateLimiter implements RateLimiter {
  readonly #tat = new Map<string, number>();

  take(key: readonly (string | number)[], limit: RateLimitOptions, now = performance.now()): RateDecision {
    // A JSON tuple, not a concatenation: ("a:b","c") and ("a","b:c") are different buckets.
    const k = JSON.stringify(key);
    const interval = limit.rate.periodMs / limit.rate.count;
    const burst = limit.burst ?? limit.rate.count;
    const tat = Math.max(this.#tat.get(k) ?? now, now);
    const newTat = tat + interval;
    const allowAt = newTat - burst * interval;
    if (now < allowAt) {
      return { allowed: false, retryAfterMs: allowAt - now, remaining: 0, resetMs: tat - now };
    }
    this.#tat.set(k, newTat);
    return { allowed: true, retryAfterMs: 0, remaining: Math.max(0, Math.floor((now + burst * interval - newTat) / interval)), resetMs: newTat - now };
  }
}
