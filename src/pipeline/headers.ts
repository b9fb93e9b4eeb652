import type { HeaderMap } from '../injectors/types.ts';
import { type RouteScope, scopeLocation, scopeSetCookie } from './route-scope.ts';

/**
 * Header hygiene, RFC 9110 §7.6.1: hop-by-hop headers and anything the Connection header lists
 * never cross the proxy; neither do the caller's token, proxy credentials, forwarding claims that a
 * caller could forge, or method and target overrides that would change what the allowlist approved.
 */
const DROP_ALWAYS = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'http2-settings',
  'proxy-authorization', 'proxy-authenticate',
  'host', 'content-length', 'expect',
  'x-egress-token',
  'forwarded', 'x-forwarded-for', 'x-forwarded-host', 'x-forwarded-proto', 'x-forwarded-port', 'x-forwarded-prefix',
  'x-real-ip', 'via', 'x-forwarded-client-cert', 'x-ssl-client-cert', 'x-ssl-client-s-dn', 'x-client-cert', 'x-caller-id',
  // The client's address and verified certificate under the names CDNs, load balancers and TLS terminators use.
  'true-client-ip', 'x-client-ip', 'x-cluster-client-ip', 'cf-connecting-ip', 'fastly-client-ip', 'x-originating-ip',
  'x-remote-ip', 'x-remote-addr', 'client-ip', 'x-client-verify', 'x-client-dn',
  // A client certificate as TLS terminators pass it on: RFC 9440, Azure App Service, nginx configs.
  'client-cert', 'client-cert-chain', 'x-arr-clientcert', 'x-ssl-cert', 'ssl-client-cert', 'ssl-client-verify',
  'x-http-method-override', 'x-http-method', 'x-method-override',
  // Target overrides: IIS URL Rewrite, Zend/Laminas and older Symfony route on these instead of
  // the request line, so the path the allowlist approved would not be the path served.
  'x-original-url', 'x-rewrite-url', 'x-original-uri', 'x-envoy-original-path', 'x-override-url',
]);

/** Whole families of forwarding and client-certificate claims (x-forwarded-uri, x-ssl-client-verify, AWS ALB's x-amzn-mtls-clientcert-subject, …). */
const DROP_PREFIXES = ['x-forwarded-', 'x-ssl-client-', 'x-amzn-mtls-clientcert'];

/** A lower-cased name with "_" folded to "-" that is always dropped. */
function alwaysDropped(folded: string): boolean {
  return DROP_ALWAYS.has(folded) || DROP_PREFIXES.some((prefix) => folded.startsWith(prefix));
}

/** Never passed through, whatever the route says (caller_headers may not list these). */
export function removedByProxy(name: string): boolean {
  return alwaysDropped(name.toLowerCase().replaceAll('_', '-'));
}

/**
 * What a route that lists `caller_headers` lets through besides those: content and negotiation
 * headers (RFC 9110 §8, §12, §13), Idempotency-Key and W3C trace context. Anything else a caller
 * sends (custom auth, vendor headers) is dropped unless the route names it.
 */
const STANDARD_CALLER_HEADERS = new Set([
  'accept', 'accept-encoding', 'accept-language', 'content-type', 'content-encoding', 'content-language',
  'user-agent', 'cache-control', 'pragma', 'date', 'range', 'if-range',
  'if-match', 'if-none-match', 'if-modified-since', 'if-unmodified-since',
  'idempotency-key', 'traceparent', 'tracestate',
]);

/**
 * Whether outboundHeaders lets a caller's header of this name through on a route with these
 * caller_headers (lower-cased), claims and Connection aside. For the route loader.
 */
export function callerHeaderPasses(name: string, callerHeaders: ReadonlySet<string> | undefined): boolean {
  const lower = name.toLowerCase();
  return routeLets(lower, lower.replaceAll('_', '-'), callerHeaders);
}

/** The route's part of outboundHeaders' decision on a caller header (`name` lower-cased, `folded` with "_" as "-"). */
function routeLets(name: string, folded: string, callerHeaders: ReadonlySet<string> | undefined): boolean {
  if (alwaysDropped(folded)) return false;
  if (folded === 'authorization' && callerHeaders?.has('authorization') !== true) return false;
  return !callerHeaders || STANDARD_CALLER_HEADERS.has(name) || callerHeaders.has(name);
}

const CONNECTION = 'connection';

/**
 * The request carries header `name` (lower-case) exactly once, non-empty, and it goes upstream as
 * it came: no second line under it or under a spelling servers fold into it ("_" for "-"), and not
 * listed in Connection (outboundHeaders drops it then). A request with an idempotency key is safe
 * to send twice only so: the upstream sees the same single key both times. One pass over the raw
 * lines; only names of its length (or Connection's) are lower-cased.
 */
export function carriesOnce(rawHeaders: readonly string[], name: string): boolean {
  const folded = name.replaceAll('_', '-');
  let found = false;
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const raw = rawHeaders[i]!;
    if (raw.length !== name.length && raw.length !== CONNECTION.length) continue;
    const lower = raw.toLowerCase();
    if (lower === CONNECTION) {
      for (const token of rawHeaders[i + 1]!.split(',')) {
        const listed = token.trim().toLowerCase();
        if (listed === name || listed === folded) return false;
      }
      continue;
    }
    if (raw.length !== name.length || lower.replaceAll('_', '-') !== folded) continue;
    if (found || lower !== name || rawHeaders[i + 1]!.trim() === '') return false;
    found = true;
  }
  return found;
}

/** Names listed in Connection headers (RFC 9110 §7.6.1), lower-cased. */
function connectionListed(rawHeaders: readonly string[]): Set<string> {
  const listed = new Set<string>();
  for (let i = 0; i < rawHeaders.length; i += 2) {
    if (rawHeaders[i]!.toLowerCase() !== 'connection') continue;
    for (const token of rawHeaders[i + 1]!.split(',')) {
      const name = token.trim().toLowerCase();
      if (name) listed.add(name);
    }
  }
  return listed;
}

/**
 * The caller's headers as they may go upstream, minus everything the injectors claim. With
 * `callerHeaders` (the route's caller_headers, lower-cased) only the standard set and those pass;
 * without it, every header that is not dropped above passes. Claimed headers go either way.
 *
 * The caller's `Authorization` passes only where the route lists it (Teller's enrollment token is
 * the caller's own): every route attaches a credential, and a caller credential beside it, on a
 * route whose scheme puts the key elsewhere (Plaid's headers, a query key), left the upstream two
 * to choose from (HDR-01).
 *
 * A Cookie header passes as it came (where the route lists no caller_headers, or lists it). On
 * one route it may hold cookies a jar kept from another, set before the proxy scoped Set-Cookie to
 * route prefixes (route-scope.ts). They are left: a Cookie header carries names and values only,
 * no path or origin, so the proxy cannot tell which upstream set one, and dropping by name would
 * drop the cookies this route's upstream set under the same name (a session, a CSRF token). They
 * are the caller's, never a credential the proxy holds; new ones stay on their route, and the old
 * ones go when they expire or the caller clears its jar (README).
 */
export function outboundHeaders(rawHeaders: readonly string[], claimed: ReadonlySet<string>, callerHeaders?: ReadonlySet<string>): HeaderMap {
  const listed = connectionListed(rawHeaders);
  const out: HeaderMap = new Map();
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!.toLowerCase();
    // Compare the name as upstreams may read it: CGI, WSGI and PHP servers fold "_" into "-"
    // (PLAID_SECRET and PLAID-SECRET both become HTTP_PLAID_SECRET); x-forwarded-* and x-ssl-client-* go as families.
    const folded = name.replaceAll('_', '-');
    if (listed.has(name) || listed.has(folded) || claimed.has(folded) || !routeLets(name, folded, callerHeaders)) continue;
    const values = out.get(name);
    if (values) values.push(rawHeaders[i + 1]!);
    else out.set(name, [rawHeaders[i + 1]!]);
  }
  return out;
}

/** Upstream response headers that must not be relayed to the caller. */
const RESPONSE_DROP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'http2-settings', 'proxy-authenticate', 'x-request-id', 'x-egress-error']);

/** Response headers a reverse-mode route rewrites to stay within its prefix (route-scope.ts). */
const SCOPED: ReadonlyMap<string, (value: string, scope: RouteScope) => string> = new Map([['set-cookie', scopeSetCookie], ['location', scopeLocation]]);

/**
 * Upstream response headers as a flat [name, value, ...] list for writeHead, with any injected
 * secret the upstream echoed replaced by [REDACTED]. A header whose name holds a secret is dropped:
 * a field name cannot carry [REDACTED] (RFC 9110 §5.1, a token), and it tells the caller nothing.
 * With `scope` (reverse mode), Set-Cookie and Location are scoped to the route first, and the
 * redaction runs on what the caller will see.
 */
export function responseHeaders(headers: Record<string, string | string[] | undefined>, redact: (value: string) => string, scope?: RouteScope): string[] {
  const connection = headers.connection;
  // Nearly every response has no Connection header listing others (keep-alive is the default).
  let listed: Set<string> | undefined;
  if (connection !== undefined) {
    listed = new Set();
    for (const value of Array.isArray(connection) ? connection : [connection]) {
      for (const token of value.split(',')) listed.add(token.trim().toLowerCase());
    }
  }
  const flat: string[] = [];
  for (const name of Object.keys(headers)) {
    if (RESPONSE_DROP.has(name) || listed?.has(name) || redact(name) !== name) continue;
    const value = headers[name];
    if (value === undefined) continue;
    const rewrite = scope === undefined ? undefined : SCOPED.get(name);
    if (typeof value === 'string') flat.push(name, redact(rewrite ? rewrite(value, scope!) : value));
    // Each Set-Cookie line on its own, as undici keeps them: never joined with commas.
    else for (const v of value) flat.push(name, redact(rewrite ? rewrite(v, scope!) : v));
  }
  return flat;
}

export function flatten(headers: HeaderMap): string[] {
  const flat: string[] = [];
  for (const [name, values] of headers) for (const v of values) flat.push(name, v);
  return flat;
}
