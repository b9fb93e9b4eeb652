import { ProxyError } from '../errors.ts';

/** The longest request target accepted (request line path + query). */
export const MAX_TARGET_LENGTH = 8192;

export interface Target {
  /** Canonical path: unreserved escapes decoded, other escapes upper-cased. Starts with "/". */
  readonly path: string;
  readonly segments: readonly string[];
  /** Raw query without "?", passed upstream unchanged; "" when absent. */
  readonly query: string;
}

// RFC 3986 §2.3 unreserved, and the pchar set (§3.3) without "%".
const UNRESERVED = /[A-Za-z0-9\-._~]/;
const PCHAR = new Uint8Array(128);
for (const c of "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@") PCHAR[c.charCodeAt(0)] = 1;
const QUERY_CHAR = PCHAR.slice();
QUERY_CHAR['/'.charCodeAt(0)] = 1;
QUERY_CHAR['?'.charCodeAt(0)] = 1;

const HEX = /^[0-9A-Fa-f]{2}$/;

/**
 * "." and "..", also with path parameters ("..;", ".;x", "..%3B"): Tomcat, Jetty and Spring drop a
 * segment's ";params" before they resolve dot segments, so to them "/files/..;/admin" is "/admin".
 */
const DOT_SEGMENT = /^\.\.?(?:$|;|%3B)/;

function bad(detail: string): ProxyError {
  return new ProxyError('bad_request', detail);
}

/**
 * Parse and canonicalise an origin-form request target (RFC 9112 §3.2.1). Everything a path could
 * use to mean two things is refused rather than interpreted: absolute-form, dot segments (raw or
 * percent-encoded, with or without path parameters), encoded "/" "\" and control bytes,
 * backslashes, empty interior segments and fragments. The result is exactly what is matched and
 * exactly what is sent.
 */
export function parseTarget(raw: string): Target {
  if (raw.length > MAX_TARGET_LENGTH) throw bad('The request target is too long.');
  if (raw[0] !== '/') throw bad('Only origin-form targets ("/path") are accepted on this listener.');
  if (raw.includes('#')) throw bad('Fragments are not allowed in a request target.');

  const q = raw.indexOf('?');
  const rawPath = q === -1 ? raw : raw.slice(0, q);
  const query = q === -1 ? '' : raw.slice(q + 1);

  let path = '';
  for (let i = 0; i < rawPath.length; i++) {
    const ch = rawPath[i]!;
    const code = ch.charCodeAt(0);
    if (ch === '/') {
      path += ch;
    } else if (ch === '%') {
      const hex = rawPath.slice(i + 1, i + 3);
      if (!HEX.test(hex)) throw bad('Malformed percent-encoding in the path.');
      const byte = Number.parseInt(hex, 16);
      if (byte === 0x2f || byte === 0x5c) throw bad('Encoded "/" or "\\" is not allowed in the path.');
      if (byte < 0x20 || byte === 0x7f) throw bad('Encoded control characters are not allowed in the path.');
      const decoded = String.fromCharCode(byte);
      path += UNRESERVED.test(decoded) ? decoded : `%${hex.toUpperCase()}`;
      i += 2;
    } else if (code < 128 && PCHAR[code] === 1) {
      path += ch;
    } else {
      throw bad('The path contains a character that must be percent-encoded.');
    }
  }

  const segments = path.slice(1).split('/');
  for (let i = 0; i < segments.length; i++) {
    const s = segments[i]!;
    if (DOT_SEGMENT.test(s)) throw bad('Dot segments are not allowed in the path.');
    if (s === '' && i < segments.length - 1) throw bad('Empty path segments ("//") are not allowed.');
  }

  for (let i = 0; i < query.length; i++) {
    const ch = query[i]!;
    const code = ch.charCodeAt(0);
    if (ch === '%') {
      const hex = query.slice(i + 1, i + 3);
      if (!HEX.test(hex)) throw bad('Malformed percent-encoding in the query.');
      if (hex === '00') throw bad('Encoded NUL is not allowed in the query.');
      i += 2;
    } else if (!(code < 128 && QUERY_CHAR[code] === 1)) {
      throw bad('The query contains a character that must be percent-encoded.');
    }
  }

  return { path, segments, query };
}
