import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { RateLimitOptions } from '../../src/config/route-schema.ts';
import { MemoryRateLimiter } from '../../src/pipeline/rate-limiter.ts';

/** 2 requests per second with a burst of 4: one token every 500 ms. */
const LIMIT: RateLimitOptions = { rate: { count: 2, periodMs: 1000 }, burst: 4 };
const KEY = ['caller', 'sync-worker', 'route', 'plaid'] as const;

function takeN(limiter: MemoryRateLimiter, n: number, now: number, limit = LIMIT, key: readonly (string | number)[] = KEY) {
  return Array.from({ length: n }, () => limiter.take(key, limit, now));
}

describe('MemoryRateLimiter', () => {
  it('allows the burst, then refuses', () => {
    const limiter = new MemoryRateLimiter();
    const burst = takeN(limiter, 4, 0);
    expect(burst.map((d) => d.allowed)).toEqual([true, true, true, true]);
    expect(burst.map((d) => d.remaining)).toEqual([3, 2, 1, 0]);
    expect(burst.map((d) => d.retryAfterMs)).toEqual([0, 0, 0, 0]);
    const refused = limiter.take(KEY, LIMIT, 0);
    expect(refused).toEqual({ allowed: false, retryAfterMs: 500, remaining: 0, resetMs: 2000 });
  });

  it('burst defaults to the rate count', () => {
    const limiter = new MemoryRateLimiter();
    const limit: RateLimitOptions = { rate: { count: 3, periodMs: 60_000 } };
    expect(takeN(limiter, 4, 1000, limit).map((d) => d.allowed)).toEqual([true, true, true, false]);
    expect(limiter.take(KEY, limit, 1000).retryAfterMs).toBe(20_000);
  });

  it('refills one token per interval, and retryAfterMs says exactly when', () => {
    const limiter = new MemoryRateLimiter();
    takeN(limiter, 4, 10_000);
    const refused = limiter.take(KEY, LIMIT, 10_200);
    expect(refused.allowed).toBe(false);
    expect(refused.retryAfterMs).toBe(300);
    expect(limiter.take(KEY, LIMIT, 10_499).allowed).toBe(false);
    expect(limiter.take(KEY, LIMIT, 10_499).retryAfterMs).toBe(1);
    expect(limiter.take(KEY, LIMIT, 10_500).allowed).toBe(true);
    // That token is spent; the next comes one interval later.
    expect(limiter.take(KEY, LIMIT, 10_500)).toMatchObject({ allowed: false, retryAfterMs: 500 });
    expect(limiter.take(KEY, LIMIT, 11_000).allowed).toBe(true);
  });

  it('refusals do not consume: hammering does not push the retry time back', () => {
    const limiter = new MemoryRateLimiter();
    takeN(limiter, 4, 0);
    for (let i = 0; i < 100; i++) expect(limiter.take(KEY, LIMIT, 100).retryAfterMs).toBe(400);
    expect(limiter.take(KEY, LIMIT, 500).allowed).toBe(true);
  });

  it('an idle bucket refills to the burst and no further', () => {
    const limiter = new MemoryRateLimiter();
    takeN(limiter, 4, 0);
    expect(takeN(limiter, 5, 1_000_000).map((d) => d.allowed)).toEqual([true, true, true, true, false]);
  });

  it('distinct tuple keys never share a bucket, even when their concatenations collide', () => {
    const limiter = new MemoryRateLimiter();
    const one: RateLimitOptions = { rate: { count: 1, periodMs: 1000 } };
    expect(limiter.take(['a:b', 'c'], one, 0).allowed).toBe(true);
    expect(limiter.take(['a:b', 'c'], one, 0).allowed).toBe(false);
    expect(limiter.take(['a', 'b:c'], one, 0).allowed).toBe(true);
    expect(limiter.take(['a', 'b', 'c'], one, 0).allowed).toBe(true);
    expect(limiter.take(['a:b:c'], one, 0).allowed).toBe(true);
    expect(limiter.take([':3100', '1/private'], one, 0).allowed).toBe(true);
    expect(limiter.take([':31001', '/private'], one, 0).allowed).toBe(true);
    expect(limiter.take(['1'], one, 0).allowed).toBe(true);
    expect(limiter.take([1], one, 0).allowed).toBe(true);
  });

  it('the same tuple is the same bucket across calls', () => {
    const limiter = new MemoryRateLimiter();
    const one: RateLimitOptions = { rate: { count: 1, periodMs: 1000 } };
    expect(limiter.take(['caller', 'web'], one, 0).allowed).toBe(true);
    expect(limiter.take(['caller', 'web'], one, 0).allowed).toBe(false);
  });

  it('never allows more than burst + elapsed/interval requests (property)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 50 }),
        fc.constantFrom(1000, 60_000),
        fc.option(fc.integer({ min: 1, max: 20 }), { nil: undefined }),
        fc.array(fc.integer({ min: 0, max: 5000 }), { minLength: 1, maxLength: 200 }),
        (count, periodMs, burst, steps) => {
          const limit: RateLimitOptions = burst === undefined ? { rate: { count, periodMs } } : { rate: { count, periodMs }, burst };
          const interval = periodMs / count;
          const limiter = new MemoryRateLimiter();
          let now = 0;
          let allowed = 0;
          for (const step of steps) {
            now += step;
            const d = limiter.take(['k'], limit, now);
            if (d.allowed) {
              allowed++;
              expect(d.retryAfterMs).toBe(0);
            } else {
              expect(d.retryAfterMs).toBeGreaterThan(0);
              expect(d.retryAfterMs).toBeLessThanOrEqual(interval + 1e-6);
            }
            expect(d.remaining).toBeGreaterThanOrEqual(0);
            expect(allowed).toBeLessThanOrEqual((burst ?? count) + Math.floor(now / interval) + 1e-9);
          }
        },
      ),
      { numRuns: 300 },
    );
  });

  it('waiting exactly retryAfterMs is always enough (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 30 }), fc.integer({ min: 1, max: 10 }), fc.integer({ min: 0, max: 10_000 }), (count, extra, start) => {
        const limit: RateLimitOptions = { rate: { count, periodMs: 1000 } };
        const limiter = new MemoryRateLimiter();
        takeN(limiter, count + extra, start, limit, ['k']);
        const refused = limiter.take(['k'], limit, start);
        expect(refused.allowed).toBe(false);
        expect(limiter.take(['k'], limit, start + refused.retryAfterMs).allowed).toBe(true);
      }),
      { numRuns: 300 },
    );
  });
});
