import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { RateLimitOptions } from '../../src/config/route-schema.ts';
import { retryAfterMs } from '../../src/pipeline/retry-after.ts';
import { MAX_PAUSE_MS, MemoryRateLimiter } from '../../src/pipeline/rate-limiter.ts';

/** 2 requests per second with a burst of 4: one token every 500 ms. */
const LIMIT: RateLimitOptions = { rate: { count: 2, periodMs: 1000 }, burst: 4 };
const KEY = ['caller', 'sync-worker', 'route', 'plaid'] as const;

/** One request from a single bucket, as {allowed, retryAfterMs} (0 when allowed). */
function take(limiter: MemoryRateLimiter, key: readonly (string | number)[], limit: RateLimitOptions, now: number) {
  const r = limiter.check('route', [{ key, limit, policy: 'caller' }], now);
  return r.allowed ? { allowed: true, retryAfterMs: 0 } : { allowed: false, retryAfterMs: r.retryAfterMs };
}

function takeN(limiter: MemoryRateLimiter, n: number, now: number, limit = LIMIT, key: readonly (string | number)[] = KEY) {
  return Array.from({ length: n }, () => take(limiter, key, limit, now));
}

describe('MemoryRateLimiter', () => {
  it('allows the burst, then refuses', () => {
    const limiter = new MemoryRateLimiter();
    const burst = takeN(limiter, 4, 0);
    expect(burst.map((d) => d.allowed)).toEqual([true, true, true, true]);
    expect(burst.map((d) => d.retryAfterMs)).toEqual([0, 0, 0, 0]);
    const refused = take(limiter, KEY, LIMIT, 0);
    expect(refused).toEqual({ allowed: false, retryAfterMs: 500 });
  });

  it('burst defaults to the rate count', () => {
    const limiter = new MemoryRateLimiter();
    const limit: RateLimitOptions = { rate: { count: 3, periodMs: 60_000 } };
    expect(takeN(limiter, 4, 1000, limit).map((d) => d.allowed)).toEqual([true, true, true, false]);
    expect(take(limiter, KEY, limit, 1000).retryAfterMs).toBe(20_000);
  });

  it('refills one token per interval, and retryAfterMs says exactly when', () => {
    const limiter = new MemoryRateLimiter();
    takeN(limiter, 4, 10_000);
    const refused = take(limiter, KEY, LIMIT, 10_200);
    expect(refused.allowed).toBe(false);
    expect(refused.retryAfterMs).toBe(300);
    expect(take(limiter, KEY, LIMIT, 10_499).allowed).toBe(false);
    expect(take(limiter, KEY, LIMIT, 10_499).retryAfterMs).toBe(1);
    expect(take(limiter, KEY, LIMIT, 10_500).allowed).toBe(true);
    // That token is spent; the next comes one interval later.
    expect(take(limiter, KEY, LIMIT, 10_500)).toMatchObject({ allowed: false, retryAfterMs: 500 });
    expect(take(limiter, KEY, LIMIT, 11_000).allowed).toBe(true);
  });

  it('a full bucket with a burst of 1 allows its request whatever the clock reads (no rounding error in tat + interval - interval)', () => {
    // performance.now() is fractional: 0.7 + 86_400_000 - 86_400_000 is a little more than 0.7.
    for (const limit of [{ rate: { count: 1, periodMs: 86_400_000 } }, { rate: { count: 1, periodMs: 1000 } }, { rate: { count: 7, periodMs: 60_000 }, burst: 1 }]) {
      for (const now of [0.7, 2.9, 12.34, 100.01, 1000.7, 123_456.789]) {
        const limiter = new MemoryRateLimiter();
        expect(take(limiter, KEY, limit, now), `${limit.rate.count}/${limit.rate.periodMs} ms at ${now}`).toMatchObject({ allowed: true });
        expect(take(limiter, KEY, limit, now).allowed).toBe(false);
      }
    }
  });

  it('refusals do not consume: hammering does not push the retry time back', () => {
    const limiter = new MemoryRateLimiter();
    takeN(limiter, 4, 0);
    for (let i = 0; i < 100; i++) expect(take(limiter, KEY, LIMIT, 100).retryAfterMs).toBe(400);
    expect(take(limiter, KEY, LIMIT, 500).allowed).toBe(true);
  });

  it('an idle bucket refills to the burst and no further', () => {
    const limiter = new MemoryRateLimiter();
    takeN(limiter, 4, 0);
    expect(takeN(limiter, 5, 1_000_000).map((d) => d.allowed)).toEqual([true, true, true, true, false]);
  });

  it('distinct tuple keys never share a bucket, even when their concatenations collide', () => {
    const limiter = new MemoryRateLimiter();
    const one: RateLimitOptions = { rate: { count: 1, periodMs: 1000 } };
    expect(take(limiter, ['a:b', 'c'], one, 0).allowed).toBe(true);
    expect(take(limiter, ['a:b', 'c'], one, 0).allowed).toBe(false);
    expect(take(limiter, ['a', 'b:c'], one, 0).allowed).toBe(true);
    expect(take(limiter, ['a', 'b', 'c'], one, 0).allowed).toBe(true);
    expect(take(limiter, ['a:b:c'], one, 0).allowed).toBe(true);
    expect(take(limiter, [':3100', '1/private'], one, 0).allowed).toBe(true);
    expect(take(limiter, [':31001', '/private'], one, 0).allowed).toBe(true);
    expect(take(limiter, ['1'], one, 0).allowed).toBe(true);
    expect(take(limiter, [1], one, 0).allowed).toBe(true);
  });

  it('the same tuple is the same bucket across calls', () => {
    const limiter = new MemoryRateLimiter();
    const one: RateLimitOptions = { rate: { count: 1, periodMs: 1000 } };
    expect(take(limiter, ['caller', 'web'], one, 0).allowed).toBe(true);
    expect(take(limiter, ['caller', 'web'], one, 0).allowed).toBe(false);
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
            const d = take(limiter, ['k'], limit, now);
            if (d.allowed) {
              allowed++;
              expect(d.retryAfterMs).toBe(0);
            } else {
              expect(d.retryAfterMs).toBeGreaterThan(0);
              expect(d.retryAfterMs).toBeLessThanOrEqual(interval + 1e-6);
            }
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
        const refused = take(limiter, ['k'], limit, start);
        expect(refused.allowed).toBe(false);
        expect(take(limiter, ['k'], limit, start + refused.retryAfterMs).allowed).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it('takes from every bucket or from none: a refusal by one bucket spends nothing from the others', () => {
    const limiter = new MemoryRateLimiter();
    const caller = { key: ['rule', 0, 'svc'], limit: { rate: { count: 1, periodMs: 1000 } }, policy: 'caller' as const };
    const upstream = { key: ['upstream'], limit: { rate: { count: 3, periodMs: 1000 } }, policy: 'upstream' as const };
    expect(limiter.check('r', [caller, upstream], 0).allowed).toBe(true);
    const refused = limiter.check('r', [caller, upstream], 0);
    expect(refused).toMatchObject({ allowed: false, bucket: caller });
    // The upstream bucket still has its other two tokens.
    expect(limiter.check('r', [upstream], 0).allowed).toBe(true);
    expect(limiter.check('r', [upstream], 0).allowed).toBe(true);
    expect(limiter.check('r', [upstream], 0)).toMatchObject({ allowed: false, bucket: upstream });
  });

  it('a bucket object reused across calls (as the request path does) is one bucket, and equal to a fresh object with its tuple', () => {
    const limiter = new MemoryRateLimiter();
    const two = { key: ['rule', 0, 'web'], limit: { rate: { count: 2, periodMs: 1000 } }, policy: 'caller' as const };
    expect(limiter.check('r', [two], 0).allowed).toBe(true);
    expect(limiter.check('r', [{ ...two, key: ['rule', 0, 'web'] }], 0).allowed).toBe(true);
    expect(limiter.check('r', [two], 0).allowed).toBe(false);
    expect(limiter.check('r', [two], 500).allowed).toBe(true);
  });

  it('scopes are separate, and a paused scope refuses everything until the pause ends', () => {
    const limiter = new MemoryRateLimiter();
    const one = { key: ['x'], limit: { rate: { count: 1, periodMs: 1000 } }, policy: 'caller' as const };
    expect(limiter.check('a', [one], 0).allowed).toBe(true);
    expect(limiter.check('b', [one], 0).allowed).toBe(true);
    limiter.pause('a', 5000, 0);
    expect(limiter.check('a', [], 1000)).toMatchObject({ allowed: false, bucket: undefined, retryAfterMs: 4000 });
    expect(limiter.check('b', [], 1000).allowed).toBe(true);
    expect(limiter.check('a', [], 5000).allowed).toBe(true);
  });
});

describe('retryAfterMs (an upstream 429\'s pause)', () => {
  const now = Date.parse('2026-12-07T17:00:00Z');

  it('reads delay-seconds and the three HTTP-date forms, all in GMT whatever the proxy\'s time zone (RFC 9110 §5.6.7, §10.2.3)', () => {
    const zone = process.env.TZ;
    try {
      for (const tz of ['UTC', 'America/New_York', 'Asia/Tokyo']) {
        process.env.TZ = tz;
        expect(retryAfterMs('600', now), tz).toBe(600_000);
        expect(retryAfterMs('Mon, 07 Dec 2026 17:10:00 GMT', now), tz).toBe(600_000);
        expect(retryAfterMs('Monday, 07-Dec-26 17:10:00 GMT', now), tz).toBe(600_000);
        // asctime has no zone written: it is GMT all the same, not the proxy's local time.
        expect(retryAfterMs('Mon Dec  7 17:10:00 2026', now), tz).toBe(600_000);
        expect(retryAfterMs('Mon Dec 14 17:10:00 2026', now), tz).toBe(3_600_000);
      }
    } finally {
      if (zone === undefined) delete process.env.TZ;
      else process.env.TZ = zone;
    }
  });

  it('is capped at an hour, and 0 (no pause) for a past date, zero, or what is not a Retry-After', () => {
    expect(retryAfterMs('99999999999999999999', now)).toBe(MAX_PAUSE_MS);
    for (const bad of [undefined, '', '0', '-5', '1.5', 'soon', 'Mon, 07 Dec 2026 16:59:00 GMT']) expect(retryAfterMs(bad, now), String(bad)).toBe(0);
  });

  it('sent more than once, the largest value when every one reads, and no pause when one does not', () => {
    expect(retryAfterMs(['120', '120'], now)).toBe(120_000);
    expect(retryAfterMs('120, 120', now)).toBe(120_000);
    expect(retryAfterMs(['60', '30, 600', ''], now)).toBe(600_000);
    expect(retryAfterMs('120,,', now)).toBe(120_000);
    // The comma after a date's day name is the date's.
    expect(retryAfterMs('Mon, 07 Dec 2026 17:10:00 GMT, 60', now)).toBe(600_000);
    expect(retryAfterMs(['Monday, 07-Dec-26 17:10:00 GMT', 'Mon Dec  7 17:05:00 2026'], now)).toBe(600_000);
    expect(retryAfterMs('0, 0', now)).toBe(0);
    for (const bad of [['120', 'soon'], '120, soon', 'soon, later', ['Mon, 07 Dec 2026 17:10:00 GMT', 'Mon']]) expect(retryAfterMs(bad, now), String(bad)).toBe(0);
  });
});
