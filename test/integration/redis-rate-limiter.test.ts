import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/observe/log.ts';
import type { Bucket } from '../../src/pipeline/rate-limiter.ts';
import { RedisRateLimiter } from '../../src/pipeline/redis-rate-limiter.ts';
import { REDIS_LIMITS, parseRedisUrl, type RedisConnection } from '../../src/store/redis-client.ts';
import { eventually } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';

/**
 * The checks of requests that arrive together are decided by one script call per route: each
 * request as if it were alone, in arrival order, all of its buckets or none.
 */
let redis: TestRedis;
let client: RedisConnection;
let limiter: RedisRateLimiter;

/** A connection to the test Redis, ready for commands. */
async function connected(): Promise<RedisConnection> {
  const connection = parseRedisUrl(redis.url).connect();
  connection.on('error', () => {});
  await new Promise((resolve) => connection.once('ready', resolve));
  return connection;
}

beforeAll(async () => {
  redis = await TestRedis.create();
  client = await connected();
  limiter = new RedisRateLimiter(client, parseRedisUrl(redis.url).connect(), createLogger('silent'));
});

afterAll(async () => {
  await limiter?.close();
  client?.disconnect();
  await redis?.destroy();
});

const perMinute = (count: number) => ({ rate: { count, periodMs: 60_000 } });
const callerBucket = (caller: string, count: number): Bucket => ({ key: ['rule', 0, caller], limit: perMinute(count), policy: 'caller' });
const upstreamBucket = (count: number): Bucket => ({ key: ['upstream'], limit: perMinute(count), policy: 'upstream' });

/** Script calls Redis has run so far (EVALSHA and EVAL). */
async function scriptCalls(): Promise<number> {
  const stats = (await client.info('commandstats')) as string;
  let calls = 0;
  for (const m of stats.matchAll(/^cmdstat_(?:evalsha|eval):calls=(\d+)/gm)) calls += Number(m[1]);
  return calls;
}

describe('RedisRateLimiter batches', () => {
  it('50 checks at once on one bucket of 10: exactly the first 10 pass, in one or a few script calls', async () => {
    const before = await scriptCalls();
    const results = await Promise.all(Array.from({ length: 50 }, () => limiter.check('batch-one', [upstreamBucket(10)])));
    const calls = (await scriptCalls()) - before;
    expect(results.map((r) => r.allowed)).toEqual([...Array(10).fill(true), ...Array(40).fill(false)]);
    expect(calls).toBeGreaterThanOrEqual(1);
    expect(calls).toBeLessThan(5);
    const refused = results[10]!;
    expect(refused.allowed).toBe(false);
    if (!refused.allowed) {
      expect(refused.bucket?.policy).toBe('upstream');
      expect(refused.retryAfterMs).toBeGreaterThan(0);
      expect(refused.retryAfterMs).toBeLessThanOrEqual(6_000);
    }
    // What the batch spent is in Redis: the next check, alone, is refused too.
    expect((await limiter.check('batch-one', [upstreamBucket(10)])).allowed).toBe(false);
  });

  it('within a batch, a request refused by its caller bucket spends nothing from the route quota', async () => {
    // Route quota 3; caller a may send 1, caller b 5. Arrival order: a a a b b b b.
    const order = ['a', 'a', 'a', 'b', 'b', 'b', 'b'] as const;
    const results = await Promise.all(order.map((c) => limiter.check('batch-all-or-none', [callerBucket(c, c === 'a' ? 1 : 5), upstreamBucket(3)])));
    expect(results.map((r) => r.allowed)).toEqual([true, false, false, true, true, false, false]);
    const policies = results.map((r) => (r.allowed ? null : r.bucket?.policy));
    expect(policies).toEqual([null, 'caller', 'caller', null, null, 'upstream', 'upstream']);
    // b spent 2 of its 5: alone, with a fresh route quota, it still has 3.
    const again = [];
    for (let i = 0; i < 4; i++) again.push((await limiter.check('batch-all-or-none-2', [callerBucket('b', 5), upstreamBucket(100)])).allowed);
    expect(again).toEqual([true, true, true, true]);
  });

  it('checks on several routes in one turn are decided per route, each against its own buckets', async () => {
    const routes = ['r1', 'r2', 'r3'];
    const results = await Promise.all(routes.flatMap((route) => Array.from({ length: 4 }, () => Promise.resolve(limiter.check(route, [upstreamBucket(2)])).then((r) => [route, r.allowed] as const))));
    for (const route of routes) expect(results.filter(([r, ok]) => r === route && ok).length, route).toBe(2);
  });

  it('checks that arrive while the route\'s call is on the way go together in the next call, in order', async () => {
    const before = await scriptCalls();
    // The first check's call cannot be answered while Redis is frozen; ten more checks arrive, each
    // in its own turn of the event loop, and wait for that answer instead of sending ten calls.
    redis.freeze();
    let results: Promise<boolean>[];
    try {
      results = [Promise.resolve(limiter.check('batch-busy', [upstreamBucket(6)])).then((r) => r.allowed)];
      for (let i = 0; i < 10; i++) {
        await new Promise((resolve) => setImmediate(resolve));
        results.push(Promise.resolve(limiter.check('batch-busy', [upstreamBucket(6)])).then((r) => r.allowed));
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    } finally {
      redis.thaw();
    }
    expect(await Promise.all(results)).toEqual([...Array(6).fill(true), ...Array(5).fill(false)]);
    expect((await scriptCalls()) - before).toBe(2);
  });

  it('when the call on the way fails, the checks waiting behind it fall back with it instead of waiting for a call of their own', async () => {
    const own = await connected();
    const local = new RedisRateLimiter(own, parseRedisUrl(redis.url).connect(), createLogger('silent'));
    redis.freeze();
    try {
      const started = performance.now();
      const first = Promise.resolve(local.check('batch-failing', [upstreamBucket(5)]));
      await new Promise((resolve) => setImmediate(resolve));
      const waiting = Promise.resolve(local.check('batch-failing', [upstreamBucket(5)])).then((r) => ({ r, ms: performance.now() - started }));
      const [a, b] = await Promise.all([first, waiting]);
      // Both decided by the local buckets after the one command timeout, not after two.
      expect(a.allowed).toBe(true);
      expect(b.r.allowed).toBe(true);
      expect(b.ms).toBeGreaterThanOrEqual(REDIS_LIMITS.commandTimeoutMs - 50);
      expect(b.ms).toBeLessThan(REDIS_LIMITS.commandTimeoutMs * 1.8);
    } finally {
      redis.thaw();
      await local.close();
      own.disconnect();
    }
  });

  it('more than 64 checks at once are split over several calls and still counted exactly', async () => {
    const results = await Promise.all(Array.from({ length: 150 }, () => limiter.check('batch-many', [upstreamBucket(100)])));
    expect(results.filter((r) => r.allowed).length).toBe(100);
    expect(results.slice(0, 100).every((r) => r.allowed)).toBe(true);
  });
  it('a bucket value no limit can reach (a huge number, set by hand without a TTL) counts as a spent bucket that refills, not a route closed for good', async () => {
    const bucket: Bucket = { key: ['upstream'], limit: { rate: { count: 10, periodMs: 1_000 } }, policy: 'upstream' };
    for (const [n, value] of ['1e308', '99999999999999999999', '1e999'].entries()) {
      const scope = `far-future-${n}`;
      const key = `egress:rl:{${scope}}:${JSON.stringify(bucket.key)}`;
      await client.set(key, value);
      const refused = await limiter.check(scope, [bucket]);
      expect(refused.allowed, value).toBe(false);
      // At most one interval to wait, as for a bucket just emptied; and the key expires again.
      if (!refused.allowed) {
        expect(refused.retryAfterMs, value).toBeGreaterThan(0);
        expect(refused.retryAfterMs, value).toBeLessThanOrEqual(100);
      }
      const ttl = await client.pttl(key);
      expect(ttl, value).toBeGreaterThan(0);
      expect(ttl, value).toBeLessThanOrEqual(2_000);
      await new Promise((r) => setTimeout(r, 150));
      expect((await limiter.check(scope, [bucket])).allowed, value).toBe(true);
    }
  });

  it('a bucket value that is not a number in Lua either (NaN) counts as an empty bucket and is overwritten, instead of failing every check of the route', async () => {
    const bucket: Bucket = { key: ['upstream'], limit: { rate: { count: 10, periodMs: 1_000 } }, policy: 'upstream' };
    for (const [n, value] of ['NaN', 'nan', '-nan'].entries()) {
      const scope = `not-a-number-${n}`;
      const key = `egress:rl:{${scope}}:${JSON.stringify(bucket.key)}`;
      await client.set(key, value);
      expect((await limiter.check(scope, [bucket])).allowed, value).toBe(true);
      // Decided in Redis (not by the per-instance fallback): the value is a time again, with an expiry.
      expect(Number.isFinite(Number(await client.get(key))), value).toBe(true);
      expect(await client.pttl(key), value).toBeGreaterThan(0);
    }
  });
  it('a pause message from Redis longer than any upstream can ask for (1e999 parses as Infinity) is capped at the hour a Retry-After gets, not kept for good', async () => {
    const publisher = await connected();
    try {
      const bucket = upstreamBucket(1000);
      expect((await limiter.check('paused-for-good', [bucket])).allowed).toBe(true);
      await publisher.publish('egress:ratelimit:pause', '{"scope":"paused-for-good","ms":1e999}');
      let check = await limiter.check('paused-for-good', [bucket]);
      for (let i = 0; i < 40 && check.allowed; i++) {
        await new Promise((r) => setTimeout(r, 25));
        check = await limiter.check('paused-for-good', [bucket]);
      }
      expect(check.allowed).toBe(false);
      if (!check.allowed) {
        expect(check.retryAfterMs).toBeGreaterThan(0);
        expect(check.retryAfterMs).toBeLessThanOrEqual(3_600_000);
      }
    } finally {
      publisher.disconnect();
    }
  });

  it('a pause is heard by the instances of the same store only: a route of the same name in another database of the server is not paused', async () => {
    const on = async (db: number) => {
      const url = `${redis.url}/${db}`;
      const own = parseRedisUrl(url).connect();
      own.on('error', () => {});
      await new Promise((resolve) => own.once('ready', resolve));
      // As the proxy does: the limiter subscribes when its connection is ready.
      return { own, limiter: new RedisRateLimiter(own, parseRedisUrl(url).connect(), createLogger('silent')) };
    };
    const staging = await on(1);
    const production = await on(2);
    const sameDb = await on(1);
    try {
      const bucket = upstreamBucket(1000);
      await new Promise((r) => setTimeout(r, 300));
      staging.limiter.pause('plaid', 60_000);
      await new Promise((r) => setTimeout(r, 200));
      expect((await staging.limiter.check('plaid', [bucket])).allowed).toBe(false);
      expect((await sameDb.limiter.check('plaid', [bucket])).allowed).toBe(false);
      expect((await production.limiter.check('plaid', [bucket])).allowed).toBe(true);
    } finally {
      for (const x of [staging, production, sameDb]) {
        await x.limiter.close();
        x.own.disconnect();
      }
    }
  });

  it('a pause is kept in Redis for its length: a shorter one later does not cut it, ended and damaged entries are dropped, and a limiter that starts afterwards reads what still holds', async () => {
    const own = await connected();
    const first = new RedisRateLimiter(own, parseRedisUrl(redis.url).connect(), createLogger('silent'));
    const bucket = upstreamBucket(1000);
    try {
      // A damaged key (another type) is replaced by the first pause written.
      await client.set('egress:rl:pauses', 'garbage');
      first.pause('kept-long', 60_000);
      first.pause('kept-long', 5_000);
      first.pause('kept-short', 300);
      await eventually(async () => (await client.hget('egress:rl:pauses', 'kept-short')) !== null, 1_000, 'the pauses to be recorded');
      await client.hset('egress:rl:pauses', 'kept-junk', 'soon');
      const ttl = await client.pttl('egress:rl:pauses');
      expect(ttl).toBeGreaterThan(55_000);
      expect(ttl).toBeLessThanOrEqual(60_000);
      await new Promise((r) => setTimeout(r, 400));
      const late = new RedisRateLimiter(client, parseRedisUrl(redis.url).connect(), createLogger('silent'));
      try {
        await late.start();
        const long = await late.check('kept-long', [bucket]);
        expect(long.allowed).toBe(false);
        if (!long.allowed) expect(long.retryAfterMs).toBeGreaterThan(55_000);
        expect((await late.check('kept-short', [bucket])).allowed).toBe(true);
        expect((await late.check('kept-junk', [bucket])).allowed).toBe(true);
      } finally {
        await late.close();
      }
      // The next pause written drops the ended and the damaged entries.
      first.pause('kept-other', 1_000);
      await eventually(async () => (await client.hget('egress:rl:pauses', 'kept-other')) !== null, 1_000, 'the pause to be recorded');
      expect((await client.hkeys('egress:rl:pauses')).sort()).toEqual(['kept-long', 'kept-other']);
    } finally {
      await first.close();
      own.disconnect();
      await client.del('egress:rl:pauses');
    }
  });

  it('a limiter that starts while Redis cannot answer starts at once, with no pause, and decides by its own buckets', async () => {
    const down = await TestRedis.create({ start: false });
    const own = parseRedisUrl(down.url).connect();
    own.on('error', () => {});
    const limiter = new RedisRateLimiter(own, parseRedisUrl(down.url).connect(), createLogger('silent'));
    try {
      const started = performance.now();
      await limiter.start();
      expect(performance.now() - started).toBeLessThan(REDIS_LIMITS.commandTimeoutMs);
      expect((await limiter.check('never-paused', [upstreamBucket(1)])).allowed).toBe(true);
      expect((await limiter.check('never-paused', [upstreamBucket(1)])).allowed).toBe(false);
    } finally {
      await limiter.close();
      own.disconnect();
      await down.destroy();
    }
  });
});
