import { ConflictError, StoreUnavailableError, UserError } from '../errors.ts';
import type { RecordKind } from './records.ts';
import { once } from 'node:events';
import { evalReadScript, evalScript, readScript, REDIS_LIMITS, SELECT_REFUSED, timeMs, type RedisConnection, type RedisSpec } from './redis-client.ts';
import { decodeUsage, recordKey, toSnapshot } from './file-store.ts';
import { belowFloorError } from './kek-floor.ts';
import type { RecordOf, StoreBackend, StoreSnapshot, UsageEntry } from './types.ts';

/**
 * Keys. The `{egress}` hash tag keeps every store key in one cluster slot, so the scripts below
 * stay atomic under Redis Cluster. Values are the same JSON records the file store holds:
 * ciphertext and metadata only.
 */
export const KEYS = Object.freeze({
  record: (kind: RecordKind, id: string) => `egress:{egress}:${kind}:${id}`,
  recordPrefix: (kind: RecordKind) => `egress:{egress}:${kind}:`,
  index: (kind: RecordKind) => `egress:{egress}:index:${kind}`,
  version: 'egress:{egress}:version',
  /** The lowest master key version a new data key may be wrapped by (kek-floor.ts). */
  kekFloor: 'egress:{egress}:kek-floor',
  usage: (id: string) => `egress:{egress}:usage:${id}`,
  channel: 'egress:store:changes',
});

/**
 * The master key floor as a number when the stored value is a whole number (digits, as
 * kekFloor() reads it), nil otherwise. Lua's tonumber also takes "inf", "1e999", "2.5" and "0x10":
 * a floor edited by hand into one of those refused every new data key for good (no rotation could
 * raise it past infinity), while kekFloor() and `master-key status` reported no floor.
 */
const WHOLE_FLOOR = `
local function wholeFloor(v)
  if type(v) ~= 'string' then return nil end
  local digits = string.match(v, '^%s*(%d+)%s*$')
  local n = digits and tonumber(digits)
  if n and n <= 9007199254740991 then return n end
  return nil
end
`;

/**
 * Compare-and-set one record: write only when its stored revision is the one the writer read, and
 * it wraps no new data key below the store's master key floor (kek-floor.ts: newWrapBelow, the
 * same rule). Everything that can fail goes before the record is written (a script is not rolled
 * back: a failure after the SET left the record changed, the writer told it failed, and no
 * instance told of the change). A change counter edited by hand (not an integer, or another type)
 * is started again from the server's clock, so every watcher sees it change.
 */
const PUT_SCRIPT = `${WHOLE_FLOOR}
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' and cur.err then return {-2, 0} end
local rev = 0
local stored
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' and tonumber(doc['revision']) then rev = tonumber(doc['revision']); stored = doc else rev = -1 end
end
if rev ~= tonumber(ARGV[2]) then return {0, rev} end
local floor = wholeFloor(redis.pcall('GET', KEYS[4]))
if floor then
  local function wraps(record)
    local out = {}
    if type(record) == 'table' and type(record['versions']) == 'table' then
      for _, v in ipairs(record['versions']) do
        local d = type(v) == 'table' and v['dek']
        if type(d) == 'table' then
          out[#out + 1] = {v['kek'], tostring(v['version']) .. ':' .. tostring(v['kek']) .. ':' .. tostring(d['nonce']) .. ':' .. tostring(d['ct']) .. ':' .. tostring(d['tag'])}
        end
      end
    end
    return out
  end
  local held = {}
  for _, w in ipairs(wraps(stored)) do held[w[2]] = true end
  for _, w in ipairs(wraps(cjson.decode(ARGV[1]))) do
    local kek = tonumber(w[1])
    if not held[w[2]] and (not kek or kek < floor) then return {-3, kek or 0, floor} end
  end
end
local v = redis.pcall('INCR', KEYS[3])
if type(v) == 'table' and v.err then
  local t = redis.call('TIME')
  v = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[3], v)
end
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[4], v)
return {1, v}
`;

/** The floor only rises; a value edited by hand (not a whole number, another type) counts as no floor. */
const RAISE_FLOOR_SCRIPT = `${WHOLE_FLOOR}
local floor = wholeFloor(redis.pcall('GET', KEYS[1])) or 0
if tonumber(ARGV[1]) > floor then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
`;

/**
 * One consistent snapshot of every record, in one round trip. Wrong-typed or missing values are
 * marked. It writes nothing: run as a read, a write pause does not hold it (see evalReadScript).
 */
const LOAD_SCRIPT = readScript(`
local out = {}
for i = 1, 3 do
  local items = {}
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    local v = redis.pcall('GET', ARGV[i] .. m)
    if type(v) == 'table' then v = '!wrongtype' elseif not v then v = '!missing' end
    items[#items + 1] = m
    items[#items + 1] = v
  end
  out[#out + 1] = items
end
local v = redis.pcall('GET', KEYS[4])
if type(v) ~= 'string' then v = '0' end
out[#out + 1] = v
return out
`);

/**
 * Keep the later of the stored and the given time for each "version|caller" field. Usage is a
 * hint: a key of another type (damage) is replaced, where it failed every flush for good.
 */
const USAGE_SCRIPT = `
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then redis.call('DEL', KEYS[1]) end
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if not cur or cur < ARGV[i + 1] then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
`;

/** ioredis's errors for a command that got no answer: the command timeout, a dropped or unwritable connection. */
const UNANSWERED = /^(Command timed out|Connection is closed|Stream isn't writeable)/;

/** How often a watcher re-reads the version counter, in case a pub/sub message was missed. */
const POLL_MS = 500;

export class RedisStore implements StoreBackend {
  readonly description: string;
  readonly client: RedisConnection;
  readonly #spec: RedisSpec;
  /** Why the last connection attempt failed (ECONNREFUSED, …), for the error a command gets meanwhile. */
  #connectError: string | undefined;
  /** The server refused the URL's database number, on the last connection attempt. */
  #selectRefused = false;

  constructor(spec: RedisSpec) {
    this.#spec = spec;
    this.description = spec.description;
    this.client = spec.connect();
    // Connection errors surface as failed commands; an unhandled 'error' event must not crash the process.
    this.client.on('error', (err: NodeJS.ErrnoException) => {
      if (SELECT_REFUSED.test(err.message)) {
        // The connection drops itself (refuseMissingDatabase); the refusal is what to report.
        this.#selectRefused = true;
      } else if (this.#selectRefused) {
        return; // the dropped connection's own errors: the refusal is the reason to give
      }
      this.#connectError = err.code ?? err.message.split('\n')[0]!.slice(0, 120);
    });
    this.client.on('ready', () => {
      this.#connectError = undefined;
      this.#selectRefused = false;
    });
  }

  /**
   * With no offline queue, a command sent while connecting fails at once. Store calls (rare: a
   * CLI command, a reload) wait for the connection, but never longer than the connect timeout.
   */
  async #ready(): Promise<void> {
    if (this.client.status === 'ready') return;
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), REDIS_LIMITS.connectTimeoutMs);
    try {
      await once(this.client, 'ready', { signal: ac.signal });
    } catch {
      // Not connected in time: say so, rather than let the command fail with ioredis's offline-queue error.
      // (The status moves while we wait: TypeScript still has it narrowed from the check above.)
      if ((this.client.status as string) !== 'ready') {
        throw new StoreUnavailableError(`the store ${this.description} is unreachable (${this.#connectError ?? `no connection within ${REDIS_LIMITS.connectTimeoutMs / 1000} s`}): nothing was read or written`);
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * A command Redis did not answer (the command timeout passed, the connection dropped) as a
   * StoreUnavailableError that says what it means for the data: a write with no answer may have
   * been applied. Anything else as it is.
   */
  #unanswered(err: unknown, write: boolean): unknown {
    if (!(err instanceof Error) || !UNANSWERED.test(err.message)) return err;
    const what = write ? 'the write may or may not have been applied; read it back before trying again' : 'nothing was read';
    return new StoreUnavailableError(`the store ${this.description} did not answer (${err.message.split('\n')[0]!.replace(/\.$/, '').slice(0, 80)}): ${what}`);
  }

  async #command<T>(write: boolean, run: () => Promise<T>): Promise<T> {
    await this.#ready();
    try {
      return await run();
    } catch (err) {
      throw this.#unanswered(err, write);
    }
  }

  async load(): Promise<StoreSnapshot> {
    const result = (await this.#command(false, () => evalReadScript(this.client, LOAD_SCRIPT, [KEYS.index('credential'), KEYS.index('caller'), KEYS.index('admin'), KEYS.version], [KEYS.recordPrefix('credential'), KEYS.recordPrefix('caller'), KEYS.recordPrefix('admin')]))) as [string[], string[], string[], string];
    return toSnapshot({ credentials: decodePairs(result[0]), callers: decodePairs(result[1]), admins: decodePairs(result[2]) });
  }

  async put<K extends RecordKind>(kind: K, record: RecordOf<K>, expectedRevision: number): Promise<void> {
    const key = recordKey(kind, record);
    await this.#ready();
    let reply: unknown;
    try {
      reply = await evalScript(this.client, PUT_SCRIPT, [KEYS.record(kind, key), KEYS.index(kind), KEYS.version, KEYS.kekFloor], [JSON.stringify(record), String(expectedRevision), key, KEYS.channel]);
    } catch (err) {
      throw this.#writeRefused(err);
    }
    const [ok, found, floor] = reply as [number, number, number?];
    if (ok === 1) return;
    if (ok === -3) throw belowFloorError(key, found, floor!);
    if (ok === -2) throw new UserError(`${kind} "${key}" is stored under a Redis key of the wrong type; remove ${KEYS.record(kind, key)} by hand`);
    throw new ConflictError(`${kind} "${key}" was changed by another writer (revision ${found}, expected ${expectedRevision}); re-read and try again`);
  }

  async kekFloor(): Promise<number> {
    const value = await this.#command(false, () => this.client.get(KEYS.kekFloor));
    const floor = Number(value);
    return value !== null && /^\d+$/.test(value.trim()) && Number.isSafeInteger(floor) ? floor : 0;
  }

  async raiseKekFloor(version: number): Promise<void> {
    await this.#ready();
    try {
      await evalScript(this.client, RAISE_FLOOR_SCRIPT, [KEYS.kekFloor], [String(version)]);
    } catch (err) {
      throw this.#writeRefused(err);
    }
  }

  /** A write's error, saying plainly when Redis refuses every write. */
  #writeRefused(err: unknown): unknown {
    // A replica (a failover in progress, or EGRESS_STORE pointing at the wrong node) refuses writes.
    if (err instanceof Error && err.message.startsWith('READONLY')) return new StoreUnavailableError(`the store ${this.description} is a read-only replica (READONLY): writes go to the primary; nothing was written`);
    // Out of memory under maxmemory with noeviction: Redis refuses every write.
    if (err instanceof Error && err.message.startsWith('OOM')) return new StoreUnavailableError(`the store ${this.description} is out of memory (Redis maxmemory reached, OOM): nothing was written; free memory or raise maxmemory`);
    return this.#unanswered(err, true);
  }

  async recordUsage(entries: readonly UsageEntry[]): Promise<void> {
    const byCredential = new Map<string, string[]>();
    for (const e of entries) {
      const args = byCredential.get(e.credential) ?? [];
      args.push(`${e.version}|${e.caller}`, e.at);
      byCredential.set(e.credential, args);
    }
    await this.#command(true, () => Promise.all([...byCredential].map(([id, args]) => evalScript(this.client, USAGE_SCRIPT, [KEYS.usage(id)], args))));
  }

  async readUsage(credential: string): Promise<UsageEntry[]> {
    const usage = await this.#command(false, () => this.client.hgetall(KEYS.usage(credential)).catch((err: unknown) => {
      // A damaged usage key (another type) is no usage, not a `keys show` that fails: it is a hint.
      if (err instanceof Error && err.message.startsWith('WRONGTYPE')) return {};
      throw err;
    }));
    return decodeUsage(credential, usage);
  }

  async now(): Promise<number> {
    return Math.floor(timeMs(await this.#command(false, () => this.client.time())));
  }

  /** Pub/sub for speed, and a poll of the version counter (and of reachability) as the safety net. */
  watch(listener: () => void): () => void {
    const subscriber = this.#spec.connect();
    subscriber.on('error', () => {});
    subscriber.on('message', () => listener());
    subscriber.on('ready', () => {
      void subscriber.subscribe(KEYS.channel).catch(() => {});
      listener();
    });
    let last: string | undefined;
    let failing = false;
    const timer = setInterval(() => {
      this.client.get(KEYS.version).then(
        (v) => {
          if (v !== last || failing) listener();
          last = v ?? undefined;
          failing = false;
        },
        () => {
          failing = true;
          listener();
        },
      );
    }, POLL_MS);
    timer.unref();
    return () => {
      clearInterval(timer);
      subscriber.disconnect();
    };
  }

  /**
   * Call `onRisk` with the server's eviction policy when it may evict keys without an expiry
   * (`allkeys-*`), on every connection: store records have none, and such a Redis deletes them
   * under memory pressure, silently (an instance started afterwards knows nothing of the records
   * it lost: no credentials, no callers). `noeviction` and the `volatile-*` policies never touch
   * them. A server that refuses INFO (an ACL without it, a renamed command) says nothing here.
   */
  onEvictionRisk(onRisk: (policy: string) => void): void {
    const check = () => {
      this.client.info('memory').then(
        (text) => {
          const policy = /^maxmemory_policy:(\S+)/m.exec(text)?.[1];
          if (policy?.startsWith('allkeys-')) onRisk(policy);
        },
        () => {},
      );
    };
    this.client.on('ready', check);
    if (this.client.status === 'ready') check();
  }

  /** Another connection to the same Redis (subscribers need their own). */
  connectAgain(): RedisConnection {
    return this.#spec.connect();
  }

  async close(): Promise<void> {
    this.client.disconnect();
  }
}

/** [member, value, member, value…] -> records; damaged values become objects the record schema refuses. */
function decodePairs(pairs: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = Object.create(null);
  for (let i = 0; i < pairs.length; i += 2) {
    const value = pairs[i + 1]!;
    try {
      out[pairs[i]!] = value.startsWith('!') ? { damaged: value.slice(1) } : JSON.parse(value);
    } catch {
      out[pairs[i]!] = { damaged: 'not JSON' };
    }
  }
  return out;
}
