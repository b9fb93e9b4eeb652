/**
 * What the proxy knows about a caller's connection across the requests pipelined on it: how many
 * of them are still being answered, and whether it is closing (RFC 9112 §9.6: after a response
 * that closes the connection, or a request that asked to, no later request on it is processed).
 */
const inFlight = new WeakMap<object, number>();
/** The last request that started on the connection. */
const latest = new WeakMap<object, { readonly complete: boolean }>();
const closing = new WeakSet<object>();
/** Run when the connection's last request in flight is answered. */
const whenIdle = new WeakMap<object, () => void>();

// A request's socket is null once the connection is gone: there is nothing to note then.

export function markClosing(socket: object | null): void {
  if (socket) closing.add(socket);
}

export function isClosing(socket: object | null): boolean {
  return socket !== null && closing.has(socket);
}

export function requestStarted(socket: object | null, req: { readonly complete: boolean }): void {
  if (!socket) return;
  inFlight.set(socket, (inFlight.get(socket) ?? 0) + 1);
  latest.set(socket, req);
}

export function requestAnswered(socket: object | null): void {
  if (!socket) return;
  const left = (inFlight.get(socket) ?? 1) - 1;
  if (left > 0) {
    inFlight.set(socket, left);
    return;
  }
  inFlight.delete(socket);
  const next = whenIdle.get(socket);
  if (next) {
    whenIdle.delete(socket);
    next();
  }
}

/**
 * For bytes on the connection that do not parse: `fn` after the requests being answered are, when
 * the bytes are a later request's; now when nothing is in flight, or when they are the body of the
 * last request (that request is the one refused).
 */
export function afterInFlight(socket: object, fn: () => void): void {
  if ((inFlight.get(socket) ?? 0) === 0 || latest.get(socket)?.complete === false) fn();
  else whenIdle.set(socket, fn);
}
