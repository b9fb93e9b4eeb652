import type { Logger } from '../observe/log.ts';
import { evalScript, type RedisConnection } from '../store/redis-client.ts';
import { burstOf, intervalOf, MemoryRateLimiter, type Bucket, type RateCheck, type RateLimiter } from './rate-limiter.ts';

/**
 * GCRA in one Lua script on Redis's own clock (TIME), so every instance draws from the same buckets
 * and clock skew between instances does not matter. All buckets of a request or none. A value that
 * is not a number (garbage, a wrong type) counts as an empty bucket and is overwritten.
 * Returns {allowed, refusing bucket index (1-based), retry ms, reset ms}.
 */
const GCRA_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local next = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[i * 2 - 1])
  local burst = tonumber(ARGV[i * 2])
  local tat = tonumber(redis.pcall('GET', KEYS[i]))
  if not tat or tat < now then tat = now end
  local n = tat + interval
  local allow_at = n - burst * interval
  if now < allow_at then return {0, i, math.ceil(allow_at - now), math.ceil(tat - now)} end
  next[i] = n
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], tostring(next[i]), 'PX', math.ceil(next[i] - now) + 1000)
end
return {1, 0, 0, 0}
`;

const PAUSE_CHANNEL = 'egress:ratelimit:pause';
/** After a Redis failure, use per-instance limits for this long before asking Redis again. */
const BREAKER_MS = 1_000;

/**
 * Rate limits shared by every instance through Redis: one round trip per limited request. When
 * Redis cannot answer in time, limits fall back to per-instance buckets (so N instances allow up
 * to N times the rate) until Redis answers again; requests are never refused for Redis's sake.
 */
export class RedisRateLimiter implements RateLimiter {
  readonly #client: RedisConnection;
  readonly #subscriber: RedisConnection;
  readonly #local = new MemoryRateLimiter();
  readonly #log: Logger;
  #downUntil = 0;
  #degraded = false;
  /** While degraded, one request at a time asks Redis (half-open); the rest use local buckets. */
  #probing = false;

  constructor(client: RedisConnection, subscriber: RedisConnection, log: Logger) {
    this.#client = client;
    this.#subscriber = subscriber;
    this.#log = log;
    subscriber.on('error', () => {});
    subscriber.on('ready', () => void subscriber.subscribe(PAUSE_CHANNEL).catch(() => {}));
    subscriber.on('message', (_channel: string, message: string) => {
      try {
        const { scope, ms } = JSON.parse(message) as { scope: unknown; ms: unknown };
        if (typeof scope === 'string' && typeof ms === 'number' && ms > 0) this.#local.pause(scope, ms);
      } catch {
        // Not ours: ignore.
      }
    });
  }

  check(scope: string, buckets: readonly Bucket[]): RateCheck | Promise<RateCheck> {
    // Pauses are broadcast to every instance, so the local view answers for them without a round trip.
    const local = this.#local.check(scope, []);
    if (!local.allowed || buckets.length === 0) return local;
    if (performance.now() < this.#downUntil) return this.#local.check(scope, buckets);
    if (this.#degraded) {
      if (this.#probing) return this.#local.check(scope, buckets);
      this.#probing = true;
    }
    const keys = buckets.map((b) => `egress:rl:{${scope}}:${JSON.stringify(b.key)}`);
    const args = buckets.flatMap((b) => [String(intervalOf(b.limit)), String(burstOf(b.limit))]);
    return (evalScript(this.#client, GCRA_SCRIPT, keys, args) as Promise<[number, number, number, number]>).then(
      ([allowed, index, retryMs, resetMs]) => {
        this.#probing = false;
        if (this.#degraded) {
          this.#degraded = false;
          this.#log.info('rate limits are shared through Redis again');
        }
        return allowed === 1 ? { allowed: true } : { allowed: false, bucket: buckets[index - 1], retryAfterMs: retryMs, resetMs };
      },
      () => {
        this.#probing = false;
        this.#downUntil = performance.now() + BREAKER_MS;
        if (!this.#degraded) {
          this.#degraded = true;
          this.#log.warn({ alert: 'ratelimit_degraded' }, 'Redis did not answer; rate limits fall back to per-instance buckets');
        }
        return this.#local.check(scope, buckets);
      },
    );
  }

  pause(scope: string, ms: number): void {
    this.#local.pause(scope, ms);
    void this.#client.publish(PAUSE_CHANNEL, JSON.stringify({ scope, ms })).catch(() => {});
  }

  async close(): Promise<void> {
    this.#subscriber.disconnect();
  }
}
