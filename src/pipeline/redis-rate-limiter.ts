import type { Alerts } from '../observe/alerts.ts';
import type { Logger } from '../observe/log.ts';
import { evalReadScript, evalScript, readScript, type RedisConnection } from '../store/redis-client.ts';
import { burstOf, intervalOf, MAX_PAUSE_MS, MemoryRateLimiter, type Bucket, type RateCheck, type RateLimiter } from './rate-limiter.ts';

/**
 * GCRA in one Lua script on Redis's own clock (TIME), so every instance draws from the same buckets
 * and clock skew between instances does not matter. One call decides a batch of requests, in
 * order, each as if alone: all of a request's buckets or none, and a later request in the batch
 * sees what the earlier ones spent. A value that is not a number (garbage, a wrong type, NaN) counts as
 * an empty bucket and is overwritten; one later than the bucket allows (set by hand, or a limit
 * lowered since) counts as a spent bucket and is written back as one, with its expiry, so it refills.
 * ARGV: the number of requests, then for each its bucket count and (interval, burst) per bucket;
 * KEYS: every request's buckets, in the same order.
 * Returns three numbers per request: {allowed, refusing bucket index (1-based), retry ms}.
 */
const GCRA_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tats = {}
local out = {}
local k = 1
local a = 2
for r = 1, tonumber(ARGV[1]) do
  local count = tonumber(ARGV[a])
  a = a + 1
  local next = {}
  local refused = false
  for i = 0, count - 1 do
    local key = KEYS[k + i]
    local interval = tonumber(ARGV[a + i * 2])
    local burst = tonumber(ARGV[a + i * 2 + 1])
    local tat = tats[key]
    if tat == nil then tat = tonumber(redis.pcall('GET', key)) end
    if not tat or tat ~= tat or tat < now then tat = now end
    if tat > now + burst * interval then
      tat = now + burst * interval
      tats[key] = tat
    end
    local n = tat + interval
    local allow_at = n - burst * interval
    if now < allow_at then
      out[#out + 1] = 0
      out[#out + 1] = i + 1
      out[#out + 1] = math.ceil(allow_at - now)
      refused = true
      break
    end
    next[i] = n
  end
  if not refused then
    for i = 0, count - 1 do tats[KEYS[k + i]] = next[i] end
    out[#out + 1] = 1
    out[#out + 1] = 0
    out[#out + 1] = 0
  end
  k = k + count
  a = a + count * 2
end
for key, tat in pairs(tats) do
  redis.call('SET', key, tostring(tat), 'PX', math.ceil(tat - now) + 1000)
end
return out
`;

/** Requests decided by one script call at most; more wait for the next call. */
const MAX_BATCH = 64;

interface Pending {
  readonly keys: readonly string[];
  readonly args: readonly string[];
  readonly resolve: (verdict: readonly number[]) => void;
  readonly reject: (err: unknown) => void;
}

const PAUSE_CHANNEL = 'egress:ratelimit:pause';

/**
 * The pauses in force, as well as broadcast: an instance that starts, or whose subscriber
 * reconnects, after a pause began was not listening when it was announced. One hash per database
 * (route -> end of its pause on Redis's clock), so that an instance reads them all at once without
 * knowing the route names; it expires with the longest pause in it.
 */
const PAUSES_KEY = 'egress:rl:pauses';

const REDIS_NOW = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`;

/**
 * Record a pause: KEYS[1] the pauses hash, ARGV the route, the pause in ms, the longest pause.
 * A route already paused longer keeps its end; ended pauses and values that are not numbers are
 * dropped, ends beyond the longest pause are brought back to it, and a key that is not a hash
 * (damaged) is replaced. The key then expires with the latest end.
 */
const PAUSE_SCRIPT = `${REDIS_NOW}
local key = KEYS[1]
local kind = redis.call('TYPE', key)
if type(kind) == 'table' then kind = kind.ok end
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', key) end
local cap = now + tonumber(ARGV[3])
local ends = math.min(now + tonumber(ARGV[2]), cap)
local latest = ends
local entries = redis.call('HGETALL', key)
for i = 1, #entries, 2 do
  local e = tonumber(entries[i + 1])
  if not e or e ~= e or e <= now then
    redis.call('HDEL', key, entries[i])
  else
    e = math.min(e, cap)
    if entries[i] == ARGV[1] and e > ends then ends = e end
    if e > latest then latest = e end
  end
end
redis.call('HSET', key, ARGV[1], tostring(ends))
redis.call('PEXPIRE', key, math.ceil(latest - now))
return 1
`;

/** The pauses in force: KEYS[1] the pauses hash; returns route, ms left, route, ms left… Anything damaged counts as no pause. */
const PAUSES_SCRIPT = readScript(`${REDIS_NOW}
local entries = redis.pcall('HGETALL', KEYS[1])
local out = {}
if type(entries) ~= 'table' or entries.err then return out end
for i = 1, #entries, 2 do
  local e = tonumber(entries[i + 1])
  if e and e == e and e > now then
    out[#out + 1] = entries[i]
    out[#out + 1] = tostring(e - now)
  end
end
return out
`);

/**
 * Pub/sub spans every database of a server: on one channel, an upstream 429 seen by the proxies
 * of one store (staging on /1) paused the route of the same name for those of another (production
 * on /2). One channel per database; database 0 keeps the channel it always had.
 */
function pauseChannel(client: RedisConnection): string {
  const db = 'db' in client.options && typeof client.options.db === 'number' ? client.options.db : 0;
  return db === 0 ? PAUSE_CHANNEL : `${PAUSE_CHANNEL}:db${db}`;
}
export interface RedisRateLimiterOptions {
  readonly alerts?: Alerts;
  /** The Redis the limits are shared through, safe to log (the store's description): the alert's subject. */
  readonly redis?: string;
}

/** After a Redis failure, use per-instance limits for this long before asking Redis again. */
const BREAKER_MS = 1_000;

/**
 * Rate limits shared by every instance through Redis. Checks go to Redis together, one script
 * call per route (a route's buckets share a hash slot), instead of one round trip each: a call
 * cost the proxy and Redis more than deciding a request does. A route has at most one call on
 * the way: the checks of one event-loop turn are sent together, and those that arrive while a
 * call is out go together in the next one, sent as soon as it answers. So the busier the route,
 * the larger the batches, and an idle route's check is sent in the turn it arrives. When Redis
 * cannot answer in time, limits fall back to per-instance buckets (so N instances allow up to N
 * times the rate) until Redis answers again; requests are never refused for Redis's sake. Each
 * fall-back is logged and raises ratelimit_degraded (once per cool-down); the return is logged.
 */
export class RedisRateLimiter implements RateLimiter {
  readonly #client: RedisConnection;
  readonly #subscriber: RedisConnection;
  readonly #local = new MemoryRateLimiter();
  readonly #log: Logger;
  readonly #alerts: Alerts | undefined;
  readonly #redis: string;
  readonly #channel: string;
  #downUntil = 0;
  #degraded = false;
  /** While degraded, one request at a time asks Redis (half-open); the rest use local buckets. */
  #probing = false;
  /** Checks not sent yet, by scope; a scope is here only while it has some. */
  #pending = new Map<string, Pending[]>();
  /** Scopes with a script call on the way: their new checks wait for its answer. */
  readonly #inFlight = new Set<string>();
  #flushScheduled = false;
  readonly #onClientReady = (): void => void this.#readPauses();

  constructor(client: RedisConnection, subscriber: RedisConnection, log: Logger, options: RedisRateLimiterOptions = {}) {
    this.#client = client;
    this.#subscriber = subscriber;
    this.#log = log;
    this.#alerts = options.alerts;
    this.#redis = options.redis ?? 'redis';
    this.#channel = pauseChannel(client);
    subscriber.on('error', () => {});
    // Subscribed first, then the stored pauses read: a pause recorded after that read is heard.
    subscriber.on('ready', () => void subscriber.subscribe(this.#channel).then(() => this.#readPauses(), () => {}));
    // The read goes on this connection, which may come back after the subscriber did.
    client.on('ready', this.#onClientReady);
    subscriber.on('message', (channel: string, message: string) => {
      if (channel !== this.#channel) return;
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
    return this.#decide(scope, keys, args).then(
      ([allowed, index, retryMs]) => {
        this.#probing = false;
        if (this.#degraded) {
          this.#degraded = false;
          this.#log.info({ store: this.#redis }, 'rate limits are shared through Redis again');
        }
        return allowed === 1 ? { allowed: true } : { allowed: false, bucket: buckets[index! - 1], retryAfterMs: retryMs! };
      },
      () => {
        this.#probing = false;
        this.#downUntil = performance.now() + BREAKER_MS;
        if (!this.#degraded) {
          this.#degraded = true;
          this.#log.warn({ store: this.#redis }, 'Redis did not answer; rate limits fall back to per-instance buckets');
          this.#alerts?.raise('ratelimit_degraded', 'warning', this.#redis, 'Redis did not answer; rate limits fall back to per-instance buckets (N instances allow up to N times the configured rate)', { store: this.#redis });
        }
        return this.#local.check(scope, buckets);
      },
    );
  }

  /** Queue a request's buckets for the next script call on `scope`. */
  #decide(scope: string, keys: readonly string[], args: readonly string[]): Promise<readonly number[]> {
    return new Promise((resolve, reject) => {
      let queue = this.#pending.get(scope);
      if (!queue) this.#pending.set(scope, (queue = []));
      queue.push({ keys, args, resolve, reject });
      if (!this.#inFlight.has(scope)) this.#scheduleFlush();
    });
  }

  /** One flush at the end of this turn, for every scope that has checks by then. */
  #scheduleFlush(): void {
    if (this.#flushScheduled) return;
    this.#flushScheduled = true;
    setImmediate(() => this.#flush());
  }

  /** Send a call for every scope that has checks waiting and none on the way. */
  #flush(): void {
    this.#flushScheduled = false;
    for (const scope of this.#pending.keys()) if (!this.#inFlight.has(scope)) this.#send(scope);
  }

  #send(scope: string): void {
    const queue = this.#pending.get(scope)!;
    const batch = queue.length > MAX_BATCH ? queue.splice(0, MAX_BATCH) : queue;
    if (batch === queue) this.#pending.delete(scope);
    this.#inFlight.add(scope);
    const keys: string[] = [];
    const args: string[] = [String(batch.length)];
    for (const p of batch) {
      keys.push(...p.keys);
      args.push(String(p.keys.length), ...p.args);
    }
    (evalScript(this.#client, GCRA_SCRIPT, keys, args) as Promise<number[]>).then(
      (out) => {
        this.#inFlight.delete(scope);
        if (!Array.isArray(out) || out.length !== batch.length * 3) {
          const err = new Error('the rate-limit script answered something else than four numbers a request');
          for (const p of batch) p.reject(err);
        } else {
          for (let i = 0; i < batch.length; i++) batch[i]!.resolve(out.slice(i * 3, i * 3 + 3));
        }
        // What came in meanwhile goes now, together with this turn's arrivals.
        if (this.#pending.has(scope)) this.#scheduleFlush();
      },
      (err: unknown) => {
        this.#inFlight.delete(scope);
        // Redis failed this call: the checks queued behind it are not made to wait for a second
        // failure; they fail over to the local buckets with it.
        const waiting = this.#pending.get(scope) ?? [];
        this.#pending.delete(scope);
        for (const p of batch) p.reject(err);
        for (const p of waiting) p.reject(err);
      },
    );
  }

  /**
   * Pause the route here, record the pause in Redis, then broadcast it. Recorded first: an instance
   * that subscribes in between reads it, and one that missed the broadcast reads it when it starts
   * or its subscriber reconnects. Redis failing does neither, as before: the pause holds here.
   */
  pause(scope: string, ms: number): void {
    if (!(ms > 0)) return;
    this.#local.pause(scope, ms);
    const recorded = evalScript(this.#client, PAUSE_SCRIPT, [PAUSES_KEY], [scope, String(Math.ceil(Math.min(ms, MAX_PAUSE_MS))), String(MAX_PAUSE_MS)]);
    void recorded.catch(() => {}).then(() => this.#client.publish(this.#channel, JSON.stringify({ scope, ms }))).catch(() => {});
  }

  /** Read the pauses other instances recorded before this one listened (the later end of the two wins). Never rejects. */
  start(): Promise<void> {
    return this.#readPauses();
  }

  #readPauses(): Promise<void> {
    return evalReadScript(this.#client, PAUSES_SCRIPT, [PAUSES_KEY], []).then(
      (out) => {
        if (!Array.isArray(out)) return;
        for (let i = 0; i + 1 < out.length; i += 2) {
          const ms = Number(out[i + 1]);
          if (typeof out[i] === 'string' && ms > 0) this.#local.pause(out[i] as string, ms);
        }
      },
      () => {
        // Redis cannot answer: the pauses are read when it is back (its 'ready'), as a broadcast would be missed.
      },
    );
  }

  async close(): Promise<void> {
    this.#client.off('ready', this.#onClientReady);
    this.#subscriber.disconnect();
  }
}
