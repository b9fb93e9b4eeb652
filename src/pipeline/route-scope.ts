import type { CompiledRoute } from '../config/compile-routes.ts';

/**
 * Reverse mode serves every route on the proxy's one origin (http://proxy/plaid/…, /kraken/…).
 * What an upstream scopes to its own origin, a cookie or a redirect, would there cover every route
 * (a cookie jar sends Plaid's session cookie to Kraken) or leave the route (a redirect to
 * production.plaid.com goes around the proxy, one to "/x" is a 404). So it is scoped to the route's
 * prefix instead, as nginx's proxy_cookie_path and proxy_redirect do for a location. Forward mode
 * talks to the real host and needs none of this.
 */
export type RouteScope = Pick<CompiledRoute, 'prefix' | 'origin' | 'basePath'>;

/** The route-relative rest of an upstream path ("" for the base path itself), or undefined outside the base path. */
function underBase(path: string, basePath: string): string | undefined {
  if (path === basePath || path.startsWith(`${basePath}/`)) return path.slice(basePath.length);
  return undefined;
}

/** RFC 6265 §5.1.4: does a cookie with path `cookiePath` go with a request for `path`? */
function pathMatches(cookiePath: string, path: string): boolean {
  return path === cookiePath || (path.startsWith(cookiePath) && (cookiePath.endsWith('/') || path[cookiePath.length] === '/'));
}

/** The Path a cookie gets on the proxy for the Path attribute value the upstream gave ("" for none). */
function cookiePath(value: string, scope: RouteScope): string {
  let path = value.trim();
  if (path.length >= 2 && path.startsWith('"') && path.endsWith('"')) path = path.slice(1, -1);
  // No Path, or one that does not start with "/" (RFC 6265 §5.2.4 ignores it): a jar would use the
  // request's directory, which for a request to the prefix itself (/plaid) is "/".
  if (!path.startsWith('/')) return scope.prefix;
  // A cookie for the base path or above it (usually "/") is for the whole route. One for an
  // upstream path outside the base path, which the route never reaches, is kept inside the route.
  const rest = underBase(path, scope.basePath) ?? (pathMatches(path, scope.basePath) ? '' : path);
  // A '"' as %22, as clients send it in a request path: in the Path that ends the line, a quote
  // could close one opened in the cookie's value, and a parser that honours quotes would then see
  // the whole line as the value and the cookie as having no Path at all.
  return rest === '' || rest === '/' ? scope.prefix : scope.prefix + rest.replaceAll('"', '%22');
}

/**
 * One Set-Cookie line (never several joined: an Expires holds a comma) scoped to the route: its
 * Domain attributes are removed, so the cookie is the proxy host's alone (a jar refuses a Domain
 * naming the upstream's host for the proxy's, and one naming the proxy's parent domain would widen
 * it to the hosts beside the proxy), and it ends with one Path, the route prefix joined with the
 * last Path it had (RFC 6265 §5.3 step 7: the last one counts). Everything else is kept byte for byte.
 *
 * The line is cut at every ";", quotes or not, as RFC 6265 §5.2 and the jars that follow it
 * (browsers, tough-cookie, curl, Python's http.cookiejar) read it. A parser that honours quotes
 * starts its attributes at some of these same places, so it finds no Domain either, and the Path
 * that ends the line is outside any quotes that were closed.
 */
export function scopeSetCookie(line: string, scope: RouteScope): string {
  const parts = line.split(';');
  // The first part is the cookie's name and value, even when that name is "Path" or "Domain".
  const kept = [parts[0]!];
  let path = '';
  for (let i = 1; i < parts.length; i++) {
    const part = parts[i]!;
    const eq = part.indexOf('=');
    const name = (eq === -1 ? part : part.slice(0, eq)).trim().toLowerCase();
    if (name === 'path') path = eq === -1 ? '' : part.slice(eq + 1);
    else if (name !== 'domain') kept.push(part);
  }
  kept.push(` Path=${cookiePath(path, scope)}`);
  return kept.join(';');
}

/**
 * A Location naming the upstream's own origin (absolute, "//host" or "/path") as a reference to
 * the same resource through the route on the proxy ("/plaid/x"), as nginx's `proxy_redirect
 * default` does. A Location under another origin, with userinfo, outside the upstream's base path,
 * or relative to the request's path ("next", "?page=2", which the caller resolves under the prefix
 * already) is returned as it came: redirects are relayed, never followed.
 */
export function scopeLocation(location: string, scope: RouteScope): string {
  const target = ownTarget(location, scope.origin);
  if (target === undefined) return location;
  const end = target.search(/[?#]/);
  const path = end === -1 ? target : target.slice(0, end);
  const rest = underBase(path, scope.basePath);
  return rest === undefined ? location : scope.prefix + rest + (end === -1 ? '' : target.slice(end));
}

/** The path, query and fragment of `location` when it names `origin` (the path may be ""), else undefined. */
function ownTarget(location: string, origin: string): string | undefined {
  if (location.startsWith('/') && !location.startsWith('//')) return location;
  // "\" is not taken as part of the host: URL parsers read it as "/", so "https://host\x" is left as it came.
  const match = /^([A-Za-z][A-Za-z0-9+.-]*:)?\/\/([^/?#\\]*)(.*)$/s.exec(location);
  if (!match) return undefined;
  const [, scheme = origin.slice(0, origin.indexOf(':') + 1), authority = '', rest = ''] = match;
  if (authority.includes('@') || !/^(?:$|[/?#])/.test(rest)) return undefined;
  try {
    return new URL(`${scheme}//${authority}`).origin === origin ? rest : undefined;
  } catch {
    return undefined;
  }
}
