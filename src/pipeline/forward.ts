import type { ServerResponse } from 'node:http';
import { Readable } from 'node:stream';
import { brotliDecompressSync, gunzipSync, inflateSync } from 'node:zlib';
import type { Dispatcher } from 'undici';
import { ProxyError, upstreamFailure } from '../errors.ts';
import type { OutboundRequest } from '../injectors/types.ts';
import type { RequestContext } from './context.ts';
import { flatten, responseHeaders } from './headers.ts';
import { checkDeclaredLength, hasBody, limitBody } from './body.ts';
import { buildOutboundWithNonce } from './inject.ts';
import { redactor, redactText } from './redact.ts';
import { open } from './resolve-credential.ts';

/** Error bodies up to this size are inspected for echoed secrets; a larger one is refused (502). */
export const MAX_INSPECTED_ERROR_BODY = 1024 * 1024;

interface Attempt {
  readonly response: Dispatcher.ResponseData;
  /** The raw body, when it was read to classify the response. */
  readonly raw?: Buffer;
}

/**
 * Send the request upstream and relay the response. Redirects are relayed, never followed. Nothing
 * is retried, with one exception: when the upstream rejects the current credential (the route's
 * auth_failure), a replay-safe request is sent once more with the previous version inside its grace.
 */
export async function forward(ctx: RequestContext): Promise<void> {
  const route = ctx.route!;
  const abort = new AbortController();
  const onClose = () => {
    if (!ctx.res.writableFinished) abort.abort();
  };
  ctx.res.once('close', onClose);
  try {
    let attempt = await send(ctx, ctx.outbound!, abort.signal);
    if (await isAuthFailure(ctx, attempt)) {
      const credential = ctx.credential!.id;
      const version = String(ctx.credential!.version);
      ctx.services.metrics.authFailures.inc({ credential, version });
      // A fetched credential (an OAuth2 token) the upstream refuses is dropped: the next request mints a new one.
      if (route.needsPrepare) ctx.services.tokens.invalidateCredential(credential, ctx.credential!.version);
      if (ctx.replayable && ctx.previous) {
        discard(attempt.response.body);
        const previous = open(ctx, credential, ctx.previous);
        ctx.credential = previous;
        ctx.fellBack = true;
        ctx.services.metrics.fallbacks.inc({ credential, version: String(previous.version) });
        ctx.services.rules.onFallback(credential, Number(version), previous.version, route.name);
        attempt = await send(ctx, await buildOutboundWithNonce(ctx, previous), abort.signal);
      } else {
        ctx.services.rules.onAuthFailure(credential, Number(version), route.name, attempt.response.statusCode);
      }
    }
    await relay(ctx, attempt);
  } finally {
    ctx.res.off('close', onClose);
  }
}

async function send(ctx: RequestContext, out: OutboundRequest, signal: AbortSignal): Promise<Attempt> {
  const { req } = ctx;
  const route = ctx.route!;
  const headers = out.headers;
  let body: Dispatcher.DispatchOptions['body'];
  let tooLarge = false;
  if (out.body !== undefined) {
    body = out.body;
    headers.set('content-length', [String(out.body.length)]);
  } else if (hasBody(req)) {
    checkDeclaredLength(req, route.maxBody);
    const declared = req.headers['content-length'];
    if (declared !== undefined && req.headers['transfer-encoding'] === undefined) headers.set('content-length', [declared]);
    body = Readable.from(limitBody(req, route.maxBody, () => {
      tooLarge = true;
    }), { objectMode: false });
  }
  const sentAt = performance.now();
  let response: Dispatcher.ResponseData;
  try {
    const dispatchers = ctx.services.dispatchers;
    const pool = route.clientCertificate ? dispatchers.forCredential(route, ctx.credential!) : dispatchers.for(route);
    response = await pool.request({
      method: out.method as Dispatcher.HttpMethod,
      path: out.query ? `${out.path}?${out.query}` : out.path,
      headers: flatten(headers),
      body,
      signal,
      headersTimeout: route.responseTimeoutMs,
      bodyTimeout: route.responseTimeoutMs,
    });
  } catch (err) {
    if (tooLarge) throw new ProxyError('body_too_large');
    throw upstreamFailure(err);
  }
  ctx.upstreamMs = (ctx.upstreamMs ?? 0) + (performance.now() - sentAt);
  ctx.upstreamStatus = response.statusCode;
  if (response.statusCode === 429) {
    // The provider's quota is shared by every caller: its Retry-After pauses the route for all of them.
    const pauseMs = retryAfterMs(headerValue(response.headers['retry-after']));
    if (pauseMs > 0) ctx.services.limiter.pause(route.name, pauseMs);
  }
  return { response };
}

/** Does the response match the route's auth_failure? Reads (and keeps) the body only when a body match is configured. */
async function isAuthFailure(ctx: RequestContext, attempt: Attempt): Promise<boolean> {
  const rule = ctx.route!.authFailure;
  if (!rule.statuses.has(attempt.response.statusCode)) return false;
  if (!rule.bodyContains) return true;
  const raw = await readBounded(attempt.response);
  (attempt as { raw?: Buffer }).raw = raw;
  return decodeBody(raw, headerValue(attempt.response.headers['content-encoding'])).toString('utf8').includes(rule.bodyContains);
}

async function relay(ctx: RequestContext, attempt: Attempt): Promise<void> {
  const { req, res } = ctx;
  const { response } = attempt;
  const redact = redactor(ctx.redactions);
  const relayed = responseHeaders(response.headers as Record<string, string | string[] | undefined>, redact);
  relayed.push('x-request-id', ctx.id);
  try {
    if (response.statusCode >= 400 && req.method !== 'HEAD') {
      await relayErrorBody(ctx, response, relayed, attempt.raw ?? (await readBounded(response)));
    } else {
      res.writeHead(response.statusCode, relayed);
      await pipeTo(response.body, res);
    }
  } catch (err) {
    discard(response.body);
    if (!res.headersSent) throw err instanceof ProxyError ? err : upstreamFailure(err);
    // The response had started: all that is left is to cut it short, so the caller sees it fail.
    res.destroy();
  }
}

/**
 * Stream the upstream body to the caller. A plain pipe with explicit settling: stream.pipeline
 * allocates and aborts an AbortController (and so a DOMException) for every response, which
 * showed up as 4% of the proxy's CPU.
 */
function pipeTo(body: Readable, res: ServerResponse): Promise<void> {
  return new Promise((resolve, reject) => {
    const settle = (err?: Error) => {
      body.off('error', onError);
      res.off('finish', onFinish);
      res.off('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const onError = (err: Error) => settle(err);
    const onFinish = () => settle();
    const onClose = () => settle(res.writableFinished ? undefined : new Error('the caller closed the connection'));
    body.once('error', onError);
    res.once('finish', onFinish);
    res.once('close', onClose);
    body.pipe(res);
  });
}

/** Drop a response body we will not relay. undici reports the abort as an error: it must have a listener. */
function discard(body: Readable): void {
  body.on('error', () => {});
  body.destroy();
}

async function readBounded(response: Dispatcher.ResponseData): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of response.body) {
    size += (chunk as Buffer).length;
    if (size > MAX_INSPECTED_ERROR_BODY) throw new ProxyError('upstream_error', 'The upstream error body is too large to inspect.');
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks, size);
}

/**
 * An error body may echo what we sent (a provider quoting the key it rejected): decode it and
 * redact every injected value before the caller sees it.
 */
async function relayErrorBody(ctx: RequestContext, response: Dispatcher.ResponseData, relayed: string[], raw: Buffer): Promise<void> {
  const decoded = decodeBody(raw, headerValue(response.headers['content-encoding']));
  const text = redactText(decoded.toString('latin1'), ctx.redactions.map((s) => Buffer.from(s, 'utf8').toString('latin1')));
  const out = Buffer.from(text, 'latin1');
  const headers: string[] = [];
  for (let i = 0; i < relayed.length; i += 2) {
    const name = relayed[i]!;
    if (name === 'content-length' || name === 'content-encoding') continue;
    headers.push(name, relayed[i + 1]!);
  }
  headers.push('content-length', String(out.length));
  ctx.res.writeHead(response.statusCode, headers);
  ctx.res.end(out);
}

function decodeBody(raw: Buffer, contentEncoding: string | undefined): Buffer {
  const encoding = contentEncoding?.trim().toLowerCase();
  if (!encoding || encoding === 'identity') return raw;
  const limits = { maxOutputLength: MAX_INSPECTED_ERROR_BODY };
  try {
    if (encoding === 'gzip' || encoding === 'x-gzip') return gunzipSync(raw, limits);
    if (encoding === 'deflate') return inflateSync(raw, limits);
    if (encoding === 'br') return brotliDecompressSync(raw, limits);
  } catch {
    throw new ProxyError('upstream_error', 'The upstream error body could not be decoded for inspection.');
  }
  throw new ProxyError('upstream_error', 'The upstream error body uses an encoding the proxy cannot inspect.');
}

/** Retry-After as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), capped at an hour; 0 when absent or unusable. */
export function retryAfterMs(value: string | undefined, now = Date.now()): number {
  if (!value) return 0;
  const trimmed = value.trim();
  const ms = /^\d+$/.test(trimmed) ? Number(trimmed) * 1000 : Date.parse(trimmed) - now;
  return Number.isFinite(ms) && ms > 0 ? Math.min(ms, 3_600_000) : 0;
}

function headerValue(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value.join(',') : value;
}
