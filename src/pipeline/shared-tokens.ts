import { randomBytes } from 'node:crypto';
import { IntegrityError, open, seal, type Sealed } from '../store/crypto.ts';
import type { KeyringFile } from '../store/keyring-file.ts';
import { evalScript, timeMs, type RedisConnection } from '../store/redis-client.ts';
import { Secret } from '../secret.ts';
import { cacheId, errorText, sameToken, schedule, type Entry, type Minted, type TokenKey } from './token-broker.ts';

const LOCK_MS = 10_000;
const WAIT_STEP_MS = 50;
/** After Redis did not answer, how long the shared side is skipped (minted and kept here), as the rate limiter does. */
const REDIS_PAUSE_MS = 1_000;
/** How long a measure of Redis's clock against this host's is used before it is taken again (a host clock may step). */
const CLOCK_CHECK_MS = 10_000;

/**
 * KEYS: the mint lock; ARGV: its owner, its life in ms. Taken when free. A key in its place that no
 * mint made (no expiry, or one longer than a lock lives: garbage, or a TTL edited by hand) is
 * cleared first: SET NX alone never took it, and every mint of the key waited out LOCK_MS.
 */
const TAKE_LOCK = `
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 or ttl > tonumber(ARGV[2]) then redis.call('DEL', KEYS[1]) end
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return 1 end
return 0`;

/**
 * KEYS: the token document, the refusal window; ARGV: the document as read, the window in ms. A
 * window key that no refusal made (no expiry, or one longer than the window) is cleared first, as
 * TAKE_LOCK does: it kept every refused token, a revoked one included, until the token's own end.
 */
const DROP_REFUSED = `
local doc = redis.call('GET', KEYS[1])
if not doc then return 'absent' end
if doc ~= ARGV[1] then return 'newer' end
local ttl = redis.call('PTTL', KEYS[2])
if ttl == -1 or ttl > tonumber(ARGV[2]) then redis.call('DEL', KEYS[2]) end
if not redis.call('SET', KEYS[2], '1', 'PX', ARGV[2], 'NX') then return 'kept' end
redis.call('DEL', KEYS[1])
return 'dropped'`;

/** A token as Redis keeps it: the tokens sealed, the rest in the clear but bound to them (tokenAad); times in ms on Redis's clock. */
interface SharedDoc {
  readonly kek: number;
  readonly sealed: Sealed;
  readonly refresh?: Sealed;
  readonly expiresAt: number;
  readonly refreshAt: number;
  readonly refreshExpiresAt: number;
  readonly mintedBy: number;
}

/**
 * Associated data of a token sealed in Redis, a JSON tuple as crypto.ts's aad: the cache id (the
 * credential, its version and every route option that shapes the token), so whoever can write
 * Redis cannot file one scope's token under another scope's key; and every other field of the
 * document, so none can be changed either (mintedBy relabelled would keep a token minted with a
 * revoked version in use). Its purpose, "oauth-token", is none of the store's.
 */
function tokenAad(kind: 'access' | 'refresh', id: string, key: TokenKey, doc: Omit<SharedDoc, 'sealed' | 'refresh'>): Buffer {
  return Buffer.from(JSON.stringify(['egress-proxy/v1', 'oauth-token', kind, key.credential, key.version, id, doc.kek, doc.mintedBy, doc.expiresAt, doc.refreshAt, doc.refreshExpiresAt]), 'utf8');
}

/**
 * The Redis side of the broker: the token sealed with the active KEK (AES-256-GCM, associated data
 * naming its cache id: tokenAad), and a lock (SET NX PX) so that one instance mints while the
 * others wait for its result.
 */
export class SharedTokens {
  readonly #client: RedisConnection;
  readonly #keys: KeyringFile;

  /** Until when Redis is not asked, after a command it did not answer (REDIS_PAUSE_MS). */
  #downUntil = 0;
  /** The last measure of Redis's clock against this host's (#clockOffset). */
  #clock: { readonly offset: number; readonly at: number } | undefined;

  constructor(client: RedisConnection, keys: KeyringFile) {
    this.#client = client;
    this.#keys = keys;
  }

  /**
   * One Redis command. After one that got no answer (the command timeout, a dropped connection),
   * those of the next REDIS_PAUSE_MS fail at once: with Redis frozen, each step of a mint (read,
   * lock, write, release) waited out a timeout of its own, and a request waited 2.5 s for a token
   * minted here in the end. A reply (an error Redis sent) says Redis is there.
   */
  async #redis<T>(command: () => Promise<T>): Promise<T> {
    if (performance.now() < this.#downUntil) throw new Error('Redis did not answer a moment ago');
    try {
      return await command();
    } catch (err) {
      if (!(err instanceof Error && err.name === 'ReplyError')) this.#downUntil = performance.now() + REDIS_PAUSE_MS;
      throw err;
    }
  }

  #key(id: string, credential: string): string {
    return `egress:oauth:{${credential}}:${id}`;
  }

  /**
   * The token filed under this cache id; undefined when there is none, it has expired or its
   * key-encryption key is gone. A document that does not open (altered, moved from another cache
   * id, or sealed by a release whose associated data named no cache id) throws IntegrityError: to
   * the broker it is a cache miss like the others.
   */
  async read(id: string, key: TokenKey): Promise<Entry | undefined> {
    const raw = await this.#redis(() => this.#client.get(this.#key(id, key.credential)));
    return raw ? this.#open(id, key, raw, await this.#clockOffset()) : undefined;
  }

  /**
   * Redis's clock minus this host's, in ms, measured with TIME at most every CLOCK_CHECK_MS. The
   * times in a shared document are on Redis's clock, the one every instance reads alike: on each
   * host's own, an instance whose clock was ahead took a token another had just minted for one
   * past its end and minted again (and wrote its own end, as far ahead, for the others), and one
   * behind kept sending a token past its real end.
   */
  async #clockOffset(): Promise<number> {
    const at = performance.now();
    if (this.#clock !== undefined && at - this.#clock.at < CLOCK_CHECK_MS) return this.#clock.offset;
    const sent = Date.now();
    const offset = Math.round(timeMs(await this.#redis(() => this.#client.time())) - (sent + Date.now()) / 2);
    this.#clock = { offset, at };
    return offset;
  }

  /** The document's times are on Redis's clock (`offset` ahead of this host's); the entry's on this host's. */
  #open(id: string, key: TokenKey, raw: string, offset: number): Entry | undefined {
    let doc: SharedDoc;
    try {
      doc = JSON.parse(raw) as SharedDoc;
    } catch {
      throw new IntegrityError('shared token');
    }
    if (typeof doc !== 'object' || doc === null) throw new IntegrityError('shared token');
    const kek = this.#keys.current.get(doc.kek);
    if (!kek || Date.now() + offset >= doc.expiresAt) return undefined;
    const token = open(kek, doc.sealed, tokenAad('access', id, key, doc), 'shared token').toString('utf8');
    const refresh = doc.refresh ? open(kek, doc.refresh, tokenAad('refresh', id, key, doc), 'shared token').toString('utf8') : undefined;
    return {
      mintedBy: doc.mintedBy,
      token: new Secret(token),
      expiresAt: doc.expiresAt - offset,
      refreshAt: doc.refreshAt - offset,
      refreshToken: refresh ? new Secret(refresh) : undefined,
      refreshExpiresAt: doc.refreshExpiresAt ? doc.refreshExpiresAt - offset : 0,
    };
  }

  async #write(id: string, key: TokenKey, entry: Entry): Promise<void> {
    const keyring = this.#keys.current;
    const kek = keyring.get(keyring.active)!;
    const offset = await this.#clockOffset();
    const fields = { kek: keyring.active, expiresAt: entry.expiresAt + offset, refreshAt: entry.refreshAt + offset, refreshExpiresAt: entry.refreshExpiresAt ? entry.refreshExpiresAt + offset : 0, mintedBy: entry.mintedBy };
    const doc: SharedDoc = {
      ...fields,
      sealed: seal(kek, Buffer.from(entry.token.reveal(), 'utf8'), tokenAad('access', id, key, fields)),
      ...(entry.refreshToken ? { refresh: seal(kek, Buffer.from(entry.refreshToken.reveal(), 'utf8'), tokenAad('refresh', id, key, fields)) } : {}),
    };
    const ttl = Math.max(entry.expiresAt, entry.refreshExpiresAt) - Date.now();
    if (ttl > 0) await this.#redis(() => this.#client.set(this.#key(id, key.credential), JSON.stringify(doc), 'PX', ttl));
  }

  /** Mint under the lock; an instance that does not get the lock waits for the winner's token. */
  async mintOnce(id: string, key: TokenKey, mint: () => Promise<Minted>): Promise<Entry> {
    const lock = `${this.#key(id, key.credential)}:lock`;
    const owner = randomBytes(8).toString('hex');
    const before = await this.read(id, key).catch(() => undefined);
    const takeLock = () => this.#redis(() => evalScript(this.#client, TAKE_LOCK, [lock], [owner, String(LOCK_MS)])).then((taken) => (taken === 1 ? 'OK' : null), () => 'OK');
    const minted = async () => {
      const entry = await this.read(id, key).catch(() => undefined);
      return entry && (!before || entry.expiresAt !== before.expiresAt) && Date.now() < entry.refreshAt ? entry : undefined;
    };
    if ((await takeLock()) !== 'OK') {
      const deadline = Date.now() + LOCK_MS;
      while (Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, WAIT_STEP_MS));
        const entry = await minted();
        if (entry) return entry;
        // The holder let go without a token (its mint failed): mint here now, one at a time still,
        // rather than wait out the lock's whole life with the request. Unless its token landed
        // just before it let go.
        if ((await takeLock()) === 'OK') {
          const landed = await minted();
          if (landed) {
            await this.#release(lock, owner);
            return landed;
          }
          break;
        }
      }
    }
    try {
      const entry = schedule(Date.now(), await mint(), key);
      await this.#write(id, key, entry).catch(() => {});
      return entry;
    } finally {
      await this.#release(lock, owner);
    }
  }

  /** Release only our own lock. */
  async #release(lock: string, owner: string): Promise<void> {
    await this.#redis(() => evalScript(this.#client, "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0", [lock], [owner])).catch(() => {});
  }

  /**
   * The upstream refused `token`: delete it from Redis if it is still the token filed under this
   * cache id and no refusal has dropped one there in the last `windowMs` ("dropped"); "kept" if
   * one has; "newer" when another token is filed there; "absent" when none is (or none that
   * opens). The check and the delete are one script, on the document as read: a token written
   * in between is not deleted.
   */
  async dropRefused(id: string, key: TokenKey, token: Secret, windowMs: number): Promise<'dropped' | 'kept' | 'newer' | 'absent'> {
    const docKey = this.#key(id, key.credential);
    const raw = await this.#redis(() => this.#client.get(docKey));
    if (!raw) return 'absent';
    const offset = await this.#clockOffset();
    let held: Entry | undefined;
    try {
      held = this.#open(id, key, raw, offset);
    } catch {
      return 'absent';
    }
    if (!held) return 'absent';
    if (!sameToken(held.token, token)) return 'newer';
    const outcome = await this.#redis(() => evalScript(this.#client, DROP_REFUSED, [docKey, `${docKey}:refused`], [raw, String(windowMs)]));
    return outcome === 'dropped' || outcome === 'kept' || outcome === 'newer' ? outcome : 'absent';
  }

  async remove(id: string, credential: string): Promise<void> {
    await this.#redis(() => this.#client.del(this.#key(id, credential)));
  }
}
