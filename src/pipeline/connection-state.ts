/**
 * What the proxy knows about a caller's connection across the requests pipelined on it: how many
 * of them are still being answered, and whether it is closing (RFC 9112 §9.6: after a response
 * that closes the connection, or a request that asked to, no later request on it is processed).
 * Kept on the socket itself, one small object per connection: the request path touches it twice
 * per request, and a WeakMap per fact cost more there.
 */
interface ConnectionState {
  inFlight: number;
  /** Answers that wait behind an earlier one still being sent (the caller pipelines and does not read). */
  queued: number;
  closing: boolean;
  /** The last request that started, while any is in flight: is the body it is still reading where bad bytes came from? */
  latest: { readonly complete: boolean } | undefined;
  /** Run when the last request in flight is answered. */
  whenIdle: (() => void) | undefined;
}

const STATE = Symbol('egress.connection');

type Carrier = { [STATE]?: ConnectionState };

// A request's socket is null once the connection is gone: there is nothing to note then.
function stateOf(socket: object): ConnectionState {
  const carrier = socket as Carrier;
  return (carrier[STATE] ??= { inFlight: 0, queued: 0, closing: false, latest: undefined, whenIdle: undefined });
}

export function markClosing(socket: object | null): void {
  if (socket) stateOf(socket).closing = true;
}

export function isClosing(socket: object | null): boolean {
  return socket !== null && (socket as Carrier)[STATE]?.closing === true;
}

/**
 * Answers one connection may have waiting behind an answer still being sent. Node's server parses
 * every request in what it has read (64 KiB: about 1,900 minimal requests) before it stops reading
 * from a caller that does not take its answers, and each of them would be answered and held: about
 * 1 MB a connection. Past this many, the caller is not reading: the connection is closed.
 */
export const MAX_QUEUED_ANSWERS = 64;

interface Answer {
  once(event: 'close', listener: () => void): unknown;
}

/**
 * Note a request's start. False when the connection is closed instead: the request's answer
 * would wait behind MAX_QUEUED_ANSWERS others the caller has not taken.
 */
export function requestStarted(socket: object | null, req: { readonly complete: boolean }, res: Answer): boolean {
  if (!socket) return true;
  const state = stateOf(socket);
  state.inFlight++;
  state.latest = req;
  // Node gives the socket to one answer at a time (`_httpMessage`); a later one waits in its queue.
  // Only then is the answer watched: a connection that is read as it is answered costs nothing here.
  const current = (socket as { _httpMessage?: unknown })._httpMessage;
  if (current === undefined || current === null || current === res) return true;
  if (state.queued >= MAX_QUEUED_ANSWERS) {
    state.closing = true;
    (socket as { destroy(): void }).destroy();
    return false;
  }
  state.queued++;
  res.once('close', () => state.queued--);
  return true;
}

export function requestAnswered(socket: object | null): void {
  const state = socket ? (socket as Carrier)[STATE] : undefined;
  if (!state || state.inFlight === 0) return;
  if (--state.inFlight > 0) return;
  // Nothing in flight: the last request is not held past its answer.
  state.latest = undefined;
  const next = state.whenIdle;
  if (next) {
    state.whenIdle = undefined;
    next();
  }
}

/**
 * For bytes on the connection that do not parse: `fn` after the requests being answered are, when
 * the bytes are a later request's; now when nothing is in flight, or when they are the body of the
 * last request (that request is the one refused).
 */
export function afterInFlight(socket: object, fn: () => void): void {
  const state = stateOf(socket);
  if (state.inFlight === 0 || state.latest?.complete === false) fn();
  else state.whenIdle = fn;
}
