import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
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
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

export function newTokenId(): string {
  return randomBytes(4).toString('hex');
}

interface IndexedToken {
  readonly hash: Buffer;
  readonly caller: string;
  readonly expiresAt: number;
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
      if (caller.revoked_at) continue;
      for (const t of caller.tokens) {
        tokens.push({ hash: Buffer.from(t.hash, 'hex'), caller: caller.name, expiresAt: t.expires_at ? Date.parse(t.expires_at) : Number.POSITIVE_INFINITY });
      }
    }
    this.#tokens = tokens;
  }

  identify(token: string, now = Date.now()): string | undefined {
    if (!this.#shape.test(token)) return undefined;
    const presented = createHash('sha256').update(token, 'utf8').digest();
    let found: string | undefined;
    for (const t of this.#tokens) {
      if (timingSafeEqual(presented, t.hash) && t.expiresAt > now) found = t.caller;
    }
    return found;
  }
}
