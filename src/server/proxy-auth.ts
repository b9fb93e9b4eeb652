import type { IncomingMessage } from 'node:http';
import { countHeader } from '../pipeline/canonicalise-target.ts';

/** Proxy-Authorization sent more than once: Node keeps only the first, so the order would choose the caller. */
export const AMBIGUOUS = Symbol('ambiguous Proxy-Authorization');

/**
 * The caller token in a forward-mode request's Proxy-Authorization (CONNECT or absolute form):
 * undefined when absent or not a token, AMBIGUOUS when the header came more than once.
 */
export function proxyAuthorizationToken(req: IncomingMessage): string | undefined | typeof AMBIGUOUS {
  if (countHeader(req.rawHeaders, 'proxy-authorization') > 1) return AMBIGUOUS;
  return tokenFromAuthorization(req.headers['proxy-authorization']);
}

/**
 * The token in an Authorization or Proxy-Authorization value: `Bearer <token>`, or Basic with the
 * token as the password (what HTTPS_PROXY=http://caller:token@… and browsers send). Undefined for
 * anything else, malformed percent-escapes included: a header must never be able to throw here.
 */
export function tokenFromAuthorization(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const bearer = bearerToken(header);
  if (bearer) return bearer;
  const basic = /^Basic ([A-Za-z0-9+/=]+)$/i.exec(header);
  if (!basic) return undefined;
  const decoded = Buffer.from(basic[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon === -1) return undefined;
  try {
    return decodeURIComponent(decoded.slice(colon + 1));
  } catch {
    return undefined;
  }
}

/** The token of `Bearer <token>` only: a scheme a browser never sends by itself. */
export function bearerToken(header: string | undefined): string | undefined {
  return header ? /^Bearer (\S+)$/i.exec(header)?.[1] : undefined;
}
