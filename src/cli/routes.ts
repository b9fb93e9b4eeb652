import { resolve } from 'node:path';
import { findRoute, findRouteByHost, forwardSegments, unclaimedHosts } from '../config/compile-routes.ts';
import { matchPattern } from '../config/path-pattern.ts';
import { ConfigError, formatProblem, loadRoutes } from '../config/load-routes.ts';
import { routeJsonSchema } from '../config/route-schema.ts';
import { ProxyError, UserError } from '../errors.ts';
import { decide } from '../pipeline/authorize.ts';
import { removeParams } from '../pipeline/inject.ts';
import { parseTarget } from '../pipeline/target.ts';
import { EXIT, fail, maxArgs, ok, onlyOptions, parse, requireArg, type Outcome } from './io.ts';

const USAGE = 'usage: egress routes check [DIR] | schema | explain --caller NAME METHOD URL';

/** `egress routes …`: validate route files, print their JSON Schema, explain a decision. */
export async function routes(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest, { caller: { type: 'string' } });
  // An option a subcommand does not take is refused, not ignored.
  onlyOptions(p.values, ['caller'], sub === 'explain' ? ['caller'] : [], `routes ${sub ?? ''}`.trim(), USAGE);
  maxArgs(p.positionals, sub === 'explain' ? 2 : sub === 'check' ? 1 : 0, USAGE);
  switch (sub) {
    case 'check': {
      const dir = p.positionals[0] ? resolve(p.positionals[0]) : p.settings().routesDir;
      try {
        const config = await loadRoutes(dir);
        // Presets are already expanded: the schemes listed are what each route really attaches.
        const list = config.routes.map((r) => ({ name: r.name, file: r.file, preset: r.preset ?? null, prefix: r.prefix, upstream: r.origin + r.basePath, credential: r.credential, schemes: r.injections.map((i) => i.options.scheme), rules: r.rules.length }));
        const line = (r: (typeof list)[number]) => `\n  ${r.name}  ${r.prefix} -> ${r.upstream}  (${r.preset ? `preset ${r.preset}: ` : ''}${r.schemes.join(' + ')}, ${r.rules} rule${r.rules === 1 ? '' : 's'})`;
        const notes = unclaimedHosts(config.routes);
        return ok(`${dir}: ${list.length} route${list.length === 1 ? '' : 's'} OK${list.map(line).join('')}${notes.map((n) => `\nnote: ${n.message}`).join('')}`, { ok: true, dir, routes: list, notes });
      } catch (err) {
        if (!(err instanceof ConfigError)) throw err;
        return fail(err.problems.map(formatProblem).join('\n'), { ok: false, dir, errors: err.problems });
      }
    }
    case 'schema': {
      const schema = routeJsonSchema();
      return ok(JSON.stringify(schema, null, 2), schema);
    }
    case 'explain': {
      const caller = p.values.caller;
      if (typeof caller !== 'string') throw new UserError('explain needs --caller NAME', EXIT.usage);
      const method = requireArg(p.positionals, 0, 'METHOD').toUpperCase();
      const url = requireArg(p.positionals, 1, 'URL');
      return explain(await loadRoutes(p.settings().routesDir).catch((err: unknown) => {
        if (err instanceof ConfigError) throw new UserError(`the route folder does not load:\n${err.problems.map(formatProblem).join('\n')}`);
        throw err;
      }), caller, method, url);
    }
    default:
      throw new UserError(USAGE, EXIT.usage);
  }
}

function explain(config: Awaited<ReturnType<typeof loadRoutes>>, caller: string, method: string, url: string): Outcome {
  // Accept the URL a service would call (http://egress:8080/plaid/...) or just its path.
  const authority = /^https?:\/\/[^/?#]*/i.exec(url);
  // A client never sends a URL's fragment; a bare request target is taken as the bytes sent, "#" included.
  const rawTarget = authority ? url.slice(authority[0].length).replace(/#.*$/s, '') || '/' : url;
  let target;
  try {
    target = parseTarget(rawTarget);
  } catch (err) {
    if (err instanceof ProxyError) return fail(`DENY 400 bad_request: ${err.detail ?? err.message}`, { decision: 'deny', status: 400, code: err.code, reason: err.detail });
    throw err;
  }
  // A URL on a host a route intercepts is a forward-mode request (HTTPS_PROXY): as in match-route,
  // the host picks the route and the whole path is the route-relative path, with no prefix.
  const parts = authority ? /^(https?):\/\/(?:[^@/]*@)?([^:/?#]+)(?::(\d+))?/i.exec(authority[0]) : null;
  const host = parts?.[2]?.toLowerCase();
  const forwardRoute = host ? findRouteByHost(config, host) : undefined;
  if (forwardRoute) {
    // As the proxy takes it: a CONNECT only to a port the route intercepts (443, or its upstream's);
    // a plain-HTTP proxy request on 80 or such a port, and on any other it is not intercepted (400).
    const https = parts![1]!.toLowerCase() === 'https';
    const port = parts![3] ? Number(parts![3]) : https ? 443 : 80;
    if (!forwardRoute.connectPorts.has(port) && (https || port !== 80)) {
      const [status, code] = https ? [403, 'route_forbidden'] as const : [400, 'bad_request'] as const;
      const reason = `port ${port} is not one this route's host is intercepted on (${[...forwardRoute.connectPorts].join(', ')}${https ? '' : ', or 80 for plain HTTP'})`;
      return fail(`DENY ${status} ${code}  route "${forwardRoute.name}" (${forwardRoute.file}), forward mode\n  ${reason}`, { decision: 'deny', status, code, route: forwardRoute.name, file: forwardRoute.file, caller, method, mode: 'forward', path: target.path, reason });
    }
  }
  const route = forwardRoute ?? findRoute(config, target.segments);
  if (!route) return fail(`DENY 404 route_not_found: no route prefix owns ${target.path}`, { decision: 'deny', status: 404, code: 'route_not_found', path: target.path });
  const rest = forwardRoute ? forwardSegments(forwardRoute, target.segments) : target.segments.slice(route.prefixSegments.length);
  if (!rest) return fail(`DENY 403 route_forbidden  route "${route.name}" (${route.file}), forward mode\n  ${target.path} is outside the upstream's base path ${route.basePath}`, { decision: 'deny', status: 403, code: 'route_forbidden', route: route.name, file: route.file, caller, method, mode: 'forward', path: target.path, reason: `outside the upstream's base path ${route.basePath}` });
  const relative = rest.length === 0 ? [''] : rest;
  const decision = decide(route, caller, method, relative);
  const query = removeParams(target.query, route.claims.query);
  const upstream = `${route.origin}${route.basePath}/${relative.join('/')}${query ? `?${query}` : ''}`;
  const schemes = route.injections.map((i) => i.options.scheme).join(' + ');
  const bodyContains = route.authFailure.bodyContains;
  const signing = route.injections.flatMap((i) => i.injector.explain?.(i.options, method) ?? []);
  const data = {
    decision: decision.rule ? 'allow' : 'deny',
    status: decision.rule ? null : 403,
    code: decision.rule ? null : 'route_forbidden',
    route: route.name,
    file: route.file,
    caller,
    method,
    mode: forwardRoute ? 'forward' : 'reverse',
    path: `/${relative.join('/')}`,
    rule: decision.rule ? { index: decision.rule.index, methods: [...decision.rule.methods], paths: decision.rule.paths.map((x) => x.source) } : null,
    reason: decision.reason,
    upstream_url: upstream,
    credential: route.credential,
    inject: schemes,
    signing,
    preset: route.preset ?? null,
    claimed_headers: [...route.claims.headers],
    claimed_query: [...route.claims.query],
    // Checked before the rules (authorize): a caller that presents only its token gets 403.
    require_client_cert: route.requireClientCert,
    caller_headers: route.callerHeaders ? [...route.callerHeaders] : null,
    // One text as a string, as before lists were allowed; several as a list.
    auth_failure: { status: [...route.authFailure.statuses], body_contains: bodyContains === undefined ? null : bodyContains.length === 1 ? bodyContains[0] : bodyContains },
    // As resolve-credential decides it: GET and HEAD, or listed in replay_safe; otherwise only a
    // request that carries the route's idempotency_key header once is.
    replay_safe: method === 'GET' || method === 'HEAD' || route.replaySafe.some((r) => r.method === method && matchPattern(r.pattern, relative)),
    idempotency_key: route.idempotencyKey ?? null,
  };
  const key = route.idempotencyKey;
  const replay = data.replay_safe
    ? 'replay-safe: may be re-sent with the previous key'
    : key ? `replay-safe only with one ${key} header: then it may be re-sent with the previous key, with the same ${key}` : 'not replay-safe: never re-sent';
  const claimed = [...route.claims.headers, ...[...route.claims.query].map((q) => `?${q}`)];
  const details = [
    ...(route.requireClientCert ? ['  only with a client certificate on the TLS listener (require_client_cert): a token alone gets 403 route_forbidden'] : []),
    `  attaches credential "${route.credential}" (${route.preset ? `preset ${route.preset}: ` : ''}${schemes}), owning ${claimed.join(', ') || 'nothing the caller sends'}`,
    ...signing.map((line) => `  signing: ${line}`),
    `  caller headers: ${route.callerHeaders ? `standard set + ${[...route.callerHeaders].join(', ') || 'nothing else'}` : 'all but hop-by-hop, proxy and owned ones'}`,
    `  auth failure: status ${[...route.authFailure.statuses].join('/')}${bodyContains ? ` with body containing ${bodyContains.map((t) => `"${t}"`).join(' or ')}` : ''}; ${replay}`,
  ].join('\n');
  const text = decision.rule
    ? `ALLOW  route "${route.name}" (${route.file})${forwardRoute ? ', forward mode' : ''}\n  ${decision.reason}\n  forwards to ${method} ${upstream}\n${details}`
    : `DENY 403 route_forbidden  route "${route.name}" (${route.file})${forwardRoute ? ', forward mode' : ''}\n  ${decision.reason}`;
  return decision.rule ? ok(text, data) : fail(text, data);
}
