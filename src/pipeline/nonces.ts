import { evalScript, type RedisConnection } from '../store/redis-client.ts';

/**
 * Strictly increasing nonces per credential (Kraken: "always increasing, unsigned 64-bit"). Based on
 * the clock in microseconds, so a restart does not go backwards, and never below the last one given.
 */
export interface NonceSource {
  next(credential: string): Promise<bigint>;
}

export class MemoryNonces implements NonceSource {
  readonly #last = new Map<string, bigint>();

  async next(credential: string): Promise<bigint> {
    const clock = BigInt(Date.now()) * 1000n;
    const last = this.#last.get(credential) ?? 0n;
    const n = clock > last ? clock : last + 1n;
    this.#last.set(credential, n);
    return n;
  }
}

/** max(clock in µs on Redis's TIME, last + 1), atomically: every instance shares one sequence per credential. */
const NEXT_SCRIPT = `
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local n = clock
if n <= last then n = last + 1 end
redis.call('SET', KEYS[1], string.format('%.0f', n))
return string.format('%.0f', n)
`;

export class RedisNonces implements NonceSource {
  readonly #client: RedisConnection;

  constructor(client: RedisConnection) {
    this.#client = client;
  }

  async next(credential: string): Promise<bigint> {
    // No local fallback: a nonce that might repeat one another instance used is refused upstream anyway.
    return BigInt((await evalScript(this.#client, NEXT_SCRIPT, [`egress:nonce:{${credential}}`], [])) as string);
  }
}
