/**
 * Route files for tests. `bearerRoute` is the route most integration tests need: `api` on /api,
 * to a local upstream, with credential `key` attached as a bearer token. Tests that are about the
 * route file itself (injection schemes, presets, limits) write theirs out in full.
 */
export interface BearerRouteOptions {
  /** The upstream's origin, e.g. `http://127.0.0.1:1234`. */
  readonly upstream: string;
  /** The paths every caller may request. */
  readonly paths: readonly string[];
  /** One allow rule each, in this order. */
  readonly callers?: readonly string[];
  readonly methods?: readonly string[];
}

export function bearerRoute({ upstream, paths, callers = ['svc'], methods = ['GET'] }: BearerRouteOptions): string {
  const rules = callers.map((caller) => `  - caller: ${caller}\n    methods: [${methods.join(', ')}]\n    paths: [${paths.join(', ')}]\n`);
  return `name: api
prefix: /api
upstream: ${upstream}
allow_private_addresses: true
credential: key
inject:
  scheme: bearer
allow:
${rules.join('')}`;
}

export interface ApiKeyRouteOptions extends Partial<BearerRouteOptions> {
  readonly upstream: string;
  /** The route's name and prefix (/name). */
  readonly name?: string;
  readonly credential?: string;
  /** Lines that go after `credential:` (upstream_ca, hosts, limits), each ending in a newline. */
  readonly extra?: string;
}

/** A route that sends field `secret` of its credential (`key`) as `X-Api-Key`; `api` on /api, GET /x for svc by default. */
export function apiKeyRoute({ upstream, name = 'api', credential = 'key', extra = '', paths = ['/x'], callers = ['svc'], methods = ['GET'] }: ApiKeyRouteOptions): string {
  const rules = callers.map((caller) => `  - caller: ${caller}\n    methods: [${methods.join(', ')}]\n    paths: [${paths.join(', ')}]\n`);
  return `name: ${name}
prefix: /${name}
upstream: ${upstream}
allow_private_addresses: true
credential: ${credential}
${extra}inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
allow:
${rules.join('')}`;
}

/** `bank` on /bank: credential `bank` as an OAuth2 client-credentials token from `${upstream}/connect/token`; `options` adds inject lines (two-space indented, newline-ended). GET /accounts for svc. */
export function oauth2Route(upstream: string, options = ''): string {
  return `name: bank
prefix: /bank
upstream: ${upstream}
allow_private_addresses: true
credential: bank
inject:
  scheme: oauth2_client_credentials
  token_url: ${upstream}/connect/token
${options}allow:
  - caller: svc
    methods: [GET]
    paths: [/accounts]
`;
}
