import { createHash, randomBytes } from 'node:crypto';
import type { Logger } from '../observe/log.ts';
import { Secret } from '../secret.ts';
import { IntegrityError, open, seal, type Sealed } from '../store/crypto.ts';
import type { KeyringFile } from '../store/keyring-file.ts';
import { evalScript, type RedisConnection } from '../store/redis-client.ts';

/** A minted access token and how long it lives. */
export interface Minted {
  readonly token: string;
  readonly expiresInMs: number;
  readonly refreshToken?: string;
  readonly refreshExpiresInMs?: number;
  /** The credential version whose secret minted it (the previous one, after a fallback); default: the key's. */
  readonly mintedBy?: number;
}

interface Entry {
  /** The credential version the token derives from: it goes when that version is no longer live. */
  readonly mintedBy: number;
  readonly token: Secret;
  readonly expiresAt: number;
  readonly refreshAt: number;
  readonly refreshToken: Secret | undefined;
  readonly refreshExpiresAt: number;
}

/** How a cache key is named: the credential version and everything that shapes the token. */
export interface TokenKey {
  readonly credential: string;
  readonly version: number;
  readonly parts: readonly string[];
}

export type Mint = (previous: { refreshToken: string; mintedBy: number } | undefined) => Promise<Minted>;

/** What an injector's `prepare` sees of the broker. */
export interface TokenSource {
  token(key: TokenKey, mint: Mint): Promise<Secret>;
}

/** A token handed out for a request, with its key: what the request names if the upstream refuses it. */
export interface FetchedToken {
  readonly key: TokenKey;
  readonly token: Secret;
}

/**
 * A token is dropped for an upstream refusal (the route's auth_failure) at most once in this time
 * per cache key: across instances when the store is Redis, per instance otherwise (or while Redis
 * cannot be asked). The first refusal drops it at once, so a token the provider revoked early is
 * replaced on the next request. A caller who can make the upstream refuse (a path it always
 * answers 401, a resource the token may not see) would otherwise have a token minted for every
 * such request, and could get the client credentials throttled or locked at the token endpoint.
 * A minute bounds that to one mint a minute per key, 30 times the normal rate of the shortest
 * lifetimes in use (Tink's and Schwab's 1,800 s) at worst, rather than the rate of the caller's
 * requests; the cost is that a token refused again within the minute of a drop (a second early
 * revocation) is kept, and fails requests, for the rest of that minute.
 */
const REFUSED_DROP_MS = 60_000;

/** Tokens are refreshed at 70-80% of their life: jitter spreads instances so they do not all refresh together. */
function schedule(now: number, m: Minted, key: TokenKey): Entry {
  const life = Math.max(1_000, m.expiresInMs);
  return {
    mintedBy: m.mintedBy ?? key.version,
    token: new Secret(m.token),
    expiresAt: now + life,
    refreshAt: now + Math.round(life * (0.7 + Math.random() * 0.1)),
    refreshToken: m.refreshToken ? new Secret(m.refreshToken) : undefined,
    refreshExpiresAt: m.refreshToken ? now + (m.refreshExpiresInMs ?? life) : 0,
  };
}

/**
 * OAuth2 access tokens: cached until shortly before expiry, one refresh at a time. In a process a
 * single promise per key (single flight); across instances, when the store is Redis, the token is
 * shared in Redis (sealed with the active key-encryption key) and a lock lets one instance mint.
 * A failed refresh never drops a token that is still valid.
 */
export class TokenBroker {
  readonly #local = new Map<string, Entry>();
  /** When this instance last dropped a token of each cache id for a refusal (REFUSED_DROP_MS). */
  readonly #droppedAt = new Map<string, number>();
  /** The credential of each cache id. */
  readonly #credentialOf = new Map<string, string>();
  readonly #inflight = new Map<string, Promise<Entry>>();
  readonly #shared: SharedTokens | undefined;
  readonly #log: Logger;
  /** Live credential versions ("id\0version"), from the last view of the store; undefined before the first. */
  #live: ReadonlySet<string> | undefined;

  constructor(log: Logger, shared?: SharedTokens) {
    this.#log = log;
    this.#shared = shared;
  }

  async token(key: TokenKey, mint: Mint): Promise<Secret> {
    const id = cacheId(key);
    this.#credentialOf.set(id, key.credential);
    const now = Date.now();
    let entry = this.#local.get(id);
    if (!entry && this.#shared) {
      entry = await this.#shared.read(id, key).catch((err: unknown) => {
        // Redis unreachable: minted here (mintOnce). A document that does not open: minted afresh
        // and written over it. Either way a miss, never the caller's error; the log names no value.
        if (err instanceof IntegrityError) this.#log.warn({ credential: key.credential }, 'the OAuth2 token shared in Redis does not open (altered, moved from another key, or sealed by an earlier release); minting a new one');
        return undefined;
      });
      if (entry) this.#local.set(id, entry);
    }
    // A token from a version that was revoked or retired since (another instance's, say) is not used, nor refreshed.
    if (entry && !this.#isLive(key.credential, entry)) {
      this.#local.delete(id);
      entry = undefined;
    }
    if (entry && now < entry.refreshAt) return entry.token;
    if (entry && now < entry.expiresAt) {
      // Still valid: refresh in the background; on failure the current token keeps serving.
      void this.#refresh(id, key, mint, entry).catch((err: unknown) => this.#log.warn({ credential: key.credential, reason: errorText(err) }, 'token refresh failed; the current token stays in use until it expires'));
      return entry.token;
    }
    return (await this.#refresh(id, key, mint, entry)).token;
  }

  /**
   * Called with every new view of the store: forget the tokens derived from a credential version
   * that is no longer pending, current or previous. A fallback mints with the previous version and
   * caches the token under the current one, so a revoke of the previous version (the compromise
   * path) must reach it here: otherwise its token, and the refresh token that renews it without
   * the secret, would go on being used.
   */
  retainVersions(live: ReadonlySet<string>): void {
    this.#live = live;
    for (const [id, entry] of this.#local) {
      const credential = this.#credentialOf.get(id);
      if (credential === undefined || this.#isLive(credential, entry)) continue;
      this.#local.delete(id);
      void this.#shared?.remove(id, credential).catch(() => {});
    }
  }

  /**
   * Forget every token of one credential, here and in Redis: a credential created again (after the
   * store lost it) numbers its versions from 1 again, and a token minted with the lost record's
   * version 1 is not one of the new version 1.
   */
  forgetCredential(credential: string): void {
    for (const id of this.#local.keys()) {
      if (this.#credentialOf.get(id) !== credential) continue;
      this.#local.delete(id);
      void this.#shared?.remove(id, credential).catch(() => {});
    }
  }

  #isLive(credential: string, entry: Entry): boolean {
    return this.#live === undefined || this.#live.has(`${credential}\u0000${entry.mintedBy}`);
  }

  /**
   * The upstream refused a request that carried these tokens: drop each, here and in Redis, so the
   * next request mints afresh. Only the token that was refused goes, never one another request or
   * instance has put in its place since; and at most once per REFUSED_DROP_MS per cache key.
   * Resolves true when the next request would carry another token for some key (a replay is
   * worth sending), false when every refused token is kept.
   */
  async refused(fetched: readonly FetchedToken[]): Promise<boolean> {
    let replaced = false;
    for (const { key, token } of fetched) if (await this.#refusedOne(key, token)) replaced = true;
    return replaced;
  }

  async #refusedOne(key: TokenKey, token: Secret): Promise<boolean> {
    const id = cacheId(key);
    if (this.#replacedHere(id, token)) return true;
    // Redis unreachable (undefined): as without Redis.
    const there = this.#shared ? await this.#shared.dropRefused(id, key, token, REFUSED_DROP_MS).catch(() => undefined) : undefined;
    if (this.#replacedHere(id, token)) return true;
    if (there === 'kept') return false;
    if (there === 'dropped') {
      this.#droppedAt.set(id, Date.now());
    } else if (there !== 'newer') {
      // Redis holds no token for the key, or there is no Redis to ask: this instance's window decides.
      if (!this.#local.has(id)) return true;
      const last = this.#droppedAt.get(id);
      if (last !== undefined && Date.now() - last < REFUSED_DROP_MS) return false;
      this.#droppedAt.set(id, Date.now());
    }
    this.#local.delete(id);
    return true;
  }

  /** This instance holds another token for the key than the one refused: it was replaced already. */
  #replacedHere(id: string, token: Secret): boolean {
    const entry = this.#local.get(id);
    return entry !== undefined && !sameToken(entry.token, token);
  }

  #refresh(id: string, key: TokenKey, mint: Mint, old: Entry | undefined): Promise<Entry> {
    let running = this.#inflight.get(id);
    if (!running) {
      running = (async () => {
        const viaRefresh = old?.refreshToken && Date.now() < old.refreshExpiresAt ? { refreshToken: old.refreshToken.reveal(), mintedBy: old.mintedBy } : undefined;
        const entry = this.#shared ? await this.#shared.mintOnce(id, key, () => mint(viaRefresh)) : schedule(Date.now(), await mint(viaRefresh), key);
        this.#local.set(id, entry);
        return entry;
      })().finally(() => this.#inflight.delete(id));
      this.#inflight.set(id, running);
    }
    return running;
  }
}

function cacheId(key: TokenKey): string {
  return createHash('sha256').update(JSON.stringify([key.credential, key.version, ...key.parts])).digest('hex').slice(0, 32);
}

function sameToken(a: Secret, b: Secret): boolean {
  return a === b || a.reveal() === b.reveal();
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message.slice(0, 200) : 'error';
}

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
    const [seconds, micros] = (await this.#redis(() => this.#client.time())).map(Number);
    const offset = Math.round(seconds! * 1000 + micros! / 1000 - (sent + Date.now()) / 2);
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
