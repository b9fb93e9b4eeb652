import { isIP } from 'node:net';
import { z } from 'zod';
import { HEADER_NAME } from '../injectors/headers.ts';
import type { Injector } from '../injectors/index.ts';
import { injectorFor, INJECTORS } from '../injectors/index.ts';
import { callerHeaderPasses, removedByProxy } from '../pipeline/headers.ts';
import { parseTarget } from '../pipeline/target.ts';
import { PRESET_NAMES } from './presets.ts';
import { parseDuration, parseRate, parseSize } from './units.ts';

/** The raw, strict shape of one route file. Compilation into domain objects is in compile-routes.ts. */

export const NAME = /^[a-z0-9][a-z0-9_-]{0,62}$/;
export const CALLER_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
export const HTTP_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const;

// Path segments in prefixes and rules: RFC 3986 pchar without percent-escapes, so what is written
// is byte for byte what is matched. Not a dot segment, also with path parameters ("..;", ".;x"):
// parseTarget refuses those in a request, so a prefix or rule naming one could never match.
const SEGMENT = /^(?!\.{1,2}(?:$|;))[A-Za-z0-9\-._~!$&'()+,;=:@]+$/;

/**
 * A deadline: at least 1 ms, at most a day. Zero would switch the deadline off (undici reads 0 as
 * "no timeout"), and past 2^31-1 ms a Node timer fires at once instead (TimeoutOverflowWarning).
 */
export const MAX_TIMEOUT_MS = 86_400_000;
const timeout = z.string().transform((text, ctx) => {
  const ms = parseDuration(text);
  if (ms === undefined) ctx.addIssue({ code: 'custom', message: `"${text}" is not a duration like 500ms, 5s, 2m` });
  else if (ms < 1 || ms > MAX_TIMEOUT_MS) ctx.addIssue({ code: 'custom', message: `"${text}" must be at least 1ms and at most 24h (0 would mean no deadline)` });
  return ms ?? 0;
});

/** Bodies are counted in bytes: a limit past this is a typo, and past 2^53 not even a whole number. */
export const MAX_BODY_BYTES = 1024 ** 3;
const size = z.union([z.string(), z.number()]).transform((value, ctx) => {
  const bytes = parseSize(value);
  if (bytes === undefined || bytes < 1) ctx.addIssue({ code: 'custom', message: `"${value}" is not a size like 512kb or 1mb` });
  else if (bytes > MAX_BODY_BYTES) ctx.addIssue({ code: 'custom', message: `"${value}" is larger than the most a route may take, 1gb` });
  return bytes ?? 0;
});

const rateLimit = z.strictObject({
  rate: z.string().transform((text, ctx) => {
    const rate = parseRate(text);
    if (!rate) ctx.addIssue({ code: 'custom', message: `"${text}" is not a rate like 20/s, 300/min or 10000/day` });
    return rate ?? { count: 1, periodMs: 1000 };
  }),
  burst: z.number().int().min(1).max(1_000_000).optional(),
});

const prefix = z.string().refine(
  (p) => p.startsWith('/') && p.length > 1 && p.slice(1).split('/').every((s) => SEGMENT.test(s)),
  'a prefix is "/" followed by one or more non-empty segments, with no trailing "/", "*", "%" or "."/".." segment',
);

const pathPattern = z.string().refine(
  (p) => {
    if (p === '/') return true;
    if (!p.startsWith('/')) return false;
    const segments = p.slice(1).split('/');
    return segments.every((s, i) =>
      s === '*' || (s === '**' && i === segments.length - 1) || (s === '' && i === segments.length - 1 && i > 0) || (SEGMENT.test(s) && !s.includes('*')));
  },
  'a path starts with "/"; each segment is literal text, "*" (one segment) or a final "**" (the rest)',
);

const upstream = z.string().refine((text) => {
  try {
    const url = new URL(text);
    return (url.protocol === 'https:' || url.protocol === 'http:') && !url.username && !url.password && !url.search && !url.hash;
  } catch {
    return false;
  }
}, 'an http(s) URL with no credentials, query or fragment').refine((text) => {
  // The base path goes before every path sent upstream and is never checked again: it must be the
  // text written, in the form request paths must have. A URL parser rewrites "\" to "/", resolves
  // "a/../b" to "b" and encodes a space, all without a word.
  const match = /^https?:\/\/[^/\\?#]*([^?#]*)/i.exec(text);
  let parsed: string;
  try {
    parsed = new URL(text).pathname;
  } catch {
    parsed = '';
  }
  // Not an http(s) URL at all: the check above says so.
  if (!match || !parsed) return true;
  const written = match[1] || '/';
  if (parsed !== written) return false;
  try {
    parseTarget(written);
    return true;
  } catch {
    return false;
  }
}, 'the upstream\'s base path must be written as it is sent: no "." or ".." segments, "//", "\\", encoded "/" or "\\", or characters that need percent-encoding');

/** Options of one injection; each scheme's own schema (in its injector file) gives the rest. */
export type InjectOptions = { readonly scheme: string };

const injectOne = z.discriminatedUnion('scheme', INJECTORS.map((i) => i.schema) as unknown as [z.ZodObject, ...z.ZodObject[]]) as unknown as z.ZodType<InjectOptions>;

export const allowRuleSchema = z.strictObject({
  caller: z.string().regex(CALLER_NAME, 'caller names are lower-case letters, digits, ".", "_" and "-"'),
  methods: z.array(z.enum(HTTP_METHODS)).min(1),
  paths: z.array(pathPattern).min(1),
  rate: rateLimit.optional(),
});

const replaySafeEntry = z.string().refine((entry) => {
  const [method, path, extra] = entry.trim().split(/\s+/);
  return extra === undefined && (HTTP_METHODS as readonly string[]).includes(method ?? '') && pathPattern.safeParse(path).success;
}, 'a replay-safe entry is "METHOD /path", e.g. "POST /accounts/get" (path patterns allowed)');

/** An auth_failure body text. */
const bodyText = z.string().min(1).max(256);

export const routeFileSchema = z.strictObject({
  name: z.string().regex(NAME, 'route names are lower-case letters, digits, "_" and "-"'),
  /** A known provider (src/config/presets.ts): fills upstream, inject, auth_failure, replay_safe, idempotency_key; the file's own keys win. */
  preset: z.enum(PRESET_NAMES).optional(),
  prefix,
  upstream,
  credential: z.string().regex(NAME, 'credential ids are lower-case letters, digits, "_" and "-"'),
  inject: z.union([injectOne, z.array(injectOne).min(1)]),
  timeouts: z.strictObject({ connect: timeout.optional(), response: timeout.optional() }).optional(),
  upstream_ca: z.string().min(1).optional(),
  /** Forward mode: the hosts whose CONNECT tunnels this route intercepts (default: the upstream's host). */
  hosts: z.array(z.string()
    .regex(/^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$/, 'a lower-case DNS name (no trailing dot, punycode for IDNs)')
    .refine((h) => isIP(h) === 0, 'an IP address is not a host name: forward mode intercepts names only')).min(1).optional(),
  /** Callers must prove who they are with a client certificate on the TLS listener; a token alone is refused. */
  require_client_cert: z.boolean().default(false),
  /** Let this route reach loopback and private-network upstreams (local and test upstreams only). */
  allow_private_addresses: z.boolean().default(false),
  max_body: size.optional(),
  upstream_rate: rateLimit.optional(),
  /** How the upstream says "this key is rejected" (default: status 401). */
  auth_failure: z.strictObject({
    // A 2xx is allowed with body_contains: Kraken reports "EAPI:Invalid key" inside an HTTP 200.
    status: z.array(z.number().int().min(200).max(599).refine((n) => n < 300 || n >= 400, 'a redirect status cannot be an auth failure')).min(1),
    /** A text the body must contain, or a list of texts of which it must contain one. */
    body_contains: z.union([bodyText, z.array(bodyText).min(1).max(16)]).optional(),
  }).refine((a) => a.body_contains !== undefined || a.status.every((n) => n >= 400), { message: 'a 2xx status is an auth failure only with body_contains', path: ['status'] }).optional(),
  /** Requests besides GET and HEAD that may be sent again with the previous key. */
  replay_safe: z.array(replaySafeEntry).default([]),
  /**
   * A request header the upstream honours as an idempotency key (Stripe's and TrueLayer's
   * Idempotency-Key): it runs a request once per key, so a request that carries exactly one
   * non-empty value of it may be sent again with the previous key, whatever its method, carrying
   * the same value (providers.md §3.2). Absent (or null, to turn off a preset's): no such header.
   */
  idempotency_key: z.string().regex(HEADER_NAME, 'not a valid header name: write the request header the upstream honours, e.g. Idempotency-Key').nullable().optional(),
  allow: z.array(allowRuleSchema).default([]),
  /**
   * Caller-owned headers. Absent: every caller header goes upstream except hop-by-hop, proxy and
   * claimed ones (the default, as before). A list: passthrough is restricted to the standard
   * content and negotiation headers (pipeline/headers.ts) plus these. A header an injection claims
   * can never be listed: the credential's headers are always the proxy's.
   */
  caller_headers: z.array(z.string().regex(HEADER_NAME, 'not a valid header name')).optional(),
  /**
   * Top-level JSON body fields a caller may not send, in any case: removed before the request goes
   * upstream. For a provider that takes its credential from the headers or the body (Plaid): the
   * body's copy must not be the caller's. A body that is not a JSON object is refused (400).
   */
  strip_body_fields: z.array(z.string().min(1).max(128)).min(1).optional(),
}).superRefine((route, ctx) => {
  const injections = Array.isArray(route.inject) ? route.inject : [route.inject];
  const claimedBy = new Map<string, string>();
  // Folded as upstreams may read them ("_" and "-" alike), as the caller's copies are compared;
  // the index of the injection that set each first.
  const setBy = new Map<string, number>();
  injections.forEach((options, i) => {
    const injector = injectorFor(options.scheme) as Injector | undefined;
    if (!injector) return;
    const path = Array.isArray(route.inject) ? ['inject', i] : ['inject'];
    if (injector.signsRequest && i !== injections.length - 1) {
      ctx.addIssue({ code: 'custom', path, message: `"${options.scheme}" signs the request as sent, so it must be the last injection (injections run in list order)` });
    }
    for (const h of injector.claims(options).headers) {
      // One name, two values: the later one replaced the earlier without a word.
      const folded = h.toLowerCase().replaceAll('_', '-');
      const first = setBy.get(folded);
      if (first !== undefined) {
        ctx.addIssue({ code: 'custom', path, message: first === i ? `header "${h}" is set twice (header names are case-insensitive, and many servers read "_" as "-")` : `header "${h}" is also set by the "${injections[first]!.scheme}" injection (inject.${first}): only one value could be sent` });
      } else {
        setBy.set(folded, i);
      }
      claimedBy.set(h.toLowerCase(), options.scheme);
    }
  });
  (route.caller_headers ?? []).forEach((name, i) => {
    const lower = name.toLowerCase();
    const scheme = claimedBy.get(lower);
    if (scheme) ctx.addIssue({ code: 'custom', path: ['caller_headers', i], message: `"${name}" is set by the "${scheme}" injection: a caller can never pass or override it` });
    else if (removedByProxy(lower)) ctx.addIssue({ code: 'custom', path: ['caller_headers', i], message: `"${name}" is always removed by the proxy (hop-by-hop, proxy, forwarding or override header)` });
  });
  // The key makes a replay safe only if the upstream sees the caller's one value both times: a
  // header the proxy sets or drops never gets there, and the request would be sent twice without it.
  const key = route.idempotency_key;
  if (key) {
    const folded = key.toLowerCase().replaceAll('_', '-');
    const first = setBy.get(folded);
    const callerHeaders = route.caller_headers ? new Set(route.caller_headers.map((h) => h.toLowerCase())) : undefined;
    if (first !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['idempotency_key'], message: `"${key}" is set by the "${injections[first]!.scheme}" injection: the caller's value never reaches the upstream, so it cannot be an idempotency key` });
    } else if (removedByProxy(key)) {
      ctx.addIssue({ code: 'custom', path: ['idempotency_key'], message: `"${key}" is always removed by the proxy (hop-by-hop, proxy, forwarding or override header): it never reaches the upstream` });
    } else if (!callerHeaderPasses(key, callerHeaders)) {
      ctx.addIssue({ code: 'custom', path: ['idempotency_key'], message: `"${key}" does not reach the upstream on this route: list it in caller_headers` });
    }
  }
});

export type RouteFile = z.output<typeof routeFileSchema>;
export type RateLimitOptions = z.output<typeof rateLimit>;

/** JSON Schema of a route file for editors (`egress routes schema`). */
export function routeJsonSchema(): Record<string, unknown> {
  const schema = z.toJSONSchema(routeFileSchema, { io: 'input', unrepresentable: 'any' }) as Record<string, unknown>;
  // A preset supplies these three; without one, the file must.
  const fromPreset = ['prefix', 'upstream', 'inject'];
  const required = Array.isArray(schema.required) ? (schema.required as string[]).filter((k) => !fromPreset.includes(k)) : [];
  return {
    ...schema,
    required,
    anyOf: [{ required: ['preset'] }, { required: fromPreset }],
    $id: 'https://egress-proxy.local/route-file.schema.json',
    title: 'egress-proxy route file',
  };
}
