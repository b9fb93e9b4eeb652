import { randomUUID } from 'node:crypto';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import { createServer } from './http.ts';
import type { Metrics } from '../observe/metrics.ts';
import { adminName, EXPECTATION_FAILED, handleAdminApi, refusedAdminToken, type AdminApiDeps } from './admin-api.ts';
import { handleStatusPage, type StatusPageDeps } from './status-page.ts';
import { tokenFromAuthorization } from './proxy-auth.ts';
import { answerClientError, closeIfSilent, LISTENER_LIMITS, refuseConnect } from './reverse.ts';
import { ANSWER_STALL_MS, answerTaken, isClosing, isOverCap, markClosing, requestAnswered, requestStarted } from '../pipeline/connection-state.ts';
import { ConnectionCap } from './connection-cap.ts';
import { unmetExpectation } from '../pipeline/body.ts';
import { closesForUnreadBody } from '../pipeline/send-error.ts';

export interface ReadinessSource {
  readiness(): { ready: boolean; detail: Record<string, unknown> };
}

/**
 * Connections the admin listener serves at once. Its port is open before any token, and every
 * connection is a file descriptor of the whole process, which the proxy listeners and their
 * upstream connections need too; monitoring, the status page and rotation scripts use a handful.
 */
export const ADMIN_LIMITS = Object.freeze({ maxConnections: 64 });

/** The admin listener: liveness, readiness with its reasons, Prometheus metrics, and the admin API under /v1/. */
export function createAdminServer(readiness: ReadinessSource, metrics: Metrics, api: AdminApiDeps, status: StatusPageDeps): Server {
  // The proxy listener's limits: this port is open to anyone who reaches it, before any token. Node
  // checks the timeouts only every connectionsCheckingInterval (30 s by default), which let a
  // dribbled header hold a connection for up to 40 s instead of 10.
  const server = createServer({
    headersTimeout: LISTENER_LIMITS.headersTimeoutMs,
    requestTimeout: 30_000,
    keepAliveTimeout: LISTENER_LIMITS.keepAliveTimeoutMs,
    maxHeaderSize: LISTENER_LIMITS.maxHeaderSize,
    insecureHTTPParser: false,
    connectionsCheckingInterval: 500,
  }, onRequest);
  // Connections past ADMIN_LIMITS.maxConnections are still taken, so that their clients are told
  // why: each request on one is answered 503 and the connection closed. Past twice as many, Node
  // closes a new connection as it accepts it, unanswered: refused connections that send nothing
  // cannot hold descriptors without bound either. The proxy listeners' cap, with its own count.
  new ConnectionCap(ADMIN_LIMITS.maxConnections, () => {}).attach(server, 'admin', 'connection');
  function onRequest(req: IncomingMessage, res: ServerResponse): void {
    const socket = req.socket;
    // As on the proxy listeners, a request pipelined behind one whose answer closes the connection
    // is not processed (RFC 9112 §9.6): Node still hands it over, and a change it asked for would be
    // made with its answer never sent.
    const closing = isClosing(socket);
    // An Expect it cannot meet is refused (below) with the body it declares unread: the connection
    // closes after that answer.
    if (unmetExpectation(req)) res.shouldKeepAlive = false;
    if (!res.shouldKeepAlive) markClosing(socket);
    // A client that pipelines requests and does not read the answers has every one of them rendered
    // and held (Node parses 64 KiB of requests before it stops reading: some 1,900 GET /metrics, each
    // a registry walk and 10 kB): as on the proxy listener, past MAX_QUEUED_ANSWERS it is cut.
    if (!requestStarted(socket, req, res)) return;
    if (closing) {
      requestAnswered(socket);
      return;
    }
    // No answer here is meant to be read as anything but its declared type (JSON echoing a path, say).
    res.setHeader('x-content-type-options', 'nosniff');
    // Every answer carries its id, as on the proxy listeners (SPEC); the audit line written for the
    // request, and an error's body, name the same one.
    const id = randomUUID();
    res.setHeader('x-request-id', id);
    const answer = isOverCap(socket) ? refuseConnection(res, id) : route(req, res, id, readiness, metrics, api, status);
    // A refusal answered before the body it did not invite (Expect: 100-continue) closes the
    // connection: whatever follows that body is not a request to process either.
    if (!res.shouldKeepAlive) markClosing(socket);
    void answer.catch(() => {
      if (!res.headersSent) error(res, id, 500, 'internal_error', 'The admin request failed.');
      else res.destroy();
    }).then(async () => {
      // As on the proxy listeners: an answer left unread (a client that pipelines /metrics and
      // never reads holds every answer) costs the connection after ANSWER_STALL_MS, and counts as
      // waiting until then.
      if (res.writableEnded && res.writableLength > 0 && !res.destroyed) await answerTaken(socket, res, ANSWER_STALL_MS);
    }).finally(() => requestAnswered(socket));
  }
  // Expect: 100-continue is answered by the admin API once the token, the route, the method and the
  // declared body have passed (continueBody), not by Node at once: a refused client is never invited
  // to send its body, which may carry a credential's secret values.
  server.on('checkContinue', onRequest);
  // Any other Expect is refused here (417 with the admin listener's JSON error, audited on the API),
  // not by Node's bare 417, which kept the connection for whatever followed the unread body.
  server.on('checkExpectation', onRequest);
  server.maxHeadersCount = LISTENER_LIMITS.maxHeadersCount;
  server.on('clientError', answerClientError);
  // No tunnels here: a 400 once the answers before it are out (Node's own close cut those too).
  server.on('connect', refuseConnect);
  // A connection that sends nothing at all is closed as on the proxy listeners; between requests
  // keepAliveTimeout does the same, and a request in progress (a status page that waits on a slow
  // store) is not cut.
  server.on('connection', closeIfSilent);
  return server;
}

/** The paths outside /v1/, each served to GET and HEAD only. */
const READ_ONLY_PATHS = new Set(['/', '/healthz', '/readyz', '/metrics']);
const READ_ONLY_METHODS = 'GET, HEAD';

async function route(req: IncomingMessage, res: ServerResponse, id: string, readiness: ReadinessSource, metrics: Metrics, api: AdminApiDeps, status: StatusPageDeps): Promise<void> {
  const path = (req.url ?? '').split('?', 1)[0] ?? '';
  if (path.startsWith('/v1/')) return handleAdminApi(req, res, path, id, api);
  if (unmetExpectation(req)) {
    if (path === '/') api.audit.admin({ requestId: id, actor: 'admin:unknown', action: `${req.method} /`, target: 'status-page', decision: 'deny', reason: 'expectation_failed' });
    return error(res, id, 417, EXPECTATION_FAILED.error.code, EXPECTATION_FAILED.error.message);
  }
  // A path that names nothing is a 404 whatever the method: a 405 says the resource exists.
  if (!READ_ONLY_PATHS.has(path)) return error(res, id, 404, 'not_found', 'No such admin endpoint.');
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    // RFC 9110 §15.5.6: a 405 lists the methods the resource does serve.
    res.setHeader('allow', READ_ONLY_METHODS);
    return error(res, id, 405, 'method_not_allowed', `Only ${READ_ONLY_METHODS} are served here.`);
  }
  if (path === '/') {
    // As for the API: a token that cannot be checked is not a wrong one (and no login prompt follows).
    if (tokenFromAuthorization(req.headers.authorization) && !api.store.usable()) return error(res, id, 503, 'store_unavailable', 'The store cannot be read, so the admin token cannot be checked; /readyz says why.');
    const name = adminName(req, api.store, 'bearer-or-basic');
    if (!name) {
      // Audited like a refused API request: guesses at the page's password show in the audit log too.
      api.audit.admin({ requestId: id, actor: 'admin:unknown', action: `${req.method} /`, target: 'status-page', decision: 'deny', reason: 'admin_unauthenticated' });
      refusedAdminToken(req, tokenFromAuthorization(req.headers.authorization), api);
      res.setHeader('www-authenticate', 'Basic realm="egress-proxy admin", charset="UTF-8"');
      return error(res, id, 401, 'admin_unauthenticated', 'The status page needs an admin token (Bearer, or Basic with the token as password).');
    }
    // Nothing outside /v1/ reads a body: one sent anyway closes the connection, as an error's does.
    if (closesForUnreadBody(res)) res.setHeader('connection', 'close');
    await handleStatusPage(req, res, status);
    api.audit.admin({ requestId: id, actor: `admin:${name}`, action: `${req.method} /`, target: 'status-page', decision: 'allow', reason: 'read' });
    return;
  }
  if (path === '/healthz') return json(res, 200, { status: 'ok' });
  if (path === '/readyz') {
    const { ready, detail } = readiness.readiness();
    return json(res, ready ? 200 : 503, { status: ready ? 'ready' : 'not ready', ...detail });
  }
  // /metrics
  const text = await metrics.text();
  res.writeHead(200, { 'content-type': metrics.registry.contentType, 'content-length': Buffer.byteLength(text), ...(closesForUnreadBody(res) ? { connection: 'close' } : {}) });
  res.end(text);
}

/** A request on a connection past ADMIN_LIMITS.maxConnections: 503, and the connection closed. */
async function refuseConnection(res: ServerResponse, id: string): Promise<void> {
  res.shouldKeepAlive = false;
  res.setHeader('retry-after', '1');
  error(res, id, 503, 'too_many_connections', `The admin listener serves at most ${ADMIN_LIMITS.maxConnections} connections at once; retry when one has closed.`);
}

/** An error of the admin listener: the JSON body the proxy's errors have, with the answer's request id. */
function error(res: ServerResponse, id: string, status: number, code: string, message: string): void {
  json(res, status, { error: { code, message, request_id: id } });
}

function json(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store', ...(closesForUnreadBody(res) ? { connection: 'close' } : {}) });
  res.end(text);
}
