import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import { STATUS_CODES, createServer } from './http.ts';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { randomUUID } from 'node:crypto';
import type { CompiledConfig } from '../config/compile-routes.ts';
import { PROXY_CHALLENGE, ProxyError } from '../errors.ts';
import { findRouteByHost } from '../config/compile-routes.ts';
import { AMBIGUOUS, proxyAuthorizationToken } from './proxy-auth.ts';
import type { RequestContext } from '../pipeline/context.ts';
import { handleRequest } from '../pipeline/index.ts';
import { TOKEN_HEADER } from '../pipeline/identify-caller.ts';
import type { Services } from '../pipeline/services.ts';
import { ERROR_HEADER } from '../pipeline/send-error.ts';
import { afterInFlight, answerAndClose, isLingering, markClosing } from '../pipeline/connection-state.ts';

/** Limits on the plain listener: slow or oversized requests are cut off long before Node's defaults. */
export const LISTENER_LIMITS = Object.freeze({
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 60_000,
  keepAliveTimeoutMs: 5_000,
  maxHeaderSize: 16 * 1024,
  maxHeadersCount: 100,
});

/**
 * The HTTP options of every listener callers talk to (plain, TLS, inside a forward-mode tunnel).
 * Host is not left to Node: its check answers an HTTP/1.1 request without one with a bare 400 (no
 * X-Request-Id, no error body, no audit line); the pipeline refuses it itself (canonicaliseTarget).
 */
export const CALLER_HTTP = Object.freeze({
  headersTimeout: LISTENER_LIMITS.headersTimeoutMs,
  requestTimeout: LISTENER_LIMITS.requestTimeoutMs,
  keepAliveTimeout: LISTENER_LIMITS.keepAliveTimeoutMs,
  maxHeaderSize: LISTENER_LIMITS.maxHeaderSize,
  // Never the lenient parser: it is what request smuggling needs (RFC 9112 §11.2).
  insecureHTTPParser: false,
  requireHostHeader: false,
  joinDuplicateHeaders: false,
  // Node checks the header and request timeouts on this interval (default 30 s): check twice a second.
  connectionsCheckingInterval: 500,
});

/**
 * What every caller listener (plain, TLS, inside a tunnel) does alike: every request goes to the
 * pipeline, also one with an Expect, which the pipeline answers; the header lines are bounded; an
 * upgrade is refused.
 */
export function servePipeline(server: Server, onRequest: (req: IncomingMessage, res: ServerResponse) => void): void {
  // Expect: 100-continue is answered by the pipeline once the request is allowed (continueBody), not by Node at once.
  server.on('checkContinue', onRequest);
  // Any other Expect is refused by the pipeline (417 with X-Request-Id, audited), not by Node's bare 417.
  server.on('checkExpectation', onRequest);
  // Past this many header lines the request is refused (431).
  server.maxHeadersCount = LISTENER_LIMITS.maxHeadersCount;
  // Protocol switches are not API calls, and without an 'upgrade' listener Node runs an Upgrade
  // request as a plain one: refused with a proxy error.
  server.on('upgrade', refuseUpgrade);
}

/** The reverse-mode listener: every request goes through the pipeline with the config live at arrival. */
export function createReverseServer(getConfig: () => CompiledConfig, services: Services, onConnect?: (req: IncomingMessage, socket: Duplex, head: Buffer) => void): Server {
  const server = createServer(CALLER_HTTP, onRequest);
  function onRequest(req: IncomingMessage, res: ServerResponse): void {
    void handleRequest(req, res, getConfig(), services, absoluteForm(req, getConfig()));
  }
  servePipeline(server, onRequest);
  // Forward mode needs the CA (egress certs init); without it there are no tunnels at all.
  server.on('connect', onConnect ?? ((_req: IncomingMessage, socket: Duplex) => refuseRaw(socket, new ProxyError('route_forbidden', 'Forward mode is off: no CA in EGRESS_CERTS (run "egress certs init").'))));
  server.on('clientError', answerClientError);
  server.on('connection', closeIfSilent);
  return server;
}

/**
 * Node's header timeout starts with a request's first byte: a connection that sends nothing at all
 * was kept for good, each one a file descriptor of the whole process (DOS-09). One that has sent
 * no byte when the header timeout has passed is closed. One timer per connection, none per request.
 */
export function closeIfSilent(socket: Socket): void {
  const read = socket.bytesRead;
  const timer = setTimeout(() => {
    if (socket.bytesRead === read) socket.destroy();
  }, LISTENER_LIMITS.headersTimeoutMs);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
}

/**
 * A request Node's parser refused (bad syntax, headers over the limit, too slow): a 400, 431 or
 * 408 with a lingering close. Both listeners use it; `instead` answers with another error (the TLS
 * listener's refused certificate).
 */
export function answerClientError(err: NodeJS.ErrnoException, socket: Duplex, instead?: ProxyError): void {
  const tooLarge = err.code === 'HPE_HEADER_OVERFLOW';
  const timeout = err.code === 'ERR_HTTP_REQUEST_TIMEOUT';
  if (isLingering(socket)) return;
  if (!socket.writable || (err.code === 'ECONNRESET')) {
    socket.destroy();
    return;
  }
  const status = instead?.status ?? (tooLarge ? 431 : timeout ? 408 : 400);
  // Bytes that do not parse, behind a request still being answered: that answer goes out first,
  // then this one (answered straight away, the caller would pair the 400 with the earlier request,
  // which may well have reached the upstream). Nothing after the bad bytes is processed.
  markClosing(socket);
  afterInFlight(socket, () => answerRawError(socket, status, instead?.code ?? 'bad_request', instead?.message ?? 'The request could not be parsed.'));
}

/**
 * A proxy error written on a raw socket (no response object: bytes that do not parse, an upgrade,
 * a CONNECT), then a lingering close; returns the request id it carried. A 407 names the scheme to
 * use; a 503 here is a refusal that passes (a drain, a connection cap), and a 429 (a caller's
 * tunnels all open) one too: both are retried after a second, unless `retryAfter` says when.
 */
export function answerRawError(socket: Duplex, status: number, code: string, message: string, retryAfter = 1): string {
  const id = randomUUID();
  const body = JSON.stringify({ error: { code, message, request_id: id } });
  const extra = status === 407 ? `proxy-authenticate: ${PROXY_CHALLENGE}\r\n` : status === 503 || status === 429 ? `retry-after: ${retryAfter}\r\n` : '';
  answerAndClose(socket, `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'Error'}\r\ncontent-type: application/json\r\n${ERROR_HEADER}: ${code}\r\nx-request-id: ${id}\r\n${extra}connection: close\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
  return id;
}

/**
 * `GET http://host/path` for a host a route intercepts: handled like a request inside a tunnel to
 * that host. The path is taken exactly as sent (no URL normalisation), so the target checks see
 * the raw bytes. Without Proxy-Authorization it is still a proxy request, answered 407 with the
 * challenge that clients such as Java's and .NET's wait for before they send credentials. Anything
 * else stays as it was (absolute-form is a 400): another host, two Proxy-Authorization headers,
 * or a reverse-mode caller's X-Egress-Token without Proxy-Authorization (ROUTE-13).
 */
function absoluteForm(req: IncomingMessage, config: CompiledConfig): RequestContext['forward'] {
  const match = /^http:\/\/([a-z0-9.-]+)(?::([1-9]\d{0,4}))?(\/[^\s]*)?$/i.exec(req.url ?? '');
  if (!match) return undefined;
  const token = proxyAuthorizationToken(req);
  if (token === AMBIGUOUS) return undefined;
  if (req.headers['proxy-authorization'] === undefined && req.headers[TOKEN_HEADER] !== undefined) return undefined;
  const host = match[1]!.toLowerCase();
  const port = Number(match[2] ?? 80);
  const route = findRouteByHost(config, host);
  if (!route || (port !== 80 && !route.connectPorts.has(port))) return undefined;
  return { host, port, token, rawTarget: match[3] ?? '/' };
}

/** Answer a protocol switch (WebSocket, h2c) with a 400 and close: upgrades are never proxied (HDR-07, DOS-07). */
export function refuseUpgrade(_req: IncomingMessage, socket: Duplex): void {
  refuseRaw(socket, new ProxyError('bad_request', 'Protocol upgrades are not proxied.'));
}

/** A CONNECT where no tunnels are made (the TLS listener, inside a tunnel): a 400 and close, not Node's bare close that also cut answers before it. */
export function refuseConnect(_req: IncomingMessage, socket: Duplex): void {
  refuseRaw(socket, new ProxyError('bad_request', 'CONNECT is only served on the plain listener (EGRESS_LISTEN).'));
}

/**
 * Node hands over the socket of an upgrade or CONNECT at once, also when it was pipelined behind a
 * request still being answered: the refusal waits for that answer (written now, it would come
 * first, and its close would cut the earlier request's answer, which may already have reached the
 * upstream).
 */
function refuseRaw(socket: Duplex, error: ProxyError): void {
  markClosing(socket);
  afterInFlight(socket, () => void answerRawError(socket, error.status, error.code, error.message));
}
