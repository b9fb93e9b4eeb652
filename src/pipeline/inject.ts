import { ProxyError } from '../errors.ts';
import { TokenRejected } from '../injectors/oauth2.ts';
import { dropFields, jsonObjectBody } from '../injectors/json-body.ts';
import type { OutboundRequest, ResolvedCredential } from '../injectors/types.ts';
import type { RequestContext } from './context.ts';
import { outboundHeaders } from './headers.ts';
import { checkDeclaredLength, continueBody, hasBody, NO_CONTENT_METHODS, readBody, refuseCodedBody } from './body.ts';
import { liveVersion, open } from './resolve-credential.ts';
import type { FetchedToken, TokenSource } from './token-broker.ts';
import { echoForms, needlesOf } from './redact.ts';
import { claimedPiece, ownedNames } from './param-names.ts';
import { FORM_CHECK, formKinds, refuseClaimedFields } from './form-body.ts';

/**
 * A body of a declared length up to this is read before the request goes upstream, so that it
 * leaves with its head in one write; streaming it cost a small POST half as much again as a GET.
 */
export const SMALL_BODY = 64 * 1024;

/**
 * Build the outbound request from a copy of the inbound one: strip first (hop-by-hop, proxy
 * headers, and everything the injectors claim), then let each injector attach its part. The body
 * is buffered (bounded by max_body) when an injector needs it, when the request may have to be
 * sent again with the previous key, when it is a form (checked for claimed fields), or when it is
 * small; otherwise it streams.
 */
export function inject(ctx: RequestContext): void | Promise<void> {
  const route = ctx.route!;
  // A form body is read whole: a field read as a claimed parameter refuses it before anything goes (form-body.ts).
  const body = hasBody(ctx.req);
  const forms = body ? formKinds(ctx.req) : [];
  // A step that reads what the body says cannot read it encoded (body.ts). A route's reader also
  // writes a body where none came (json_body, kraken): checked on every method that may carry one.
  if (forms.length > 0) refuseCodedBody(ctx.req, FORM_CHECK);
  else if (route.bodyReader !== undefined && !NO_CONTENT_METHODS.has(ctx.req.method!)) refuseCodedBody(ctx.req, route.bodyReader);
  const needsBody = forms.length > 0 || (body && (route.needsBody || ctx.replayable || isSmallBody(ctx.req)));
  if (!needsBody && !route.needsNonce && !route.needsPrepare) {
    ctx.outbound = buildOutbound(ctx, ctx.credential!);
    return;
  }
  return (async () => {
    if (needsBody) {
      // A declared length over max_body is refused before the caller is invited to send it.
      checkDeclaredLength(ctx.req, route.maxBody);
      continueBody(ctx.req, ctx.res);
      ctx.body = await readBody(ctx.req, route.maxBody);
      if (forms.length > 0) refuseClaimedFields(forms, ctx.body, route.claims.query);
    }
    ctx.outbound = await buildOutboundWithNonce(ctx, ctx.credential!);
  })();
}

function isSmallBody(req: RequestContext['req']): boolean {
  return req.headers['transfer-encoding'] === undefined && Number(req.headers['content-length']) <= SMALL_BODY;
}

/**
 * As buildOutbound, after the asynchronous part: a fresh nonce when an injector signs with one, and
 * each injector's `prepare` (an OAuth2 access token), for this credential version.
 */
export async function buildOutboundWithNonce(ctx: RequestContext, credential: ResolvedCredential): Promise<OutboundRequest> {
  const route = ctx.route!;
  const nonce = route.needsNonce ? await ctx.services.nonces.next(credential.id) : undefined;
  let prepared: unknown[] | undefined;
  if (route.needsPrepare) {
    const { services } = ctx;
    // The previous version as the store has it now, not as the request found it on arrival: one
    // revoked (or past its grace) since, while the body arrived, never mints (liveVersion).
    const live = ctx.previous && credential.version !== ctx.previous.version ? liveVersion(ctx, ctx.previous.version) : undefined;
    // An injector opens it only to fall back (a token endpoint that refused the current version):
    // a use of the previous key, counted, audited and alerted on like a request's fallback.
    const previous = live?.state === 'previous'
      ? () => {
        const opened = open(ctx, credential.id, live);
        ctx.fellBack = true;
        services.metrics.fallbacks.inc({ credential: credential.id, version: String(opened.version) });
        services.rules.onFallback(credential.id, credential.version, opened.version, route.name);
        return opened;
      }
      : undefined;
    // Each token handed out is noted with its key: if the upstream refuses it, forward drops that one.
    const fetched: FetchedToken[] = [];
    ctx.fetched = fetched;
    const tokens: TokenSource = {
      token: async (key, mint) => {
        const { token, mintedBy } = await services.tokens.entry(key, mint);
        fetched.push({ key, token, mintedBy });
        return token;
      },
    };
    try {
      prepared = await Promise.all(route.injections.map(({ injector, options }) =>
        injector.prepare?.({
          credential,
          previous,
          options,
          tokens,
          dispatcherFor: (origin) => services.dispatchers.forOrigin(origin, route),
          redact: redactor(ctx, true),
          deadlineMs: route.responseTimeoutMs,
        })));
    } catch (err) {
      if (err instanceof TokenRejected) services.rules.onAuthFailure(credential.id, credential.version, route.name, err.upstreamStatus);
      throw err;
    }
  }
  return buildOutbound(ctx, credential, nonce, prepared);
}

/** The request to send upstream with `credential` attached; called again for a fallback to the previous version. */
export function buildOutbound(ctx: RequestContext, credential: ResolvedCredential, nonce?: bigint, prepared?: readonly unknown[]): OutboundRequest {
  const route = ctx.route!;
  const outbound: OutboundRequest = {
    method: ctx.req.method!,
    host: route.upstreamHost,
    path: `${route.basePath}/${ctx.relativeSegments!.join('/')}`,
    query: removeParams(ctx.target!.query, route.claims.query),
    headers: outboundHeaders(ctx.req.rawHeaders, route.claims.headers, route.callerHeaders),
    body: ctx.body,
  };
  if (route.stripBodyFields) stripBodyFields(outbound, route.stripBodyFields);
  const redact = redactor(ctx);
  const now = new Date();
  route.injections.forEach(({ injector, options }, i) => injector.inject({ request: outbound, credential, options, redact, now, nonce, prepared: prepared?.[i] }));
  checkInjectedHeaders(outbound, route.claims.headers);
  return outbound;
}

/**
 * strip_body_fields: the caller's copies of fields the provider also reads its credential from
 * (Plaid's body client_id and secret) are removed. The body is sent as it came when it holds none.
 */
function stripBodyFields(outbound: OutboundRequest, lowerNames: ReadonlySet<string>): void {
  const body = jsonObjectBody(outbound.body);
  if (body && dropFields(body, lowerNames)) outbound.body = Buffer.from(JSON.stringify(body), 'utf8');
}

/**
 * Register a value that goes upstream for redaction in every form an upstream might echo it, as
 * the credential's own fields are (resolve-credential.ts). A value made for this request (an
 * access token, a signature, a JWT) is as good as the secret it comes from while it is valid: an
 * upstream that quotes it percent-encoded in a Location or JSON-escaped ("/" as "\\/") in an error
 * body must not hand it to the caller. A value already registered (a field sent as it is stored)
 * costs one lookup; a fetched value (an access token, sent on every request of its lifetime) has
 * its forms made once (`reused`).
 */
function redactor(ctx: RequestContext, reused = false): (value: string) => void {
  return (value) => {
    const raw = needlesOf([value]);
    if (raw.length === 0 || ctx.redactions.includes(raw[0]!)) return;
    for (const needle of reused ? reusedEchoes(value) : needlesOf(echoForms(value))) if (!ctx.redactions.includes(needle)) ctx.redactions.push(needle);
  };
}

/** Echo needles of the fetched values in use, by value; bounded (a token lives an hour or a day, a few are live at once). */
const fetchedEchoes = new Map<string, readonly string[]>();
const MAX_FETCHED_ECHOES = 256;

function reusedEchoes(value: string): readonly string[] {
  let needles = fetchedEchoes.get(value);
  if (!needles) {
    needles = needlesOf(echoForms(value));
    if (fetchedEchoes.size >= MAX_FETCHED_ECHOES) fetchedEchoes.clear();
    fetchedEchoes.set(value, needles);
  }
  return needles;
}

// RFC 9110 §5.5 field-value characters (HTAB, SP, VCHAR, obs-text), as the HTTP client enforces them.
const NOT_FIELD_VALUE = /[^\t\x20-\x7e\x80-\xff]/;

/**
 * A credential (or a minted token) holding CR, LF, NUL or another control character cannot be
 * sent in a header: refuse with credential_unavailable here, naming no value, rather than let the
 * HTTP client fail the request as an upstream error whose message quotes the header.
 */
function checkInjectedHeaders(outbound: OutboundRequest, claimed: ReadonlySet<string>): void {
  // Claimed names are folded ("_" as "-"); the injectors set them as configured.
  for (const [name, values] of outbound.headers) {
    if (!claimed.has(name.replaceAll('_', '-'))) continue;
    for (const value of values) {
      if (NOT_FIELD_VALUE.test(value)) {
        throw new ProxyError('credential_unavailable', `The credential cannot be sent in the ${name} header: it holds a character a header value cannot carry.`);
      }
    }
  }
}

/**
 * Drop the caller's copies of parameters the proxy owns; everything else stays byte for byte.
 * A copy is any name a server framework may read as the claimed one (param-names.ts), also behind
 * a ";" inside a pair (Rack before 3 and Python before 3.9.2 split on ";" too).
 */
export function removeParams(query: string, claimed: ReadonlySet<string>): string {
  if (!query || claimed.size === 0) return query;
  const owned = ownedNames(claimed);
  return query
    .split('&')
    .filter((pair) => !pair.split(';').some((piece) => claimedPiece(piece, owned) !== undefined))
    .join('&');
}
