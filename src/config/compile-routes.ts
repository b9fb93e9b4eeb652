import { isIP } from 'node:net';
import { basename } from 'node:path';
import type { Injector } from '../injectors/index.ts';
import { injectorFor } from '../injectors/index.ts';
import type { Template } from '../injectors/template.ts';
import type { Claims } from '../injectors/types.ts';
import type { PathPattern } from './path-pattern.ts';
import { compilePattern, hasSegmentPrefix, splitPath } from './path-pattern.ts';
import type { RateLimitOptions, RouteFile } from './route-schema.ts';
import { parseTarget } from '../pipeline/target.ts';

/** Compiled, frozen domain objects: what the request path reads. */

export interface CompiledRule {
  /** 0-based position in the route's `allow` list, for explanations and audit reasons. */
  readonly index: number;
  readonly caller: string;
  readonly methods: ReadonlySet<string>;
  readonly paths: readonly PathPattern[];
  readonly rate: RateLimitOptions | undefined;
}

export interface Injection {
  readonly injector: Injector;
  readonly options: { readonly scheme: string };
}

export interface CompiledRoute {
  readonly name: string;
  readonly file: string;
  /** The preset the route file named, if any; its values are already merged in. */
  readonly preset: string | undefined;
  readonly prefix: string;
  readonly prefixSegments: readonly string[];
  /** e.g. https://production.plaid.com */
  readonly origin: string;
  readonly upstreamHost: string;
  /** Forward mode: hosts this route intercepts, and the CONNECT ports it accepts for them. */
  readonly hosts: ReadonlySet<string>;
  /** `hosts` was written in the route file (otherwise it defaults to the upstream's host name). */
  readonly explicitHosts: boolean;
  readonly connectPorts: ReadonlySet<number>;
  /** Upstream path prefix without a trailing "/"; usually "". */
  readonly basePath: string;
  /** basePath as canonical path segments (empty for none): forward mode finds the route-relative path after them. */
  readonly baseSegments: readonly string[];
  readonly credential: string;
  readonly injections: readonly Injection[];
  readonly claims: { readonly headers: ReadonlySet<string>; readonly query: ReadonlySet<string>; readonly bodyFields: ReadonlySet<string> };
  /** caller_headers, lower-cased: when set, only the standard headers and these pass through. */
  readonly callerHeaders: ReadonlySet<string> | undefined;
  /** Credential fields the templates need: checked before a request is sent. */
  readonly fields: readonly string[];
  readonly needsBody: boolean;
  /** The first step that reads what the body says (strip_body_fields, an injector's readsBody): an encoded body is refused. */
  readonly bodyReader: string | undefined;
  /** strip_body_fields, lower-cased; undefined when none. */
  readonly stripBodyFields: ReadonlySet<string> | undefined;
  /** An injector signs with a nonce: the pipeline fetches one per request. */
  readonly needsNonce: boolean;
  /** The injection that presents an upstream TLS client certificate (mtls), if any. */
  readonly clientCertificate: Injection | undefined;
  /** An injector fetches something first (an OAuth2 token): the inject step is asynchronous. */
  readonly needsPrepare: boolean;
  /** Other origins the route's injectors call (token endpoints): their pools live as long as the route. */
  readonly extraOrigins: readonly string[];
  readonly connectTimeoutMs: number;
  readonly responseTimeoutMs: number;
  readonly upstreamCa: string | undefined;
  /** The route may reach private, loopback and link-local addresses (refused otherwise). */
  readonly allowPrivateAddresses: boolean;
  readonly requireClientCert: boolean;
  readonly maxBody: number;
  readonly upstreamRate: RateLimitOptions | undefined;
  /** bodyContains: texts of which the body must hold one (undefined: the status alone decides). */
  readonly authFailure: { readonly statuses: ReadonlySet<number>; readonly bodyContains: readonly string[] | undefined };
  /** Besides GET and HEAD: requests that may be re-sent with the previous key version. */
  readonly replaySafe: readonly { readonly method: string; readonly pattern: PathPattern }[];
  /** idempotency_key, lower-cased: a request carrying it once is replay-safe whatever its method. */
  readonly idempotencyKey: string | undefined;
  readonly rules: readonly CompiledRule[];
  /** Rules by caller name; a Map so no caller name can reach Object.prototype. */
  readonly rulesByCaller: ReadonlyMap<string, readonly CompiledRule[]>;
}

export interface CompiledConfig {
  readonly routes: readonly CompiledRoute[];
  readonly files: readonly string[];
  /** Other files the routes name (upstream_ca), resolved, and route files that are links to files elsewhere: watched for changes like the folder. */
  readonly namedFiles: readonly string[];
  readonly loadedAt: Date;
}

export const DEFAULTS = Object.freeze({ connectTimeoutMs: 5_000, responseTimeoutMs: 30_000, maxBody: 1024 * 1024 });

export function compileRoute(raw: RouteFile, file: string, upstreamCa: string | undefined): CompiledRoute {
  const url = new URL(raw.upstream);
  const basePath = url.pathname.replace(/\/+$/, '');
  const injections = (Array.isArray(raw.inject) ? raw.inject : [raw.inject]).map((options): Injection => {
    const injector = injectorFor(options.scheme);
    if (!injector) throw new Error(`unknown inject scheme "${options.scheme}"`);
    return Object.freeze({ injector, options: Object.freeze(options) });
  });
  const claims = mergeClaims(injections.map((i) => i.injector.claims(i.options)));
  const templates: Template[] = injections.flatMap((i) => [...i.injector.templates(i.options)]);
  const rules = raw.allow.map((rule, index): CompiledRule => Object.freeze({
    index,
    caller: rule.caller,
    methods: new Set(rule.methods),
    paths: Object.freeze(rule.paths.map(compilePattern)),
    rate: rule.rate,
  }));
  const rulesByCaller = new Map<string, CompiledRule[]>();
  for (const rule of rules) rulesByCaller.set(rule.caller, [...(rulesByCaller.get(rule.caller) ?? []), rule]);

  return Object.freeze({
    name: raw.name,
    file,
    preset: raw.preset,
    prefix: raw.prefix,
    prefixSegments: Object.freeze(splitPath(raw.prefix)),
    origin: url.origin,
    upstreamHost: url.host,
    hosts: new Set(raw.hosts ?? (isIP(url.hostname.replace(/^\[|\]$/g, '')) ? [] : [url.hostname.toLowerCase()])),
    explicitHosts: raw.hosts !== undefined,
    connectPorts: new Set([443, Number(url.port || (url.protocol === 'https:' ? 443 : 80))]),
    basePath,
    baseSegments: Object.freeze(baseSegmentsOf(basePath)),
    credential: raw.credential,
    injections: Object.freeze(injections),
    claims: Object.freeze(claims),
    callerHeaders: raw.caller_headers ? new Set(raw.caller_headers.map((h) => h.toLowerCase())) : undefined,
    fields: Object.freeze([...new Set(templates.flatMap((t) => t.fields))]),
    needsBody: raw.strip_body_fields !== undefined || injections.some((i) => i.injector.needsBody),
    bodyReader: raw.strip_body_fields ? 'The proxy removes fields from this route\'s JSON body (strip_body_fields)' : injections.find((i) => i.injector.readsBody)?.injector.readsBody,
    stripBodyFields: raw.strip_body_fields ? new Set(raw.strip_body_fields.map((f) => f.toLowerCase())) : undefined,
    needsNonce: injections.some(({ injector, options }) => (typeof injector.needsNonce === 'function' ? injector.needsNonce(options) : injector.needsNonce === true)),
    needsPrepare: injections.some((i) => i.injector.prepare !== undefined),
    clientCertificate: injections.find((i) => i.injector.clientCertificate !== undefined),
    extraOrigins: Object.freeze([...new Set(injections.flatMap((i) => ['token_url', 'refresh_url'].flatMap((field) => {
      const url = (i.options as Record<string, unknown>)[field];
      return typeof url === 'string' ? [new URL(url).origin] : [];
    })))]),
    connectTimeoutMs: raw.timeouts?.connect ?? DEFAULTS.connectTimeoutMs,
    responseTimeoutMs: raw.timeouts?.response ?? DEFAULTS.responseTimeoutMs,
    upstreamCa,
    allowPrivateAddresses: raw.allow_private_addresses,
    requireClientCert: raw.require_client_cert,
    maxBody: raw.max_body ?? DEFAULTS.maxBody,
    upstreamRate: raw.upstream_rate,
    authFailure: Object.freeze({ statuses: new Set(raw.auth_failure?.status ?? [401]), bodyContains: bodyTexts(raw.auth_failure?.body_contains) }),
    replaySafe: Object.freeze(raw.replay_safe.map((entry) => {
      const [method, path] = entry.trim().split(/\s+/);
      return Object.freeze({ method: method!, pattern: compilePattern(path!) });
    })),
    idempotencyKey: raw.idempotency_key ? raw.idempotency_key.toLowerCase() : undefined,
    rules: Object.freeze(rules),
    rulesByCaller,
  });
}

/** Query parameters frameworks read as the request's method (Laravel, Symfony, Rails: `_method`). */
const METHOD_OVERRIDE_PARAMS = ['_method'];

function mergeClaims(all: readonly Claims[]): CompiledRoute['claims'] {
  return {
    // Folded as upstreams may read them ("_" and "-" alike): outboundHeaders compares folded names.
    headers: new Set(all.flatMap((c) => c.headers.map((h) => h.toLowerCase().replaceAll('_', '-')))),
    // A method-override parameter is claimed by every route, as the override headers are removed:
    // a caller allowed to POST must not have a framework run the request as a DELETE.
    query: new Set([...all.flatMap((c) => c.query), ...METHOD_OVERRIDE_PARAMS]),
    bodyFields: new Set(all.flatMap((c) => c.bodyFields)),
  };
}

/**
 * Where a key of a route's file is written (1-based), as its file was parsed. A list item may be
 * named by its value: ["hosts", "api.example.com"].
 */
export type KeyPosition = (route: CompiledRoute, path: readonly string[]) => { readonly line: number; readonly col: number };

/**
 * Cross-route checks: duplicate names and hosts, and prefixes that equal or contain one another.
 * Each problem is placed at the key in the later file, and names the earlier file at its key.
 */
export function crossCheck(routes: readonly CompiledRoute[], keyAt: KeyPosition): { file: string; line: number; col: number; message: string }[] {
  const problems: { file: string; line: number; col: number; message: string }[] = [];
  const add = (a: CompiledRoute, b: CompiledRoute, path: readonly string[], message: string) => {
    const other = keyAt(a, path);
    problems.push({ file: b.file, ...keyAt(b, path), message: `${message} ${a.file}:${other.line}:${other.col}` });
  };
  for (let i = 0; i < routes.length; i++) {
    for (let j = i + 1; j < routes.length; j++) {
      const a = routes[i]!;
      const b = routes[j]!;
      if (a.name === b.name) add(a, b, ['name'], `route name "${b.name}" is also used by`);
      // Only hosts written in route files must be unique; a default (the upstream's name) yields to them.
      if (a.explicitHosts && b.explicitHosts) for (const host of b.hosts) if (a.hosts.has(host)) add(a, b, ['hosts', host], `host "${host}" is also intercepted by`);
      if (hasSegmentPrefix(a.prefixSegments, b.prefixSegments) || hasSegmentPrefix(b.prefixSegments, a.prefixSegments)) {
        add(a, b, ['prefix'], `prefix "${b.prefix}" overlaps prefix "${a.prefix}" of`);
      }
    }
  }
  return problems;
}

/** A host no route intercepts in forward mode though routes point at it (see findRouteByHost). */
export interface UnclaimedHost {
  readonly host: string;
  readonly files: readonly string[];
  readonly message: string;
}

/**
 * Hosts that are the upstream of two or more routes, none of which names it in `hosts`: forward
 * mode refuses them (403), while reverse mode serves each route. Not a load error (reverse-only
 * setups are fine); `routes check` and the log say so, since nothing else would.
 */
export function unclaimedHosts(routes: readonly CompiledRoute[]): UnclaimedHost[] {
  const named = new Set(routes.filter((r) => r.explicitHosts).flatMap((r) => [...r.hosts]));
  const byDefault = new Map<string, string[]>();
  for (const r of routes) {
    if (r.explicitHosts) continue;
    for (const host of r.hosts) if (!named.has(host)) byDefault.set(host, [...(byDefault.get(host) ?? []), r.file]);
  }
  return [...byDefault].filter(([, files]) => files.length > 1).map(([host, files]) => {
    const sorted = [...files].sort();
    const names = sorted.map((f) => basename(f));
    const list = names.length === 2 ? `${names[0]} and ${names[1]}, and neither names` : `${names.slice(0, -1).join(', ')} and ${names.at(-1)}, and none names`;
    return { host, files: sorted, message: `${host} is the upstream host of ${list} it in hosts: forward mode does not intercept it (name it in the hosts: of the route that should)` };
  });
}

/**
 * Forward mode: the route that intercepts `host` (exact, lower-case ASCII). A route that names the
 * host in `hosts` wins; otherwise the one route whose upstream it is. Two routes sharing an
 * upstream host without naming it are ambiguous, and the host is not intercepted.
 */
export function findRouteByHost(config: CompiledConfig, host: string): CompiledRoute | undefined {
  const explicit = config.routes.find((r) => r.explicitHosts && r.hosts.has(host));
  if (explicit) return explicit;
  const byDefault = config.routes.filter((r) => !r.explicitHosts && r.hosts.has(host));
  return byDefault.length === 1 ? byDefault[0] : undefined;
}

/**
 * Forward mode: a service calls the provider's own URL, base path included
 * (https://beta-bridge.simplefin.org/simplefin/accounts), while rules, like the path sent upstream,
 * are relative to the upstream's base path, as in reverse mode. The segments after the base path,
 * or undefined for a path outside it (the route does not reach there).
 */
export function forwardSegments(route: CompiledRoute, segments: readonly string[]): readonly string[] | undefined {
  if (route.baseSegments.length === 0) return segments;
  if (!hasSegmentPrefix(segments, route.baseSegments)) return undefined;
  const rest = segments.slice(route.baseSegments.length);
  return rest.length === 0 ? [''] : rest;
}

/** A base path in the form inner request paths are compared in (parseTarget's canonical segments); as written if it has no such form. */
function baseSegmentsOf(basePath: string): string[] {
  if (basePath === '') return [];
  try {
    return [...parseTarget(basePath).segments];
  } catch {
    return splitPath(basePath);
  }
}

/** The route that owns a path, matched on whole segments. Prefixes never overlap, so at most one does. */
export function findRoute(config: CompiledConfig, segments: readonly string[]): CompiledRoute | undefined {
  for (const route of config.routes) if (hasSegmentPrefix(segments, route.prefixSegments)) return route;
  return undefined;
}

/** `body_contains` as a frozen list, whether the file wrote one text or several. */
function bodyTexts(value: string | readonly string[] | undefined): readonly string[] | undefined {
  return value === undefined ? undefined : Object.freeze(typeof value === 'string' ? [value] : [...value]);
}
