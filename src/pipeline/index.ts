import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { CompiledConfig } from '../config/compile-routes.ts';
import { ProxyError, errorCode, upstreamFailure } from '../errors.ts';
import { loggableHeaders } from '../observe/log.ts';
import { REDACTED } from '../secret.ts';
import { statusClass } from '../observe/metrics.ts';
import { authorize } from './authorize.ts';
import { canonicaliseTarget } from './canonicalise-target.ts';
import { ANSWER_STALL_MS, answerTaken, closeForDrain, isClosing, isOverCap, markClosing, requestAnswered, requestStarted, wasStalled } from './connection-state.ts';
import type { RequestContext, Step } from './context.ts';
import { forward } from './forward.ts';
import { identifyCaller } from './identify-caller.ts';
import { inject } from './inject.ts';
import { matchRoute } from './match-route.ts';
import { rateLimit } from './rate-limit.ts';
import { resolveCredential } from './resolve-credential.ts';
import { sendError } from './send-error.ts';
import type { Services } from './services.ts';

/** The life of a request, in order. Each step reads and writes the context, or throws to stop. */
export const STEPS: readonly Step[] = [
  canonicaliseTarget,
  identifyCaller,
  matchRoute,
  authorize,
  rateLimit,
  resolveCredential,
  inject,
  forward,
];

export async function handleRequest(req: IncomingMessage, res: ServerResponse, config: CompiledConfig, services: Services, forward?: RequestContext['forward'], certificate?: RequestContext['certificate']): Promise<void> {
  const socket = req.socket;
  const { drain } = services;
  drain.handling++;
  // A request pipelined behind one whose answer closes the connection is not processed (RFC 9112
  // §9.6): it is audited as aborted, nothing is sent upstream, and Node closes the connection once
  // that answer is out.
  const closing = isClosing(socket);
  if (!res.shouldKeepAlive) markClosing(socket);
  // A caller that pipelines without reading its answers loses the connection (see MAX_QUEUED_ANSWERS).
  const overflow = !requestStarted(socket, req, res);
  // One literal with every field, no spreads: every request's context has the same shape.
  const ctx: RequestContext = {
    forward,
    certificate,
    id: randomUUID(),
    req,
    res,
    config,
    services,
    startedAt: performance.now(),
    remote: req.socket?.remoteAddress ?? 'unknown',
    redactions: [],
    decision: 'allow',
    reason: 'forwarded',
    // Set by the steps; declared here so the object never changes shape on the way.
    viaCertificate: undefined,
    target: undefined,
    caller: undefined,
    anonymous: undefined,
    route: undefined,
    relativeSegments: undefined,
    rule: undefined,
    credential: undefined,
    previous: undefined,
    replayable: undefined,
    body: undefined,
    fellBack: undefined,
    outbound: undefined,
    upstreamStatus: undefined,
    upstreamMs: undefined,
    holdsSlot: false,
  };
  try {
    if (isOverCap(socket)) {
      // Its connection was taken past the cap to say so: one answer, then the close.
      res.shouldKeepAlive = false;
      markClosing(socket);
      throw new ProxyError('too_many_connections', undefined, { headers: { 'retry-after': '1' } });
    }
    if (closing || overflow) {
      ctx.decision = 'aborted';
      ctx.reason = overflow ? 'pipeline_overflow' : 'connection_closing';
      return;
    }
    for (const step of STEPS) {
      const pending = step(ctx);
      if (pending) await pending;
    }
  } catch (err) {
    if (callerGone(ctx)) {
      ctx.decision = 'aborted';
      ctx.reason = 'caller_closed';
      return;
    }
    const error = toProxyError(err, ctx);
    ctx.decision = error.status >= 500 ? 'error' : 'deny';
    ctx.reason = error.code;
    if (drain.draining) closeForDrain(res);
    sendError(res, ctx.id, error);
  } finally {
    // An answer the caller's socket did not take at once keeps its request in flight (the caller's
    // slot, the audit line) until the caller reads it, or loses the connection for not reading it
    // within the route's response timeout. One check per request; a timer only when it waits.
    if (res.writableEnded && res.writableLength > 0 && !res.destroyed && socket) await answerTaken(socket, res, ctx.route?.responseTimeoutMs ?? ANSWER_STALL_MS);
    try {
      finish(ctx);
    } catch (err) {
      // Bookkeeping must never take the process down with it; say what failed, without the object.
      services.log.error({ request_id: ctx.id, code: errorCode(err) ?? (err as Error)?.name ?? 'unknown' }, 'failed to record a finished request');
    }
    requestAnswered(socket);
    drain.ended();
  }
}

/** The caller closed its connection before the response was complete: no error to send, nobody to send it to. */
function callerGone(ctx: RequestContext): boolean {
  return ctx.res.destroyed && !ctx.res.writableFinished;
}

function toProxyError(err: unknown, ctx: RequestContext): ProxyError {
  if (err instanceof ProxyError) return err;
  // A token endpoint (or upstream) on an address the route may not reach: refused, not a bug.
  if (errorCode(err) === 'EGRESS_PRIVATE_ADDRESS') return upstreamFailure(err);
  // A bug, not an upstream failure: log its code and where, never the object (it may hold options).
  ctx.services.log.error({ request_id: ctx.id, code: errorCode(err) ?? (err as Error)?.name ?? 'unknown' }, 'unexpected error in the request path');
  return new ProxyError('internal_error');
}

/** Written for every request, allowed, denied or failed: the audit line, then the metrics. */
function finish(ctx: RequestContext): void {
  if (ctx.holdsSlot) {
    ctx.holdsSlot = false;
    ctx.services.slots.release(ctx.caller!);
  }
  const total = performance.now() - ctx.startedAt;
  if (ctx.decision === 'allow' && callerGone(ctx)) {
    ctx.decision = 'aborted';
    // Hung up, or cut off for leaving its answer unread (watchStall).
    ctx.reason = wasStalled(ctx.req.socket) ? 'caller_stalled' : 'caller_closed';
  }
  const status = ctx.res.headersSent ? ctx.res.statusCode : 0;
  const route = ctx.route?.name ?? 'none';
  const { metrics, log } = ctx.services;
  if (log.isLevelEnabled('debug')) {
    // Headers only through the allowlist: tokens and credentials never reach the log.
    log.debug({ request_id: ctx.id, caller: ctx.caller, route: ctx.route?.name, method: ctx.req.method, status, decision: ctx.decision, reason: ctx.reason, headers: loggableHeaders(ctx.req.headers) }, 'request');
  }
  if (ctx.fellBack && ctx.decision === 'allow') ctx.reason = 'fallback_previous_version';
  if (ctx.credential && ctx.upstreamStatus !== undefined) {
    ctx.services.usage.note(ctx.credential.id, ctx.credential.version, ctx.caller!);
    // An access token minted with another version (the previous one, after a fallback at the token
    // endpoint) is that version in use for as long as the token lives: `keys show` must not show it
    // idle while every request rides on it.
    for (const fetched of ctx.fetched ?? []) if (fetched.mintedBy !== ctx.credential.version) ctx.services.usage.note(ctx.credential.id, fetched.mintedBy, ctx.caller!);
  }
  recordOutcome(ctx.services, {
    requestId: ctx.id,
    caller: ctx.caller ?? null,
    remote: ctx.remote,
    route: ctx.route?.name ?? null,
    method: ctx.req.method ?? '',
    path: ctx.target?.path ?? auditablePath(ctx.req.url),
    decision: ctx.decision,
    reason: ctx.reason,
    status,
    upstreamStatus: ctx.upstreamStatus ?? null,
    durationMs: Math.round(total * 1000) / 1000,
    credential: ctx.credential?.id ?? null,
    credentialVersion: ctx.credential?.version ?? null,
    anonymous: ctx.anonymous,
  });
  if (ctx.upstreamMs !== undefined) {
    metrics.upstream.observe({ route }, ctx.upstreamMs / 1000);
    metrics.proxyAdded.observe({ route }, Math.max(0, total - ctx.upstreamMs) / 1000);
  } else {
    metrics.proxyAdded.observe({ route }, total / 1000);
  }
}

/** What a finished request records, whether it went through the steps or was a CONNECT refused at the door. */
export interface Outcome {
  readonly requestId: string;
  readonly caller: string | null;
  readonly remote: string;
  readonly route: string | null;
  readonly method: string;
  readonly path: string;
  readonly decision: RequestContext['decision'];
  readonly reason: string;
  /** The status answered (0 when nothing was). */
  readonly status: number;
  readonly upstreamStatus: number | null;
  readonly durationMs: number;
  readonly credential: string | null;
  readonly credentialVersion: number | null;
  /** Refused for presenting no credentials at all (see RequestFacts.anonymous). */
  readonly anonymous?: boolean;
}

/** The alert rules, the audit line and the request metrics for one outcome. */
export function recordOutcome(services: Services, o: Outcome): void {
  const route = o.route ?? 'none';
  services.rules.onRequest({ caller: o.caller, remote: o.remote, route: o.route, decision: o.decision, reason: o.reason, credential: o.credential, anonymous: o.anonymous });
  services.audit.request({
    requestId: o.requestId,
    caller: o.caller,
    route: o.route,
    method: o.method,
    path: o.path,
    decision: o.decision,
    reason: o.reason,
    upstreamStatus: o.upstreamStatus,
    durationMs: o.durationMs,
    credential: o.credential,
    credentialVersion: o.credentialVersion,
  });
  if (o.reason === 'rate_limited') services.metrics.rateLimited.inc({ route });
  services.activity.record(o.decision === 'deny');
  services.metrics.requests.inc({ route, caller: o.caller ?? 'unknown', decision: o.decision, status_class: statusClass(o.status) });
}

/**
 * For a target that failed to parse: the path part only (never the query), bounded. An absolute-
 * form or scheme-relative target may carry credentials as userinfo (`http://caller:token@host/`):
 * everything up to its last "@" is replaced, since an unencoded "/" in a password moves where the
 * authority seems to end.
 */
function auditablePath(url: string | undefined): string {
  let path = (url ?? '').split('?', 1)[0]!;
  const authority = /^(?:[A-Za-z][A-Za-z0-9+.-]*:)?\/\//.exec(path);
  if (authority && path.includes('@', authority[0].length)) path = `${authority[0]}${REDACTED}@${path.slice(path.lastIndexOf('@') + 1)}`;
  return path.length > 256 ? `${path.slice(0, 256)}…` : path;
}
