import { ProxyError } from '../errors.ts';
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

/**
 * max(clock in µs on Redis's TIME, last + 1, ARGV[1] + 1), atomically: every instance shares one
 * sequence per credential. ARGV[1] is the highest nonce the calling instance was given: when Redis
 * lost the counter (a restart without its data, an eviction) and its clock is behind nonces given
 * before (they ran ahead of it, or an earlier Redis's clock was ahead), the sequence goes on above
 * them rather than restart below, where Kraken refuses every request (EAPI:Invalid nonce) until
 * the clock catches up. A stored value that is no nonce (another type, not a number, negative, or 2^53 and
 * up, where + 1 is lost and "inf" is no integer) is damage: the sequence starts again from the
 * clock, and the value is overwritten. It failed every signed request of the credential with a
 * 500 until someone removed the key by hand.
 */
const NEXT_SCRIPT = `
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = redis.pcall('GET', KEYS[1])
local last = type(stored) == 'string' and tonumber(stored) or 0
if last ~= last or last < 0 or last >= 9007199254740992 then last = 0 end
local given = tonumber(ARGV[1]) or 0
if given > last and given < 9007199254740992 then last = given end
local n = clock
if n <= last then n = last + 1 end
redis.call('SET', KEYS[1], string.format('%.0f', n))
return string.format('%.0f', n)
`;

export class RedisNonces implements NonceSource {
  readonly #client: RedisConnection;
  /** The highest nonce given to this instance, per credential (see NEXT_SCRIPT). */
  readonly #given = new Map<string, bigint>();

  constructor(client: RedisConnection) {
    this.#client = client;
  }

  async next(credential: string): Promise<bigint> {
    // No local fallback: a nonce that might repeat one another instance used is refused upstream
    // anyway. Redis down, frozen or refusing writes is the store being unavailable (503), not a
    // fault of the proxy's (500).
    let reply: unknown;
    try {
      reply = await evalScript(this.#client, NEXT_SCRIPT, [`egress:nonce:{${credential}}`], [String(this.#given.get(credential) ?? 0n)]);
    } catch (err) {
      throw new ProxyError('credential_unavailable', 'No nonce could be taken from the store; nothing was sent.', { cause: err });
    }
    const nonce = BigInt(reply as string);
    if (nonce > (this.#given.get(credential) ?? 0n)) this.#given.set(credential, nonce);
    return nonce;
  }
}
