import type { ServerResponse } from 'node:http';
import type { ProxyError } from '../errors.ts';
import { ERRORS } from '../errors.ts';
import { hasBody } from './body.ts';
import { lingerOnClose, markClosing } from './connection-state.ts';

export const ERROR_HEADER = 'x-egress-error';

/** A proxy-made error: X-Egress-Error, X-Request-Id and a JSON body. Never a stack, never a secret. */
export function sendError(res: ServerResponse, requestId: string, error: ProxyError): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const message = error.detail ? `${ERRORS[error.code].message} ${error.detail}` : ERRORS[error.code].message;
  const body = JSON.stringify({ error: { code: error.code, message, request_id: requestId } });
  const headers: Record<string, string> = {
    ...error.headers,
    [ERROR_HEADER]: error.code,
    'x-request-id': requestId,
    'content-type': 'application/json',
    'content-length': String(Buffer.byteLength(body)),
    'cache-control': 'no-store',
  };
  if (closesForUnreadBody(res)) headers.connection = 'close';
  res.writeHead(error.status, headers);
  res.end(body);
}

/**
 * A body we did not read (refused early, or cut off at the limit) leaves the connection unusable:
 * true when the answer must close it. Whatever is pipelined behind the unread body is not a request
 * to process, and the rest of the body is not read (Node would read and drop it to the end, however
 * long it is declared, for a client that may not even have a token). Every listener's answers
 * (the caller listeners' errors, the admin listener's) close this way, after a lingering close: a
 * client still sending the body gets the answer rather than a reset (RFC 9112 §9.6), which its
 * HTTP client would report as a network error, and perhaps retry a request that was refused.
 */
export function closesForUnreadBody(res: ServerResponse): boolean {
  if (!res.req || res.req.complete || !hasBody(res.req)) return false;
  markClosing(res.req.socket);
  if (res.socket) lingerOnClose(res.socket, res.req);
  return true;
}
