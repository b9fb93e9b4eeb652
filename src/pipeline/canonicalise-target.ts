import { ProxyError } from '../errors.ts';
import type { RequestContext } from './context.ts';
import { codingsOf, hasBody, NO_CONTENT_METHODS, unmetExpectation } from './body.ts';
import { parseTarget } from './target.ts';

/**
 * Refuse unsafe targets before anything else reads them. Node keeps absolute-form targets in
 * req.url (RFC 9112 §3.2.2); on the reverse listener they are refused, as are duplicate Host lines,
 * content on GET, HEAD and TRACE, Transfer-Encoding on HTTP/1.0 or naming a coding other than
 * chunked, and an Expect other than 100-continue.
 */
export function canonicaliseTarget(ctx: RequestContext): void {
  const raw = ctx.req.url ?? '';
  const hostLines = countHeader(ctx.req.rawHeaders, 'host');
  if (hostLines > 1) throw new ProxyError('bad_request', 'Duplicate Host header.');
  // RFC 9112 §3.2: an HTTP/1.1 request without Host is answered 400, absolute-form included.
  if (hostLines === 0 && ctx.req.httpVersionMajor === 1 && ctx.req.httpVersionMinor === 1) throw new ProxyError('bad_request', 'An HTTP/1.1 request must carry a Host header.');
  if (NO_CONTENT_METHODS.has(ctx.req.method ?? '') && hasBody(ctx.req)) throw new ProxyError('bad_request', `A ${ctx.req.method} request cannot carry content.`);
  // Faulty framing (RFC 9112 §6.1): HTTP/1.0 has no transfer codings, so a recipient of the same
  // bytes may read the chunks as the body and then as requests.
  if (ctx.req.httpVersionMinor === 0 && ctx.req.headers['transfer-encoding'] !== undefined) throw new ProxyError('bad_request', 'An HTTP/1.0 request cannot use Transfer-Encoding.');
  // Node's parser takes any codings before a final chunked ("gzip, chunked") and hands over the
  // de-chunked bytes; Transfer-Encoding is hop-by-hop and dropped, so the upstream would get the
  // still-compressed bytes as the body itself, with nothing saying so. A transfer coding the proxy
  // does not apply is refused (RFC 9112 §6.1), before the body is read or anything is sent.
  if (otherTransferCoding(ctx.req.rawHeaders)) throw new ProxyError('bad_request', 'Transfer-Encoding may name only chunked: the proxy applies no other transfer coding (RFC 9112 §6.1).');
  if (unmetExpectation(ctx.req)) throw new ProxyError('expectation_failed');
  if (ctx.forward) {
    // Inside a tunnel, Host must name the CONNECT host (MITM-01): the allowlist was checked for that
    // host only. An absolute-form target names its host itself (RFC 9112 §3.2.2), so there an
    // HTTP/1.0 request may leave Host out (HTTP/1.1 without one is refused by the parser); one
    // that is sent must still name the target's host.
    const host = ctx.req.headers.host?.toLowerCase();
    const { host: fh, port, rawTarget } = ctx.forward;
    const expected = port === 443 || port === 80 ? [fh, `${fh}:${port}`] : [`${fh}:${port}`];
    if (!(host === undefined && rawTarget !== undefined) && !expected.includes(host ?? '')) throw new ProxyError('misdirected_request', 'The Host header does not match the tunnel host.');
  }
  // Absolute-form (a forward-proxy request without CONNECT): the path part, exactly as sent.
  ctx.target = parseTarget(ctx.forward?.rawTarget ?? raw);
}

/** Does any Transfer-Encoding line name a coding other than chunked (identity included, which RFC 9112 dropped)? */
function otherTransferCoding(rawHeaders: readonly string[]): boolean {
  return codingsOf(rawHeaders, (name) => name === 'transfer-encoding').some((c) => c !== 'chunked');
}

export function countHeader(rawHeaders: readonly string[], lowerName: string): number {
  let n = 0;
  for (let i = 0; i < rawHeaders.length; i += 2) if (rawHeaders[i]!.toLowerCase() === lowerName) n++;
  return n;
}
