import { createHash } from 'node:crypto';
import { ProxyError } from '../errors.ts';
import type { Logger } from '../observe/log.ts';
import { Secret } from '../secret.ts';
import { IntegrityError } from '../store/crypto.ts';
import type { SharedTokens } from './shared-tokens.ts';

/** A minted access token and how long it lives. */
export interface Minted {
  readonly token: string;
  readonly expiresInMs: number;
  readonly refreshToken?: string;
  readonly refreshExpiresInMs?: number;
  /** The credential version whose secret minted it (the previous one, after a fallback); default: the key's. */
  readonly mintedBy?: number;
}

export interface Entry {
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

/** `previous`: the refresh token in hand, the version that minted it and how long it still lives. */
export type Mint = (previous: { refreshToken: string; mintedBy: number; refreshExpiresInMs: number } | undefined) => Promise<Minted>;

/** What an injector's `prepare` sees of the broker. */
export interface TokenSource {
  token(key: TokenKey, mint: Mint): Promise<Secret>;
}

/** A token handed out for a request, with its key: what the request names if the upstream refuses it. */
export interface FetchedToken {
  readonly key: TokenKey;
  readonly token: Secret;
  /** The credential version whose secret minted it: the previous one after a fallback, for as long as the token lives. */
  readonly mintedBy: number;
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

/**
 * After a failed mint (the token endpoint unreachable, a 5xx, a timeout, an answer of no use, a
 * rejection of the route's options or of every client secret tried) no token request is made for
 * the cache key for a second, twice as long after each further failure in a row, 10 s at most (a
 * token endpoint that is back is asked within 10 s); a token endpoint's Retry-After wins when it
 * is longer. Without it every request that needed a token asked again the moment the last answer
 * came: a dead or overloaded token endpoint was hammered at the rate of the callers' requests,
 * and each of them waited on an attempt of its own. A still-valid token keeps serving meanwhile;
 * a successful mint ends the run of failures.
 */
const HOLD_OFF_FIRST_MS = 1_000;
const HOLD_OFF_MAX_MS = 10_000;

/** Tokens are refreshed at 70-80% of their life: jitter spreads instances so they do not all refresh together. */
export function schedule(now: number, m: Minted, key: TokenKey): Entry {
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
  /**
   * Failed mints, by cache id: until when (monotonic) none is tried (HOLD_OFF_FIRST_MS doubled per
   * failure in a row, or the token endpoint's Retry-After if longer), how many failed in a row, and
   * the last refusal. Without it every request, and every background refresh, asked the token
   * endpoint again the moment the last answer came, one after another for as long as callers sent
   * requests: a rate limit kept in force, or extended, by the proxy itself. An entry outlives its
   * hold-off by HOLD_OFF_MAX_MS, so that a failure soon after it ends counts as one more in a row;
   * later, the run is over and the entry goes (#sweepHoldOffs).
   */
  readonly #holdOff = new Map<string, HoldOff>();
  readonly #shared: SharedTokens | undefined;
  readonly #log: Logger;
  /** Live credential versions ("id\0version"), from the last view of the store; undefined before the first. */
  #live: ReadonlySet<string> | undefined;

  constructor(log: Logger, shared?: SharedTokens) {
    this.#log = log;
    this.#shared = shared;
  }

  async token(key: TokenKey, mint: Mint): Promise<Secret> {
    return (await this.entry(key, mint)).token;
  }

  /** As `token`, with the version that minted it (a request's use of that version, for the usage record). */
  async entry(key: TokenKey, mint: Mint): Promise<Entry> {
    const id = cacheId(key);
    this.#credentialOf.set(id, key.credential);
    const now = Date.now();
    let entry = this.#local.get(id);
    // With Redis, another instance may hold a token where this one holds none, or only an expired
    // one (whose refresh token a mint here may still use): one it minted while this instance's
    // mints failed, say, and this one holds off its own.
    if ((!entry || now >= entry.expiresAt) && this.#shared) {
      const local = entry;
      entry = await this.#shared.read(id, key).catch((err: unknown) => {
        // Redis unreachable: minted here (mintOnce). A document that does not open: minted afresh
        // and written over it. Either way a miss, never the caller's error; the log names no value.
        if (err instanceof IntegrityError) this.#log.warn({ credential: key.credential }, 'the OAuth2 token shared in Redis does not open (altered, moved from another key, or sealed by an earlier release); minting a new one');
        return undefined;
      });
      if (entry) this.#local.set(id, entry);
      else entry = local;
    }
    // A token from a version that was revoked or retired since (another instance's, say) is not used, nor refreshed.
    if (entry && !this.#isLive(key.credential, entry)) {
      this.#local.delete(id);
      entry = undefined;
    }
    if (entry && now < entry.refreshAt) return entry;
    const heldOff = this.#heldOff(id);
    if (entry && now < entry.expiresAt) {
      // Still valid: refresh in the background; on failure the current token keeps serving.
      if (!heldOff) void this.#refresh(id, key, mint, entry).catch((err: unknown) => this.#log.warn({ credential: key.credential, reason: errorText(err) }, 'token refresh failed; the current token stays in use until it expires'));
      return entry;
    }
    if (heldOff) throw heldOffError(heldOff);
    const minted = await this.#refresh(id, key, mint, entry);
    // Minted with the previous version (a fallback), which was revoked or retired while the token
    // endpoint answered: the token derives from a version that may no longer be used, and goes
    // nowhere. (A token of the key's own version is the request's to refuse: it checks that version
    // before it goes, and resolves again.)
    if (minted.mintedBy !== key.version && !this.#isLive(key.credential, minted)) {
      if (this.#local.get(id) === minted) this.#local.delete(id);
      void this.#shared?.remove(id, key.credential).catch(() => {});
      throw new ProxyError('credential_unavailable', 'The credential version the access token was minted with was revoked or retired meanwhile.');
    }
    return minted;
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
    this.#sweepHoldOffs(performance.now());
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

  /** The hold-off of this cache id while it runs; undefined when none does. */
  #heldOff(id: string): HoldOff | undefined {
    const held = this.#holdOff.get(id);
    return held !== undefined && performance.now() < held.until ? held : undefined;
  }

  /**
   * A mint of this cache id failed: hold off the next one, longer for each failure in a row. Only
   * the token endpoint's failures (credential_unavailable): a token_url on an address the route
   * may not reach (route_forbidden) sends nothing to hold off, and is refused alike every time.
   */
  #failed(id: string, err: unknown): void {
    if (!(err instanceof ProxyError) || err.code !== 'credential_unavailable') return;
    const now = performance.now();
    this.#sweepHoldOffs(now);
    // What the sweep left is a run still going on.
    const failures = (this.#holdOff.get(id)?.failures ?? 0) + 1;
    const askedMs = Number(err.headers['retry-after']) * 1000 || 0;
    const backoffMs = Math.min(HOLD_OFF_MAX_MS, HOLD_OFF_FIRST_MS * 2 ** Math.min(failures - 1, 16));
    this.#holdOff.set(id, { until: now + Math.max(backoffMs, askedMs), failures, error: err });
  }

  /**
   * Forget the runs of failures that are over (no failure within HOLD_OFF_MAX_MS of the end of
   * their hold-off). Done at each failure and each new view of the store: the entries of cache
   * keys no longer asked for (a version retired, a route changed or removed) go with them, so the
   * map holds only the keys that failed lately, however many keys come and go.
   */
  #sweepHoldOffs(now: number): void {
    for (const [id, held] of this.#holdOff) if (now - held.until >= HOLD_OFF_MAX_MS) this.#holdOff.delete(id);
  }

  #refresh(id: string, key: TokenKey, mint: Mint, old: Entry | undefined): Promise<Entry> {
    let running = this.#inflight.get(id);
    if (!running) {
      running = (async () => {
        const now = Date.now();
        const viaRefresh = old?.refreshToken && now < old.refreshExpiresAt ? { refreshToken: old.refreshToken.reveal(), mintedBy: old.mintedBy, refreshExpiresInMs: old.refreshExpiresAt - now } : undefined;
        let entry: Entry;
        try {
          entry = this.#shared ? await this.#shared.mintOnce(id, key, () => mint(viaRefresh)) : schedule(Date.now(), await mint(viaRefresh), key);
        } catch (err) {
          this.#failed(id, err);
          throw err;
        }
        this.#holdOff.delete(id);
        this.#local.set(id, entry);
        return entry;
      })().finally(() => this.#inflight.delete(id));
      this.#inflight.set(id, running);
    }
    return running;
  }
}

interface HoldOff {
  readonly until: number;
  readonly failures: number;
  readonly error: ProxyError;
}

/** The refusal of a request that needs a new token while a hold-off runs: the last failure's, with the seconds left. */
function heldOffError(held: HoldOff): ProxyError {
  const leftS = Math.max(1, Math.ceil((held.until - performance.now()) / 1000));
  return new ProxyError(held.error.code, held.error.detail, { headers: { ...held.error.headers, 'retry-after': String(leftS) } });
}

export function cacheId(key: TokenKey): string {
  return createHash('sha256').update(JSON.stringify([key.credential, key.version, ...key.parts])).digest('hex').slice(0, 32);
}

export function sameToken(a: Secret, b: Secret): boolean {
  return a === b || a.reveal() === b.reveal();
}

export function errorText(err: unknown): string {
  return err instanceof Error ? err.message.slice(0, 200) : 'error';
}
