import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { brotliDecompressSync, gunzipSync, inflateSync } from 'node:zlib';
import type { Dispatcher } from 'undici';
import { ProxyError, upstreamFailure } from '../errors.ts';
import type { RequestContext } from './context.ts';
import { flatten, responseHeaders } from './headers.ts';
import { checkDeclaredLength, hasBody, limitBody } from './body.ts';
import { redactText } from './redact.ts';

/** Error bodies up to this size are inspected for echoed secrets; a larger one is refused (502). */
export const MAX_INSPECTED_ERROR_BODY = 1024 * 1024;

/**
 * Send the request upstream and relay the response. Redirects are relayed, never followed; nothing
 * is retried. The caller going away aborts the upstream request.
 */
export async function forward(ctx: RequestContext): Promise<void> {
  const { req, res } = ctx;
  const route = ctx.route!;
  const out = ctx.outbound!;
  const pool = ctx.services.dispatchers.for(route);

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

  const abort = new AbortController();
  const onClose = () => {
    if (!res.writableFinished) abort.abort();
  };
  res.once('close', onClose);

  const sentAt = performance.now();
  let response: Dispatcher.ResponseData;
  try {
    response = await pool.request({
      method: out.method as Dispatcher.HttpMethod,
      path: out.query ? `${out.path}?${out.query}` : out.path,
      headers: flatten(headers),
      body,
      signal: abort.signal,
      headersTimeout: route.responseTimeoutMs,
      bodyTimeout: route.responseTimeoutMs,
    });
  } catch (err) {
    if (tooLarge) throw new ProxyError('body_too_large');
    throw upstreamFailure(err);
  }
  ctx.upstreamMs = performance.now() - sentAt;
  ctx.upstreamStatus = response.statusCode;
  if (response.statusCode === 429) {
    // The provider's quota is shared by every caller: its Retry-After pauses the route for all of them.
    const pauseMs = retryAfterMs(headerValue(response.headers['retry-after']));
    if (pauseMs > 0) ctx.services.limiter.pause(route.name, pauseMs);
  }

  const redact = (value: string) => redactText(value, ctx.redactions);
  const relayed = responseHeaders(response.headers as Record<string, string | string[] | undefined>, redact);
  relayed.push('x-request-id', ctx.id);

  try {
    if (response.statusCode >= 400 && req.method !== 'HEAD') {
      await relayErrorBody(ctx, response, relayed);
    } else {
      res.writeHead(response.statusCode, relayed);
      await pipeline(response.body, res);
    }
  } catch (err) {
    response.body.destroy();
    if (!res.headersSent) throw err instanceof ProxyError ? err : upstreamFailure(err);
    // The response had started: all that is left is to cut it short, so the caller sees it fail.
    res.destroy();
  } finally {
    res.off('close', onClose);
  }
}

/**
 * An error body may echo what we sent (a provider quoting the key it rejected). Buffer it (bounded),
 * decode it, and redact every injected value before the caller sees it.
 */
async function relayErrorBody(ctx: RequestContext, response: Dispatcher.ResponseData, relayed: string[]): Promise<void> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of response.body) {
    size += (chunk as Buffer).length;
    if (size > MAX_INSPECTED_ERROR_BODY) throw new ProxyError('upstream_error', 'The upstream error body is too large to inspect.');
    chunks.push(chunk as Buffer);
  }
  let raw: Buffer = Buffer.concat(chunks, size);
  const encoding = headerValue(response.headers['content-encoding'])?.trim().toLowerCase();
  if (encoding && encoding !== 'identity') {
    raw = decode(raw, encoding);
  }
  const text = redactText(raw.toString('latin1'), ctx.redactions.map((s) => Buffer.from(s, 'utf8').toString('latin1')));
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

function decode(raw: Buffer, encoding: string): Buffer {
  const limits = { maxOutputLength: MAX_INSPECTED_ERROR_BODY };
  try {
    if (encoding === 'gzip' || encoding === 'x-gzip') return gunzipSync(raw, limits);
    if (encoding === 'deflate') return inflateSync(raw, limits);
    if (encoding === 'br') return brotliDecompressSync(raw, limits);
  } catch {
    throw new ProxyError('upstream_error', 'The upstream error body could not be decoded for inspection.');
  }
  throw new ProxyError('upstream_error', `The upstream error body uses an encoding the proxy cannot inspect.`);
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
