import type { Dispatcher } from 'undici';
import { z } from 'zod';
import { errorCode, ProxyError, upstreamFailure } from '../errors.ts';
import type { Secret } from '../secret.ts';
import type { Minted } from '../pipeline/token-broker.ts';
import { retryAfterMs } from '../pipeline/retry-after.ts';
import { dispatchExchange, type UpstreamExchange } from '../pipeline/upstream-exchange.ts';
import { compileTemplate, render, templateString, type Template } from './template.ts';
import type { Injector, PrepareArgs, ResolvedCredential } from './types.ts';

const url = z.string().refine((text) => {
  try {
    const u = new URL(text);
    return (u.protocol === 'https:' || u.protocol === 'http:') && !u.username && !u.password && !u.hash;
  } catch {
    return false;
  }
}, 'an http(s) URL without credentials or fragment');

/**
 * The longest an access token is cached, whatever expires_in says (a day: GoCardless's 86,400 s,
 * the longest in use), and a refresh token (90 days). An absurd lifetime (1e308 s) would otherwise
 * keep a token for good and could not be shared through Redis (no PX that long), so every instance
 * minted its own.
 */
const MAX_TOKEN_LIFETIME_S = 86_400;
const MAX_REFRESH_LIFETIME_S = 90 * 86_400;

/**
 * The most a token request may take, head and body together. undici's headersTimeout and
 * bodyTimeout bound each wait, not the whole: an endpoint that trickles its answer a byte at a
 * time would hold every request of the route (they share one mint) for as long as it liked.
 */
const TOKEN_DEADLINE_MS = 10_000;

/**
 * A route's options as one string, templates by their source: all of them, so an option added
 * later is part of the token cache key without being listed. Made once per route (the compiled
 * options object), not per request.
 */
const optionsKeys = new WeakMap<object, string>();
function optionsKey(options: object): string {
  let key = optionsKeys.get(options);
  if (key === undefined) {
    key = JSON.stringify(options, (_name, value: unknown) => (isTemplate(value) ? value.source : value));
    optionsKeys.set(options, key);
  }
  return key;
}

function isTemplate(value: unknown): value is Template {
  return typeof value === 'object' && value !== null && 'source' in value && 'parts' in value && 'fields' in value;
}

/** A token response is a small JSON document; a larger answer is refused, not held. */
const MAX_TOKEN_RESPONSE = 256 * 1024;

const TOKEN_TEXT = /^[\x21-\x7e]+$/;

const fieldName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]{0,63}$/);

const schema = z.strictObject({
  scheme: z.literal('oauth2_client_credentials'),
  token_url: url,
  /** basic: HTTP Basic (RFC 6749 §2.3.1); body: form fields; json: a JSON body (GoCardless). */
  client_auth: z.enum(['basic', 'body', 'json']).default('basic'),
  client_id: templateString.default(compileTemplate('{client_id}')),
  client_secret: templateString.default(compileTemplate('{client_secret}')),
  /** Names of the id and secret in a form or JSON body (GoCardless: secret_id / secret_key). */
  id_field: fieldName.default('client_id'),
  secret_field: fieldName.default('client_secret'),
  scope: z.string().max(1024).optional(),
  extra: z.record(fieldName, z.string().max(1024)).default({}),
  /** Where the response keeps the token, its lifetime in seconds, and an optional refresh token. */
  token_field: fieldName.default('access_token'),
  expires_field: fieldName.default('expires_in'),
  refresh_field: fieldName.optional(),
  refresh_expires_field: fieldName.optional(),
  /** Endpoint that trades a refresh token for a new access token (GoCardless /token/refresh/). */
  refresh_url: url.optional(),
}).superRefine((o, ctx) => {
  // The refresh token sent to refresh_url is the one read from refresh_field of the token answer:
  // without that field no refresh token is ever kept, and every token was minted again instead.
  if (o.refresh_url !== undefined && o.refresh_field === undefined) {
    ctx.addIssue({ code: 'custom', path: ['refresh_url'], message: 'no refresh token is kept to send here without refresh_field: set refresh_field to the field of the token answer that holds one (GoCardless: refresh), or remove refresh_url' });
  }
  // A refresh token is sent to refresh_url only: without it the token kept is never used, and each
  // token is minted again from the client secret; a lifetime without a refresh token times nothing.
  if (o.refresh_field !== undefined && o.refresh_url === undefined) {
    ctx.addIssue({ code: 'custom', path: ['refresh_field'], message: 'a refresh token is only sent to refresh_url: set refresh_url to the endpoint that trades it for a new access token (GoCardless: /api/v2/token/refresh/), or remove refresh_field' });
  }
  if (o.refresh_expires_field !== undefined && o.refresh_field === undefined) {
    ctx.addIssue({ code: 'custom', path: ['refresh_expires_field'], message: 'the refresh token\'s lifetime needs refresh_field (and refresh_url): set them, or remove refresh_expires_field' });
  }
});
type Options = z.output<typeof schema>;

/**
 * OAuth2 client credentials (RFC 6749 §4.4): TrueLayer and Tink (form), GoCardless (JSON, with
 * refresh tokens). The token is minted in `prepare` through the shared TokenBroker (cached, one
 * refresh at a time, across instances with Redis); `inject` attaches it as a Bearer token. When
 * the token endpoint rejects the current credential and a previous version is in its grace, the
 * token is minted with the previous one: the token endpoint is safe to retry.
 */
export const oauth2Injector: Injector<Options> = {
  scheme: 'oauth2_client_credentials',
  schema,
  needsBody: false,
  claims: () => ({ headers: ['authorization'], query: [], bodyFields: [] }),
  templates: (options) => [options.client_id, options.client_secret],
  async prepare(args: PrepareArgs<Options>): Promise<string> {
    const { options, credential } = args;
    // Every option (optionsKey): two routes that share a credential and a token endpoint but differ
    // in anything (client fields, which field of the answer is the token) get their own tokens. The
    // version's created_at too: a mint with the lost record's version 1 that ends after the key was
    // put again (and its tokens dropped) is not cached as a token of the new version 1.
    const key = { credential: credential.id, version: credential.version, parts: [credential.createdAt ?? '', optionsKey(options)] };
    const token: Secret = await args.tokens.token(key, async (refresh) => {
      const dispatcher = args.dispatcherFor(new URL(options.token_url).origin);
      if (refresh && options.refresh_url) {
        // The refresh endpoint's own origin: a pool is bound to one, and only the path would change.
        const refreshed = await call(args.dispatcherFor(new URL(options.refresh_url).origin), options.refresh_url, 'json', { refresh: refresh.refreshToken }, undefined, options, args.deadlineMs).catch(() => undefined);
        // RFC 6749 §6: a refresh answer may carry no new refresh token (GoCardless's never does);
        // the one in hand then stays good for its own lifetime and renews the next token too.
        if (refreshed) return { ...refreshed, mintedBy: refresh.mintedBy, ...(refreshed.refreshToken ? {} : { refreshToken: refresh.refreshToken, refreshExpiresInMs: refresh.refreshExpiresInMs }) };
      }
      try {
        return await mint(dispatcher, options, credential, args.deadlineMs);
      } catch (err) {
        if (!(err instanceof TokenRejected) || !args.previous) throw err;
        const previous = args.previous();
        return { ...(await mint(dispatcher, options, previous, args.deadlineMs)), mintedBy: previous.version };
      }
    });
    const value = token.reveal();
    args.redact(value);
    return value;
  },
  inject({ request, prepared }) {
    if (typeof prepared !== 'string') throw new ProxyError('credential_unavailable', 'No access token was obtained.');
    request.headers.set('authorization', [`Bearer ${prepared}`]);
  },
};

/**
 * The token endpoint refused the client credentials (invalid_client and friends): the credential
 * is unusable for this route (503), and the pipeline raises the "upstream rejected the credential"
 * alert. The endpoint's own error text is never passed on: it may quote what was sent.
 */
export class TokenRejected extends ProxyError {
  readonly upstreamStatus: number;

  constructor(upstreamStatus: number) {
    super('credential_unavailable', 'The token endpoint rejected the client credentials.');
    this.upstreamStatus = upstreamStatus;
  }
}

/** RFC 6749 §5.2 error codes that fault the token request itself rather than the client's credentials. */
const REQUEST_ERRORS: ReadonlySet<string> = new Set(['invalid_request', 'invalid_scope', 'unsupported_grant_type']);

/** The `error` of an RFC 6749 §5.2 error answer; undefined when the answer is not one. */
function oauthErrorCode(text: string): string | undefined {
  try {
    const doc: unknown = JSON.parse(text);
    return typeof doc === 'object' && doc !== null && 'error' in doc && typeof doc.error === 'string' ? doc.error : undefined;
  } catch {
    return undefined;
  }
}

async function mint(dispatcher: Dispatcher, options: Options, credential: ResolvedCredential, deadlineMs: number): Promise<Minted> {
  const id = render(options.client_id, credential.fields);
  const secret = render(options.client_secret, credential.fields);
  const fields: Record<string, string> = { ...options.extra };
  if (options.client_auth !== 'json') fields.grant_type = 'client_credentials';
  if (options.scope) fields.scope = options.scope;
  let basic: string | undefined;
  if (options.client_auth === 'basic') {
    // RFC 6749 §2.3.1: form-urlencode id and secret before joining them.
    basic = Buffer.from(`${encodeURIComponent(id)}:${encodeURIComponent(secret)}`).toString('base64');
  } else {
    fields[options.id_field] = id;
    fields[options.secret_field] = secret;
  }
  return call(dispatcher, options.token_url, options.client_auth === 'json' ? 'json' : 'form', fields, basic, options, deadlineMs);
}

async function call(dispatcher: Dispatcher, target: string, encoding: 'form' | 'json', fields: Record<string, string>, basic: string | undefined, options: Options, deadlineMs: number): Promise<Minted> {
  const u = new URL(target);
  const body = encoding === 'json' ? JSON.stringify(fields) : new URLSearchParams(fields).toString();
  const limitMs = Math.min(TOKEN_DEADLINE_MS, deadlineMs);
  const exchange = dispatchExchange(dispatcher, {
    method: 'POST',
    path: `${u.pathname}${u.search}`,
    headers: {
      'content-type': encoding === 'json' ? 'application/json' : 'application/x-www-form-urlencoded',
      accept: 'application/json',
      ...(basic ? { authorization: `Basic ${basic}` } : {}),
    },
    body,
    headersTimeout: limitMs,
    bodyTimeout: limitMs,
  });
  let late = false;
  const timer = setTimeout(() => {
    late = true;
    exchange.abort(new Error('the token endpoint did not answer in time'));
  }, limitMs);
  let res: UpstreamExchange;
  let text: string;
  try {
    try {
      res = await exchange.head;
    } catch (err) {
      // A name that resolved to an address the route may not reach is refused as the upstream's would be (403), not an outage.
      const code = errorCode(err);
      if (code === 'EGRESS_PRIVATE_ADDRESS') throw upstreamFailure(err);
      // Only the code, as upstreamFailure does: it tells a certificate the route does not trust
      // (upstream_ca) from a refused connection, and carries nothing of the request.
      throw new ProxyError('credential_unavailable', late ? 'The token endpoint did not answer in time.' : `The token endpoint could not be reached${code ? ` (${code})` : ''}.`, { cause: code });
    }
    try {
      text = (await res.readAll(MAX_TOKEN_RESPONSE)).toString('utf8');
    } catch {
      throw new ProxyError('credential_unavailable', late ? 'The token endpoint did not answer in time.' : `The token endpoint's answer was cut short or is over ${MAX_TOKEN_RESPONSE / 1024} KiB.`);
    }
  } finally {
    clearTimeout(timer);
  }
  if (res.status === 400) {
    // RFC 6749 §5.2 answers every error with 400 (invalid_client too, when the client did not
    // authenticate with a header). These three name the request the route's options made, not the
    // client's credentials: another key version would be refused the same way, and the operator
    // needs the route fixed, not the key. Only the registered code is quoted, never the server's text.
    const code = oauthErrorCode(text);
    if (code !== undefined && REQUEST_ERRORS.has(code)) throw new ProxyError('credential_unavailable', `The token endpoint refused the token request (${code}): check the route's token_url, scope and extra.`);
  }
  if (res.status === 400 || res.status === 401 || res.status === 403) {
    // invalid_client and friends (RFC 6749 §5.2): this credential version is refused.
    throw new TokenRejected(res.status);
  }
  if (res.status === 429) {
    // Its Retry-After travels with the error: the broker asks no more until then (TokenBroker).
    const waitMs = retryAfterMs(res.headers['retry-after']);
    throw new ProxyError('credential_unavailable', 'The token endpoint answered 429 (too many token requests).', waitMs > 0 ? { headers: { 'retry-after': String(Math.ceil(waitMs / 1000)) } } : undefined);
  }
  if (res.status < 200 || res.status >= 300) throw new ProxyError('credential_unavailable', `The token endpoint answered ${res.status}.`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new ProxyError('credential_unavailable', 'The token endpoint did not answer JSON.');
  }
  // RFC 6749 §5.1: the answer is a JSON object; null would fail the field lookups below.
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new ProxyError('credential_unavailable', 'The token endpoint did not answer a JSON object.');
  const doc = parsed as Record<string, unknown>;
  const token = doc[options.token_field];
  const expiresIn = Number(doc[options.expires_field] ?? 3600);
  if (typeof token !== 'string' || !token) throw new ProxyError('credential_unavailable', `The token endpoint's answer has no "${options.token_field}".`);
  // A Bearer token is visible ASCII (RFC 6750 §2.1 b64token is narrower still). Refused here, it is
  // not cached: one bad answer (CR LF, a space, a control byte) would otherwise fail every request
  // of the route until its expires_in ran out, up to a day.
  if (!TOKEN_TEXT.test(token)) throw new ProxyError('credential_unavailable', `The token endpoint's "${options.token_field}" holds a character a Bearer token cannot carry.`);
  const refresh = options.refresh_field ? doc[options.refresh_field] : undefined;
  const refreshExpires = options.refresh_expires_field ? Number(doc[options.refresh_expires_field]) : undefined;
  return {
    token,
    expiresInMs: Math.min(Number.isFinite(expiresIn) && expiresIn > 0 ? expiresIn : 3600, MAX_TOKEN_LIFETIME_S) * 1000,
    ...(typeof refresh === 'string' && refresh ? { refreshToken: refresh } : {}),
    ...(refreshExpires && Number.isFinite(refreshExpires) ? { refreshExpiresInMs: Math.min(refreshExpires, MAX_REFRESH_LIFETIME_S) * 1000 } : {}),
  };
}
