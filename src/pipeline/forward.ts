import { Readable } from 'node:stream';
import { brotliDecompressSync, gunzipSync, gzipSync, inflateRawSync, inflateSync, zstdDecompressSync } from 'node:zlib';
import type { Dispatcher } from 'undici';
import { ProxyError, upstreamFailure } from '../errors.ts';
import type { OutboundRequest } from '../injectors/types.ts';
import type { RequestContext } from './context.ts';
import { flatten, responseHeaders } from './headers.ts';
import { checkDeclaredLength, continueBody, hasBody, limitBody } from './body.ts';
import { closeForDrain } from './connection-state.ts';
import { buildOutboundWithNonce } from './inject.ts';
import { redactor } from './redact.ts';
import { liveVersion, open, resolveCredential } from './resolve-credential.ts';
import { UpstreamExchange, dispatchExchange } from './upstream-exchange.ts';
import { retryAfterMs } from './retry-after.ts';

/** Error and redirect bodies up to this size are inspected for echoed secrets; a larger one is refused (502). */
export const MAX_INSPECTED_ERROR_BODY = 1024 * 1024;

/**
 * Send the request upstream and relay the response. Redirects are relayed, never followed. Nothing
 * is retried, with one exception: when the upstream rejects the current credential (the route's
 * auth_failure), a replay-safe request is sent once more with the previous version inside its grace.
 */
export async function forward(ctx: RequestContext): Promise<void> {
  const route = ctx.route!;
  // The caller may have gone while an earlier step waited (Redis, a token endpoint, its body):
  // nobody would read the answer, so nothing is sent. The request is recorded as aborted.
  if (ctx.res.destroyed) throw new Error('the caller closed the connection before the request was sent');
  let attempt: Attempt | undefined;
  const onClose = () => {
    if (!ctx.res.writableFinished) attempt?.exchange.abort(new Error('the caller closed the connection'));
  };
  // Removed in `finally` below: `on` spares the wrapper `once` would make for every request.
  ctx.res.on('close', onClose);
  try {
    if (!liveVersion(ctx, ctx.credential!.version)) await resolveAgain(ctx);
    attempt = startExchange(ctx, ctx.outbound!);
    await received(ctx, attempt);
    // The status decides first, without a trip through the async check, for nearly every response.
    if (route.authFailure.statuses.has(attempt.exchange.status) && (await isAuthFailure(ctx, attempt))) {
      const credential = ctx.credential!.id;
      const version = String(ctx.credential!.version);
      ctx.services.metrics.authFailures.inc({ credential, version });
      // A fetched credential (an OAuth2 token) the upstream refuses is dropped, so the next request
      // mints a new one: that token only, and once a minute at most per token key (token-broker.ts).
      const replaced = route.needsPrepare && (await ctx.services.tokens.refused(ctx.fetched ?? []));
      // The previous version as the store has it now: revoked, or past its grace, while the first
      // attempt was out, it is not used (rolled back to current meanwhile, it is).
      const previous = ctx.replayable && ctx.previous ? liveVersion(ctx, ctx.previous.version) : undefined;
      if (ctx.replayable && ctx.previous && route.needsPrepare && !route.clientCertificate) {
        // The token broker mints with the previous version only while it is still usable.
        ctx.previous = previous;
        // A token broker's route falls back when minting (the token endpoint is safe to retry),
        // not here (providers.md §3.2): the refused token was dropped above, so the replay goes
        // with a token minted afresh from the current version, and the broker turns to the
        // previous version only if the token endpoint refuses the current one. A token the
        // broker kept (refused again within its minute) would go as it went: no replay then. Nor
        // when the current version was revoked or retired while the first attempt was out: the
        // new token would be minted with it, and its secret is not to be sent again.
        if (replaced && liveVersion(ctx, ctx.credential!.version)) {
          attempt.exchange.discard();
          const outbound = await buildOutboundWithNonce(ctx, ctx.credential!);
          attempt = startExchange(ctx, outbound);
          await received(ctx, attempt);
        }
      } else if (previous) {
        attempt.exchange.discard();
        const opened = open(ctx, credential, previous);
        ctx.credential = opened;
        ctx.fellBack = true;
        ctx.services.metrics.fallbacks.inc({ credential, version: String(opened.version) });
        ctx.services.rules.onFallback(credential, Number(version), opened.version, route.name);
        const outbound = await buildOutboundWithNonce(ctx, opened);
        attempt = startExchange(ctx, outbound);
        await received(ctx, attempt);
      } else {
        ctx.services.rules.onAuthFailure(credential, Number(version), route.name, attempt.exchange.status, ctx.previous?.version);
      }
    }
    await relay(ctx, attempt);
  } finally {
    ctx.res.off('close', onClose);
  }
}

/**
 * The version resolved when the request arrived was revoked or retired before the request could
 * go (a cutover, or the compromise path): resolve again, so it goes with the version current now,
 * or is refused (503) when there is none. Only a body buffered for it may be sent twice, so a
 * request that was not replay-safe then does not become so now.
 */
async function resolveAgain(ctx: RequestContext): Promise<void> {
  const replayable = ctx.replayable === true;
  ctx.previous = undefined;
  ctx.replayable = undefined;
  resolveCredential(ctx);
  ctx.replayable = replayable && ctx.replayable === true;
  ctx.outbound = await buildOutboundWithNonce(ctx, ctx.credential!);
}

interface Attempt {
  readonly exchange: UpstreamExchange;
  /** The raw body, when it was read to classify the response. */
  raw?: Buffer;
  /** The request body failed the route's max_body while streaming. */
  readonly tooLarge: () => boolean;
}

/** Dispatch the request on the route's pool; the exchange's `head` settles with the response head or the failure. */
function startExchange(ctx: RequestContext, out: OutboundRequest): Attempt {
  const { req } = ctx;
  // Gone while what came before waited (a credential resolved again, a replay's token or nonce):
  // its 'close' aborted the attempt before, not this one, and nobody would read the answer.
  if (ctx.res.destroyed) throw new Error('the caller closed the connection before the request was sent');
  const route = ctx.route!;
  const headers = out.headers;
  let body: Dispatcher.DispatchOptions['body'] = null;
  let tooLarge = false;
  if (out.body !== undefined) {
    body = out.body;
    headers.set('content-length', [String(out.body.length)]);
  } else if (hasBody(req)) {
    checkDeclaredLength(req, route.maxBody);
    continueBody(req, ctx.res);
    const declared = req.headers['content-length'];
    if (declared !== undefined && req.headers['transfer-encoding'] === undefined) {
      // A declared length within max_body: Node's parser delivers exactly that many bytes, so the
      // request itself is the body (no counting stream in between).
      headers.set('content-length', [declared]);
      body = req;
    } else {
      body = Readable.from(limitBody(req, route.maxBody, () => {
        tooLarge = true;
      }), { objectMode: false });
    }
  }
  const dispatchers = ctx.services.dispatchers;
  let exchange: UpstreamExchange;
  try {
    const pool = route.clientCertificate ? dispatchers.forCredential(route, ctx.credential!) : dispatchers.for(route);
    exchange = dispatchExchange(pool, {
      method: out.method as Dispatcher.HttpMethod,
      path: out.query ? `${out.path}?${out.query}` : out.path,
      headers: flatten(headers),
      body,
      headersTimeout: route.responseTimeoutMs,
      bodyTimeout: route.responseTimeoutMs,
    });
  } catch (err) {
    // No pool for this route (a private address it may not reach, a certificate that does not load).
    exchange = new UpstreamExchange();
    exchange.refused(err as Error);
  }
  return { exchange, tooLarge: () => tooLarge };
}

/** Wait for the response head: the time it took and its status are recorded; an upstream 429 pauses the route. */
async function received(ctx: RequestContext, attempt: Attempt): Promise<void> {
  const sentAt = performance.now();
  const route = ctx.route!;
  let exchange: UpstreamExchange;
  try {
    exchange = await attempt.exchange.head;
  } catch (err) {
    if (attempt.tooLarge()) throw new ProxyError('body_too_large');
    throw upstreamFailure(err);
  }
  ctx.upstreamMs = (ctx.upstreamMs ?? 0) + (performance.now() - sentAt);
  ctx.upstreamStatus = exchange.status;
  const transferCoding = exchange.headers['transfer-encoding'];
  if (transferCoding !== undefined && headerValue(transferCoding)!.trim().toLowerCase() !== 'chunked') {
    // The proxy sends no TE, so chunked is the only transfer coding an upstream may use (RFC 9112
    // §6.1). undici removes chunked framing and nothing else: gzip or an unknown coding would reach
    // the caller as undecoded bytes, with the header that said so dropped as hop-by-hop, and an
    // error body would be searched for echoes in its compressed form.
    exchange.discard();
    throw new ProxyError('upstream_error', 'The upstream used a transfer coding other than chunked.');
  }
  if (exchange.status === 429) {
    // The provider's quota is shared by every caller: its Retry-After pauses the route for all of them.
    const pauseMs = retryAfterMs(exchange.headers['retry-after']);
    if (pauseMs > 0) ctx.services.limiter.pause(route.name, pauseMs);
  }
}

/** Does the response match the route's auth_failure? Reads (and keeps) the body only when a body match is configured. */
async function isAuthFailure(ctx: RequestContext, attempt: Attempt): Promise<boolean> {
  const rule = ctx.route!.authFailure;
  const { exchange } = attempt;
  if (!rule.statuses.has(exchange.status)) return false;
  if (!rule.bodyContains) return true;
  const encoding = headerValue(exchange.headers['content-encoding']);
  if (exchange.status < 300) {
    // A success status (Kraken's 200 with "EAPI:Invalid key"): a short body is looked at and left
    // in place for the relay; a longer one is an answer, not a rejection, and streams on.
    const peeked = await exchange.peek();
    return peeked !== undefined && mentions(peeked, encoding, rule.bodyContains);
  }
  attempt.raw = await exchange.readAll(MAX_INSPECTED_ERROR_BODY);
  return mentions(attempt.raw, encoding, rule.bodyContains);
}

/**
 * Does the decoded body contain one of the texts? A body that does not decode says nothing: a
 * success streams on as it is, and an error body is refused by the relay, which decodes it again (502).
 */
function mentions(raw: Buffer, encoding: string | undefined, texts: readonly string[]): boolean {
  try {
    const body = decodeBody(raw, encoding).toString('utf8');
    return texts.some((text) => body.includes(text));
  } catch {
    return false;
  }
}

async function relay(ctx: RequestContext, attempt: Attempt): Promise<void> {
  const { req, res } = ctx;
  const { exchange } = attempt;
  const redact = redactor(ctx.redactions);
  // Forward mode's caller talks to the upstream's own host: its cookies and redirects are relayed as they came.
  const relayed = responseHeaders(exchange.headers as Record<string, string | string[] | undefined>, redact, ctx.forward ? undefined : ctx.route);
  relayed.push('x-request-id', ctx.id);
  try {
    // Error bodies and redirect bodies (which often repeat their Location, e.g. Express's
    // res.redirect) are read whole and redacted; 304 has no body.
    if (exchange.status >= 300 && exchange.status !== 304 && req.method !== 'HEAD') {
      const raw = attempt.raw ?? (await exchange.readAll(MAX_INSPECTED_ERROR_BODY));
      // Asked once the body is in, just before the head goes: a drain may have begun while it arrived.
      if (ctx.services.drain.draining) closeForDrain(res);
      relayInspectedBody(ctx, exchange, relayed, raw, redact);
    } else {
      if (ctx.services.drain.draining) closeForDrain(res);
      // A caller that stops reading gets as long as the upstream would: the route's response timeout.
      await exchange.pipeTo(res, exchange.status, relayed, ctx.route!.responseTimeoutMs);
    }
  } catch (err) {
    exchange.discard();
    if (!res.headersSent) throw err instanceof ProxyError ? err : upstreamFailure(err);
    // The response had started: all that is left is to cut it short, so the caller sees it fail.
    res.destroy();
  }
}

/**
 * An error or redirect body may echo what we sent (a provider quoting the key it rejected, a
 * Location with the key in it): decode it and redact every injected value before the caller sees it.
 */
function relayInspectedBody(ctx: RequestContext, exchange: UpstreamExchange, relayed: string[], raw: Buffer, redact: (text: string) => string): void {
  const out = redactBody(decodeBody(raw, headerValue(exchange.headers['content-encoding'])), redact);
  const headers: string[] = [];
  for (let i = 0; i < relayed.length; i += 2) {
    const name = relayed[i]!;
    if (name === 'content-length' || name === 'content-encoding') continue;
    headers.push(name, relayed[i + 1]!);
  }
  headers.push('content-length', String(out.length));
  ctx.res.writeHead(exchange.status, headers);
  ctx.res.end(out);
}

/**
 * The body with every echo redacted. A body that is itself gzip data (an application/gzip or
 * octet-stream error without Content-Encoding, or a .gz under Content-Encoding: gzip) hides an echo
 * from the search, so it is inflated within the same limit and searched too. With an echo inside,
 * the caller gets the redacted content compressed again: still gzip data, as the upstream labelled
 * it, with [REDACTED] in place as for any other body. Refusing instead would hide the upstream's
 * error from the caller for no gain. Gzip inside that, or gzip data that does not inflate whole,
 * cannot be inspected and is refused (502).
 */
function redactBody(body: Buffer, redact: (text: string) => string): Buffer {
  if (isGzip(body)) {
    const inner = decodeBody(body, 'gzip');
    if (isGzip(inner)) throw new ProxyError('upstream_error', 'The upstream error body is gzip data inside gzip data, which the proxy does not inspect.');
    const text = inner.toString('latin1');
    const redacted = redact(text);
    if (redacted !== text) return gzipSync(Buffer.from(redacted, 'latin1'));
  }
  const text = body.toString('latin1');
  const redacted = redact(text);
  return redacted === text ? body : Buffer.from(redacted, 'latin1');
}

/** A zlib header (RFC 1950 §2.2): method 8 (deflate), a window of at most 32 KiB, and the check bits. */
function isZlib(body: Buffer): boolean {
  return body.length >= 2 && (body[0]! & 0x0f) === 8 && body[0]! >> 4 <= 7 && ((body[0]! << 8) | body[1]!) % 31 === 0;
}

/** The gzip magic and its only compression method, deflate (RFC 1952 §2.3.1). */
function isGzip(body: Buffer): boolean {
  return body.length >= 3 && body[0] === 0x1f && body[1] === 0x8b && body[2] === 0x08;
}

function decodeBody(raw: Buffer, contentEncoding: string | undefined): Buffer {
  const encoding = contentEncoding?.trim().toLowerCase();
  // No content has no coding to undo: a 302 or 401 with Content-Length: 0 under a compressing
  // middleware's Content-Encoding is not compressed data cut short.
  if (!encoding || encoding === 'identity' || raw.length === 0) return raw;
  const limits = { maxOutputLength: MAX_INSPECTED_ERROR_BODY };
  try {
    if (encoding === 'gzip' || encoding === 'x-gzip') return gunzipSync(raw, limits);
    // "deflate" is zlib data (RFC 9110 §8.4.1.2), but IIS and other servers send it raw, without
    // the zlib wrapper; clients (browsers, undici, curl) read both, so the proxy does as well.
    if (encoding === 'deflate') return isZlib(raw) ? inflateSync(raw, limits) : inflateRawSync(raw, limits);
    if (encoding === 'br') return brotliDecompressSync(raw, limits);
    // RFC 8878: what CDNs (Cloudflare among them) send a caller whose Accept-Encoding offers it.
    if (encoding === 'zstd') return zstdDecompressSync(raw, limits);
  } catch {
    throw new ProxyError('upstream_error', 'The upstream error body could not be decoded for inspection.');
  }
  throw new ProxyError('upstream_error', 'The upstream error body uses an encoding the proxy cannot inspect.');
}

function headerValue(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value.join(',') : value;
}
