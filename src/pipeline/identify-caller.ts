import { ProxyError, proxyAuthRequired } from '../errors.ts';
import type { RequestContext } from './context.ts';
import { countHeader } from './canonicalise-target.ts';
import type { PresentedToken } from '../store/callers.ts';

export const TOKEN_HEADER = 'x-egress-token';

/** Each connection's last presented token and its hash (see PresentedToken); the entry goes with the socket. */
const presented = new WeakMap<object, PresentedToken>();

function memoFor(socket: object | null | undefined): PresentedToken | undefined {
  if (!socket) return undefined;
  let memo = presented.get(socket);
  if (!memo) {
    memo = {};
    presented.set(socket, memo);
  }
  return memo;
}

/**
 * The caller is whoever holds a live token, or whose certificate the TLS listener accepted. Two
 * token headers, or a certificate and a token of different callers, are ambiguous and refused.
 */
export function identifyCaller(ctx: RequestContext): void {
  // In absolute form the proxy itself refuses, as a proxy does: 407 with its challenge. Inside a
  // tunnel the caller talks to the origin, and a 407 there means nothing to it.
  const absolute = ctx.forward?.rawTarget !== undefined;
  const refuse = (detail?: string) => (absolute ? proxyAuthRequired(detail) : new ProxyError('caller_unauthenticated', detail));
  if (countHeader(ctx.req.rawHeaders, TOKEN_HEADER) > 1) throw refuse('More than one caller token was sent.');
  // In a forward-mode tunnel the token came with CONNECT (Proxy-Authorization); it is checked again for every request.
  const token = ctx.forward ? ctx.forward.token : ctx.req.headers[TOKEN_HEADER];
  // A certificate that was presented but refused (another CA, CA:TRUE, revoked, bad SAN) refuses the request.
  if (ctx.certificate?.refused) throw new ProxyError('caller_unauthenticated', `Client certificate refused: ${ctx.certificate.refused}.`);
  if (ctx.certificate?.caller && (typeof token !== 'string' || token.length === 0)) {
    if (!ctx.services.store.usable()) throw new ProxyError('credential_unavailable', 'The credential store cannot be read.');
    // The certificate names the caller; the store says whether that caller exists, is not revoked
    // (`egress callers revoke` ends a caller's certificates too, on every instance, at its next
    // request) and was not added again since the certificate was issued.
    if (!ctx.services.store.callerActive(ctx.certificate.caller, ctx.certificate.notBefore)) throw new ProxyError('caller_unauthenticated', 'The certificate names a caller that is unknown or revoked.');
    ctx.caller = ctx.certificate.caller;
    ctx.viaCertificate = true;
    return;
  }
  if (typeof token !== 'string' || token.length === 0) {
    ctx.anonymous = !token && ctx.req.headers['proxy-authorization'] === undefined;
    throw refuse(absolute ? 'Send Proxy-Authorization: Basic caller:token.' : undefined);
  }
  const store = ctx.services.store;
  // Without a usable store there is no telling a good token from a bad one: that is our failure, not the caller's.
  if (!store.usable()) throw new ProxyError('credential_unavailable', 'The credential store cannot be read.');
  const found = store.identifyCaller(token, memoFor(ctx.req.socket));
  if (!found.caller) {
    if (found.retired) ctx.services.rules.onRetiredToken(found.retired, ctx.remote);
    throw refuse('The caller token is unknown, expired or revoked.');
  }
  // A certificate of one caller with the token of another: two identities, and no telling which
  // one the client meant to use. Neither wins (the token used to); the message names neither.
  if (ctx.certificate?.caller !== undefined && ctx.certificate.caller !== found.caller) throw new ProxyError('caller_unauthenticated', 'The client certificate and the caller token name different callers.');
  ctx.caller = found.caller;
  // A caller that presents its own certificate beside its token (one client setting for both
  // listeners) has proved itself with the certificate too: a route that requires one serves it.
  if (ctx.certificate?.caller === found.caller && store.callerActive(found.caller, ctx.certificate.notBefore)) ctx.viaCertificate = true;
}
