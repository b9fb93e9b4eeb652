import { hash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { CallerRecord } from './records.ts';

/** Caller tokens: `egt_` + 32 random bytes (base64url), shown once, stored as SHA-256 hashes. */

export const TOKEN_PREFIX = 'egt_';
/** Admin API tokens: the same shape, another prefix, so one can never be mistaken for the other. */
export const ADMIN_TOKEN_PREFIX = 'ega_';
const TOKEN_BYTES = 32;

export function generateToken(prefix = TOKEN_PREFIX): string {
  return prefix + randomBytes(TOKEN_BYTES).toString('base64url');
}

export function hashToken(token: string): string {
  return hash('sha256', token, 'hex');
}

export function newTokenId(): string {
  return randomBytes(4).toString('hex');
}

/** Whether a token still works at `now` (epoch ms): one whose rotation grace has ended does not. */
export function tokenLive(token: CallerRecord['tokens'][number], now: number): boolean {
  return !token.expires_at || Date.parse(token.expires_at) > now;
}

/** How many of a caller's tokens still work at `now`. */
export function liveTokenCount(record: CallerRecord, now = Date.now()): number {
  return record.tokens.filter((t) => tokenLive(t, now)).length;
}

interface IndexedToken {
  readonly hash: Buffer;
  readonly caller: string;
  readonly expiresAt: number;
}

/**
 * The last token presented on one connection and its SHA-256: a keep-alive connection sends the
 * same token with every request, and hashing it was the largest part of identifying the caller.
 */
export interface PresentedToken {
  token?: string;
  digest?: Buffer;
}

export interface Identified {
  /** The caller, when the token is live. */
  readonly caller?: string;
  /** The caller whose expired or revoked token this is. */
  readonly retired?: string;
}

/**
 * Looks a presented token up among every live token. Each candidate is compared with
 * timingSafeEqual and the loop never exits early, so timing says nothing about which bytes matched.
 */
export class CallerIndex {
  readonly #tokens: readonly IndexedToken[];
  readonly #shape: RegExp;

  constructor(callers: Iterable<CallerRecord>, prefix = TOKEN_PREFIX) {
    this.#shape = new RegExp(`^${prefix}[A-Za-z0-9_-]{43}$`);
    const tokens: IndexedToken[] = [];
    for (const caller of callers) {
      for (const t of caller.tokens) {
        const expiresAt = caller.revoked_at ? 0 : t.expires_at ? Date.parse(t.expires_at) : Number.POSITIVE_INFINITY;
        tokens.push({ hash: Buffer.from(t.hash, 'hex'), caller: caller.name, expiresAt });
      }
      for (const hash of caller.revoked_tokens ?? []) tokens.push({ hash: Buffer.from(hash, 'hex'), caller: caller.name, expiresAt: 0 });
    }
    this.#tokens = tokens;
  }

  identify(token: string, now = Date.now()): string | undefined {
    return this.lookup(token, now).caller;
  }

  /**
   * As identify, and also tells when the token is one that expired or was revoked. With `memo` (the
   * connection's last token), a token equal to the last one is not hashed again.
   */
  lookup(token: string, now = Date.now(), memo?: PresentedToken): Identified {
    if (!this.#shape.test(token)) return {};
    let presented: Buffer;
    if (memo?.digest && memo.token === token) {
      presented = memo.digest;
    } else {
      // One-shot hash: no Hash object per request (it showed in profiles of the request path).
      presented = hash('sha256', token, 'buffer');
      if (memo) {
        memo.token = token;
        memo.digest = presented;
      }
    }
    let live: string | undefined;
    let retired: string | undefined;
    for (const t of this.#tokens) {
      if (timingSafeEqual(presented, t.hash)) {
        if (t.expiresAt > now) live = t.caller;
        else retired = t.caller;
      }
    }
    return live ? { caller: live } : retired ? { retired } : {};
  }
}
