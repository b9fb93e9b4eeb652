import { constants } from 'node:crypto';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import { createServer } from './http.ts';
import { isIP, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import { domainToASCII } from 'node:url';
import type { CompiledConfig } from '../config/compile-routes.ts';
import type { Rate } from '../config/units.ts';
import { findRouteByHost } from '../config/compile-routes.ts';
import type { LeafMinter } from '../certs/ca.ts';
import { hasBody } from '../pipeline/body.ts';
import { afterInFlight, isOverCap } from '../pipeline/connection-state.ts';
import { handleRequest, recordOutcome } from '../pipeline/index.ts';
import { MemoryRateLimiter, type Bucket } from '../pipeline/rate-limiter.ts';
import type { Services } from '../pipeline/services.ts';
import { REDACTED } from '../secret.ts';
import { answerClientError, answerRawError, CALLER_HTTP, refuseConnect, servePipeline } from './reverse.ts';
import { AMBIGUOUS, proxyAuthorizationToken } from './proxy-auth.ts';
import { CALLER_TLS } from './tls.ts';

/**
 * Limits on tunnels: a TLS handshake must finish quickly, an idle tunnel closes, a caller holds few
 * at once. How fast a caller may open them is EGRESS_CALLER_CONNECT_RATE, with a burst of
 * `perCaller`: a pool may open every tunnel it may hold at once.
 */
export const TUNNEL_LIMITS = Object.freeze({ handshakeMs: 10_000, idleMs: 60_000, perCaller: 64 });

export interface ForwardOptions {
  /** Tunnels one caller may open (EGRESS_CALLER_CONNECT_RATE). */
  readonly connectRate: Rate;
}

interface Tunnel {
  readonly host: string;
  readonly port: number;
  readonly token: string;
}

/**
 * Forward mode: `CONNECT host:port` from a caller with Proxy-Authorization. For a host a route
 * names (and that route's port), the proxy answers 200, terminates TLS itself with a short-lived
 * leaf for that host from its own CA, and runs every request inside through the same pipeline as
 * reverse mode. Anything else gets an answer without a connection being opened: there are no blind
 * tunnels.
 */
export interface ForwardHandler {
  /** The reverse listener's 'connect' handler. */
  readonly onConnect: (req: IncomingMessage, socket: Duplex, head: Buffer) => void;
  /**
   * For a drain: close the tunnels' connections with no request in flight, or every one. Tunnels
   * are not the listener's connections any more, so its own closeIdleConnections does not see
   * them, and an idle keep-alive connection inside one held the drain until it timed out.
   */
  closeIdleConnections(): void;
  closeAllConnections(): void;
  /** For a drain: from now on a CONNECT is answered 503 (shutting_down), never given a tunnel the drain would cut. */
  refuseNew(): void;
}

export function createForwardHandler(getConfig: () => CompiledConfig, services: Services, minter: LeafMinter, options: ForwardOptions): ForwardHandler {
  const tunnels = new WeakMap<Socket, Tunnel>();
  const open = new Map<string, number>();
  /**
   * Each tunnel costs a TLS handshake with the minted leaf (a private-key operation), so a caller
   * that opens and closes tunnels in a loop, never holding more than the cap, spent the proxy's
   * CPU at will. Per instance, as the CPU is; one bucket per caller, kept as long as the caller's name.
   */
  const openings = new MemoryRateLimiter();
  const openingBuckets = new Map<string, Bucket>();
  const openingBucket = (caller: string): Bucket => {
    let bucket = openingBuckets.get(caller);
    if (!bucket) openingBuckets.set(caller, (bucket = { key: [caller], limit: { rate: options.connectRate, burst: TUNNEL_LIMITS.perCaller }, policy: 'caller' }));
    return bucket;
  };
  /** Each host's TLS context, for the leaf it was made with: the minter re-mints a leaf before it expires, and a new leaf gets a new context. */
  const contexts = new Map<string, { readonly leaf: string; readonly context: SecureContext }>();
  /** Hosts already logged as outside the CA's name constraints. */
  const uncovered = new Set<string>();
  const inner: Server = createServer(CALLER_HTTP, onRequest);
  function onRequest(req: IncomingMessage, res: ServerResponse): void {
    const tunnel = tunnels.get(req.socket);
    if (!tunnel) return void res.destroy();
    // The idle limit is for a tunnel with nothing in flight: a request waits for its upstream as
    // long as its route allows, as in reverse mode (the first request of a tunnel was cut at 60 s).
    // Node sets its keep-alive timeout on the socket once the answer is out.
    req.socket.setTimeout(0);
    void handleRequest(req, res, getConfig(), services, tunnel);
  }
  servePipeline(inner, onRequest);
  // Bytes that do not parse get the listeners' answer (X-Request-Id, X-Egress-Error, after any
  // answer still owed on the tunnel), not Node's bare 400 written ahead of that answer.
  inner.on('clientError', answerClientError);
  inner.on('connect', refuseConnect);
  // This server never listens: tunnels hand it their decrypted sockets. Node starts checking
  // headersTimeout and requestTimeout when a server emits 'listening', so without this a slow
  // request inside a tunnel (slowloris, a body at a byte every few seconds) was never cut off.
  inner.emit('listening');

  const contextFor = (host: string): SecureContext => {
    const leaf = minter.leaf(host);
    let known = contexts.get(host);
    if (known?.leaf !== leaf) {
      // No renegotiation (TLS 1.2): each one would be a full handshake the caller makes the proxy run.
      // OpenSSL refuses it here; disableRenegotiation() (the TLS listener's way) does nothing on a
      // TLSSocket no tls.Server owns, and neither does Node's limit of three per ten minutes.
      known = { leaf, context: createSecureContext({ cert: `${leaf}${minter.caPem}`, key: minter.keyPem, ...CALLER_TLS, secureOptions: constants.SSL_OP_NO_RENEGOTIATION }) };
      contexts.set(host, known);
    }
    return known.context;
  };

  let refusing = false;
  // A CONNECT pipelined behind a request still being answered: Node hands the socket over at once,
  // and an answer written now would go out before (or, as a tunnel, in the middle of) that
  // request's. It is handled once the requests before it are answered.
  const onConnect = (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    const startedAt = performance.now();
    afterInFlight(socket, () => (socket.destroyed ? undefined : connectNow(req, socket, head, startedAt)));
  };
  const connectNow = (req: IncomingMessage, socket: Duplex, head: Buffer, startedAt: number): void => {
    const raw = req.url ?? '';
    // The host as written (no percent-escapes: "api%2ebank.test" is not how a route names a host) and a plain port.
    const match = /^([^:[\]\s%]+|\[[0-9a-fA-F:.]+\]):([1-9]\d{0,4})$/.exec(raw);
    let caller: string | null = null;
    /** No Proxy-Authorization at all: a client waiting for the 407 challenge, not an unknown token. */
    let anonymous = false;
    // A refused CONNECT is audited, counted and seen by the alert rules (unknown tokens, denied
    // spikes) like a refused request. The target is recorded only as a host and port: an "@" in it
    // may follow a token.
    const deny = (status: number, code: string, message: string, route: string | null = null, retryAfter?: number): void => {
      const requestId = answerRawError(socket, status, code, message, retryAfter);
      const at = raw.lastIndexOf('@');
      const path = (at === -1 ? raw : `${REDACTED}@${raw.slice(at + 1)}`).slice(0, 256);
      recordOutcome(services, { requestId, caller, remote: req.socket?.remoteAddress ?? 'unknown', route, method: 'CONNECT', path, decision: 'deny', reason: code, status, upstreamStatus: null, durationMs: Math.round((performance.now() - startedAt) * 1000) / 1000, credential: null, credentialVersion: null, anonymous });
    };
    if (refusing) return deny(503, 'shutting_down', 'The proxy is shutting down; connect to another instance.');
    if (isOverCap(socket)) return deny(503, 'too_many_connections', 'The proxy has as many caller connections open as it serves (EGRESS_MAX_CONNECTIONS); retry when one has closed.');
    // A CONNECT has no content (RFC 9110 §9.3.6): bytes after its header are the tunnel's, and
    // declared content would be read as the start of the TLS handshake. Refused, and closed.
    if (hasBody(req)) return deny(400, 'bad_request', 'A CONNECT request cannot carry content.');
    if (!match) return deny(400, 'bad_request', 'CONNECT needs host:port.');
    const rawHost = match[1]!;
    const port = Number(match[2]);
    if (isIP(rawHost.replace(/^\[|\]$/g, '')) !== 0) return deny(403, 'route_forbidden', 'Tunnels to IP addresses are not allowed; use the host name a route names.');
    // Exact match after IDNA to ASCII and lower-casing; a trailing dot is not the same host (SSRF-09).
    const host = domainToASCII(rawHost).toLowerCase();
    // Two Proxy-Authorization headers are ambiguous, as two tokens are in reverse mode.
    const token = proxyAuthorizationToken(req);
    if (token === AMBIGUOUS) return deny(407, 'caller_unauthenticated', 'More than one Proxy-Authorization header was sent.');
    if (!token) {
      anonymous = req.headers['proxy-authorization'] === undefined;
      return deny(407, 'caller_unauthenticated', 'Send Proxy-Authorization: Basic caller:token.');
    }
    // Without a usable store there is no telling a good token from a bad one: our failure (503, as
    // in reverse mode), not the caller's, and not an unknown-token attempt for the alert rules.
    if (!services.store.usable()) return deny(503, 'credential_unavailable', 'The credential store cannot be read.');
    const found = services.store.identifyCaller(token);
    if (!found.caller) return deny(407, 'caller_unauthenticated', 'The caller token is unknown, expired or revoked.');
    const name = found.caller;
    caller = name;
    const route = host ? findRouteByHost(getConfig(), host) : undefined;
    if (!route || !route.connectPorts.has(port)) return deny(403, 'route_forbidden', 'No route intercepts this host and port.', route?.name ?? null);
    if (!minter.covers(host)) {
      // Every client would refuse the leaf; say why here, and once in the log for whoever runs the proxy.
      if (!uncovered.has(host)) {
        uncovered.add(host);
        services.log.warn({ host, route: route.name }, 'a route names a host the forward-mode CA does not cover (its name constraints predate it): CONNECTs to it are refused until "egress certs init --refresh" and a restart');
      }
      return deny(403, 'route_forbidden', 'The forward-mode CA does not cover this host; the proxy\'s operators must run "egress certs init --refresh" and restart it.', route.name);
    }
    const count = open.get(name) ?? 0;
    if (count >= TUNNEL_LIMITS.perCaller) return deny(429, 'rate_limited', 'Too many open tunnels for this caller.', route.name);
    const opening = openings.check('connect', [openingBucket(name)]);
    if (!opening.allowed) {
      const retryAfter = Math.max(1, Math.ceil(opening.retryAfterMs / 1000));
      return deny(429, 'rate_limited', 'This caller opens tunnels faster than EGRESS_CALLER_CONNECT_RATE allows; keep tunnels open and reuse them.', route.name, retryAfter);
    }
    open.set(name, count + 1);
    const release = () => {
      const n = (open.get(name) ?? 1) - 1;
      if (n <= 0) open.delete(name);
      else open.set(name, n);
    };

    socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
    if (head.length > 0) socket.unshift(head);
    const tls = new TLSSocket(socket as Socket, {
      isServer: true,
      secureContext: contextFor(host),
      ALPNProtocols: ['http/1.1'],
      // The SNI must name the CONNECT host (MITM-01); the callback never throws (CVE-2026-21637).
      SNICallback: (servername, cb) => (servername.toLowerCase() === host ? cb(null, contextFor(host)) : cb(new Error('SNI does not match the CONNECT host'))),
    });
    const handshake = setTimeout(() => tls.destroy(), TUNNEL_LIMITS.handshakeMs);
    tls.once('secure', () => clearTimeout(handshake));
    tls.setTimeout(TUNNEL_LIMITS.idleMs, () => tls.destroy());
    tls.on('error', () => tls.destroy());
    tls.once('close', () => {
      clearTimeout(handshake);
      release();
      socket.destroy();
    });
    tunnels.set(tls, { host, port, token });
    inner.emit('connection', tls);
  };
  return {
    onConnect,
    closeIdleConnections: () => inner.closeIdleConnections(),
    closeAllConnections: () => inner.closeAllConnections(),
    refuseNew: () => {
      refusing = true;
    },
  };
}
