import { ProxyError } from '../errors.ts';

/** How a credential field holds key bytes. */
export const KEY_ENCODINGS = ['raw', 'hex', 'base64'] as const;
export type KeyEncoding = (typeof KEY_ENCODINGS)[number];

const HEX = /^(?:[0-9a-fA-F]{2})+$/;
// Standard or URL-safe alphabet, padding optional: what providers hand out, and nothing else.
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}(?:==)?|[A-Za-z0-9+/]{3}=?)?$/;
const BASE64URL = /^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}(?:==)?|[A-Za-z0-9_-]{3}=?)?$/;

/**
 * Key bytes from a rendered credential value. Node's decoders skip characters they do not know,
 * which would sign with a different key than the provider issued: a value that is not exactly
 * hex or base64 refuses the request instead (503, the credential is unusable as stored).
 */
export function decodeKey(value: string, encoding: KeyEncoding, what: string): Buffer {
  if (encoding === 'raw') return Buffer.from(value, 'utf8');
  const text = value.trim();
  if (encoding === 'hex') {
    if (!HEX.test(text)) throw new ProxyError('credential_unavailable', `The credential's ${what} is not hex.`);
    return Buffer.from(text, 'hex');
  }
  if (text.length === 0 || !(BASE64.test(text) || BASE64URL.test(text))) {
    throw new ProxyError('credential_unavailable', `The credential's ${what} is not base64.`);
  }
  return Buffer.from(text, BASE64.test(text) ? 'base64' : 'base64url');
}

/** RFC 4648 §5 base64url without padding, as JWS uses (RFC 7515 §2). */
export function base64url(data: Buffer | string): string {
  return (typeof data === 'string' ? Buffer.from(data, 'utf8') : data).toString('base64url');
}

/** A PEM as pasted: one copied out of a JSON download (Coinbase CDP, TrueLayer Console) may keep its "\n" escapes. */
export function pastedPem(text: string): string {
  return text.includes('\\n') ? text.replace(/\\n/g, '\n') : text;
}
