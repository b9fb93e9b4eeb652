import type { Duplex } from 'node:stream';

/**
 * What the proxy knows about a caller's connection across the requests pipelined on it: how many
 * of them are still being answered, whether it is closing (RFC 9112 §9.6: after a response
 * that closes the connection, or a request that asked to, no later request on it is processed),
 * and whether the caller is taking what is written to it (watchStall).
 * Kept on the socket itself, one small object per connection: the request path touches it twice
 * per request, and a WeakMap per fact cost more there.
 */
interface ConnectionState {
  inFlight: number;
  /** Answers that wait behind an earlier one still being sent (the caller pipelines and does not read). */
  queued: Set<Answer> | undefined;
  closing: boolean;
  /** The last request that started, while any is in flight: is the body it is still reading where bad bytes came from? */
  latest: { readonly complete: boolean } | undefined;
  /** Run when the last request in flight is answered. */
  whenIdle: (() => void) | undefined;
  /** While bytes written to the caller wait for it to take them (see watchStall). */
  stall: Stall | undefined;
  /** The connection was cut because the caller did not take what was written to it. */
  stalled: boolean;
  /** Taken past the proxy listeners' connection cap: its requests are refused (see ConnectionCap). */
  overCap: boolean;
}

const STATE = Symbol('egress.connection');

type Carrier = { [STATE]?: ConnectionState };

// A request's socket is null once the connection is gone: there is nothing to note then.
function stateOf(socket: object): ConnectionState {
  const carrier = socket as Carrier;
  return (carrier[STATE] ??= { inFlight: 0, queued: undefined, closing: false, latest: undefined, whenIdle: undefined, stall: undefined, stalled: false, overCap: false });
}

export function markClosing(socket: object | null): void {
  if (socket) stateOf(socket).closing = true;
}

export function markOverCap(socket: object): void {
  stateOf(socket).overCap = true;
}

export function isOverCap(socket: object | null): boolean {
  return socket !== null && (socket as Carrier)[STATE]?.overCap === true;
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
  destroy(): unknown;
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
  const queued = (state.queued ??= new Set());
  if (queued.size >= MAX_QUEUED_ANSWERS) {
    state.closing = true;
    (socket as { destroy(): void }).destroy();
    return false;
  }
  queued.add(res);
  res.once('close', () => queued.delete(res));
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
export function afterInFlight(socket: Duplex, fn: () => void): void {
  const state = stateOf(socket);
  if (state.inFlight === 0 || state.latest?.complete === false) return fn();
  state.whenIdle = fn;
  // A CONNECT or an upgrade: Node has handed the socket over, and no longer watches it for the
  // requests before it, which its listeners below stand in for until `fn` runs. Without them, an
  // error (a caller that reset the connection) had no listener and took the process down; the
  // answers queued behind the one being sent were never closed with the connection, and their
  // requests waited for good, unrecorded, holding their callers' slots; and the answer being
  // sent never heard that a full socket had drained, so a relay paused for it stayed paused (the
  // stall watch, seeing nothing left in the socket, took the wait for the proxy's own). Bytes
  // that do not parse leave Node watching: these then do again what Node does, to no harm.
  socket.on('error', () => socket.destroy());
  socket.on('drain', () => {
    const current = (socket as { _httpMessage?: { readonly writableNeedDrain: boolean; readonly writableLength: number; emit(event: 'drain'): unknown } | null })._httpMessage;
    if (current?.writableNeedDrain && current.writableLength === 0) current.emit('drain');
  });
  socket.once('close', () => {
    for (const res of state.queued ?? []) res.destroy();
  });
}

/**
 * How long a caller may leave an answer that is not tied to a route unread (refused before a route
 * was known, or from the admin listener): 30 s, the default route response timeout (DEFAULTS in
 * compile-routes.ts, not imported: the route compiler's imports lead back here).
 */
export const ANSWER_STALL_MS = 30_000;

interface Stall {
  readonly timer: NodeJS.Timeout;
  readonly ms: number;
  /** What the caller had taken at the last check, and since when that has not moved. */
  taken: number;
  since: number;
  /** Answers written whole that wait to be taken (answerTaken). */
  waiting: number;
}

/** The caller's socket, as far as the watch needs it. */
interface CallerSocket {
  readonly writableLength: number;
  readonly bytesWritten: number | undefined;
  readonly destroyed: boolean;
  destroy(): void;
}

/**
 * Bound how long the caller may leave bytes written to it unread. A caller that never reads, with
 * its kernel buffers full, would otherwise hold the connection and every byte waiting on it for
 * good: a streamed body (undici's bodyTimeout does not run while the upstream is paused for the
 * caller), an error body read whole to be redacted (up to 1 MiB), answers pipelined behind it.
 *
 * Called only when a write did not go out at once (write() returned false, or an answer was ended
 * and its bytes are still waiting), so an answer the kernel takes at once costs no timer. One watch
 * per connection: a check every quarter of `ms` while anything waits. When the caller has taken
 * none of it for `ms` (no write to its socket completed), the connection is destroyed: the answers
 * on it close, their requests are audited as aborted/caller_stalled, and what they held is let go.
 */
export function watchStall(socket: object, ms: number): void {
  const state = stateOf(socket);
  if (state.stall) return;
  const caller = socket as CallerSocket;
  const timer = setTimeout(checkStall, Math.max(ms / 4, 10), caller, state);
  // The connection keeps the process alive, not its watch.
  timer.unref();
  state.stall = { timer, ms, taken: taken(caller), since: performance.now(), waiting: 0 };
}

/** Bytes the caller's kernel has taken: everything written, less what still waits in the socket. */
function taken(socket: CallerSocket): number {
  return (socket.bytesWritten ?? 0) - socket.writableLength;
}

function checkStall(socket: CallerSocket, state: ConnectionState): void {
  const stall = state.stall!;
  if (socket.destroyed) {
    state.stall = undefined;
    return;
  }
  const now = performance.now();
  const took = taken(socket);
  if (socket.writableLength === 0) {
    // Nothing waits in the socket: the caller has taken everything so far.
    if (stall.waiting === 0) {
      state.stall = undefined;
      return;
    }
    // Answers still wait, queued behind one that is not written yet: the proxy holds them up, not the caller.
    stall.since = now;
  } else if (took !== stall.taken) {
    stall.since = now;
  } else if (now - stall.since >= stall.ms) {
    state.stall = undefined;
    state.stalled = true;
    state.closing = true;
    socket.destroy();
    return;
  }
  stall.taken = took;
  stall.timer.refresh();
}

interface WrittenAnswer {
  on(event: 'finish' | 'close', listener: () => void): unknown;
  off(event: 'finish' | 'close', listener: () => void): unknown;
}

/**
 * For an answer ended while its bytes still wait (the caller's socket is full, or it is queued
 * behind another): settles when the caller has taken it all ('finish') or the connection closed,
 * which watchStall makes happen within about `ms` of the caller taking nothing.
 */
export function answerTaken(socket: object, res: WrittenAnswer, ms: number): Promise<void> {
  watchStall(socket, ms);
  const stall = stateOf(socket).stall!;
  stall.waiting++;
  return new Promise<void>((resolve) => {
    const done = () => {
      res.off('finish', done);
      res.off('close', done);
      stall.waiting--;
      resolve();
    };
    res.on('finish', done);
    res.on('close', done);
  });
}

/** Was the connection cut by watchStall? */
export function wasStalled(socket: object | null): boolean {
  return socket !== null && (socket as Carrier)[STATE]?.stalled === true;
}

const lingering = new WeakSet<object>();

/**
 * The socket was answered and is in its lingering close. Node's HTTP parser reports every further
 * chunk of a refused request as another client error: those must not cut the linger short (a
 * reset would make the caller's kernel drop the answer it has not read yet).
 */
export function isLingering(socket: object): boolean {
  return lingering.has(socket);
}

/** How long a refused connection may keep sending after its answer before it is cut (lingering close). */
const LINGER_MS = 1_000;

/**
 * Answer on a raw socket and close it. end() alone leaves the connection half-open for as long as
 * the peer keeps sending (a slow client dribbling headers would hold it forever); destroying at
 * once makes the kernel answer a client that is still uploading with a reset, and it may lose the
 * answer. So, like nginx's lingering close: answer, read and discard for a moment, then cut.
 */
export function answerAndClose(socket: import('node:stream').Duplex, response: string): void {
  lingering.add(socket);
  // A peer that resets while it is answered is done: the error is not ours to raise. (After
  // 'connect' and 'upgrade' Node hands the socket over without its own error listener, and an
  // unhandled 'error' event would stop the process.)
  socket.on('error', () => socket.destroy());
  linger(socket);
  socket.end(response);
}

/**
 * The same lingering close for an answer written through Node's response, once it is out: Node
 * destroys the socket as soon as an answer that says `Connection: close` has been written, and a
 * client still sending the body that was refused unread is answered with a reset instead.
 *
 * Node's parser goes on reading the socket meanwhile, and what it reads is the rest of `req`'s
 * body, dropped, or what follows it, which is not processed (markClosing). No 'data' listener here:
 * one added now takes the reading out of the parser just after the server asked the socket to
 * resume and before it has, and the socket was not read any more (the linger then ended in the
 * very reset it is there to avoid).
 */
export function lingerOnClose(socket: import('node:net').Socket, req: import('node:stream').Readable): void {
  // From the answer on: bytes of the unread body that do not parse are not answered a second time.
  lingering.add(socket);
  socket.destroySoon = () => {
    closeAfterLinger(socket);
    // A body a step stopped reading midway may be left paused, and the socket with it.
    req.resume();
    socket.end();
  };
}

function linger(socket: import('node:stream').Duplex): void {
  closeAfterLinger(socket);
  socket.on('data', () => {});
}

/**
 * However fast and long the peer sends, the connection is cut LINGER_MS after the answer: a caller
 * cannot hold it by sending forever, and it counts against the listener's cap until it closes.
 */
function closeAfterLinger(socket: import('node:stream').Duplex): void {
  const timer = setTimeout(() => socket.destroy(), LINGER_MS);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
}

/**
 * One proxy's drain (SIGTERM): its answers from the drain's start on close their connections, and
 * its close() waits for the audit lines of requests still being handled. Two fields the request
 * path reads and counts, nothing kept per request: tracking each answer (a map entry and a 'close'
 * listener per request) cost about a fifth of the proxy's CPU per request, for the last requests
 * of a process's life.
 */
export class Drain {
  /** Set by close(): every answer whose head is written from now on closes its connection (closeForDrain). */
  draining = false;
  /** Requests being handled: started, their audit line not yet written. */
  handling = 0;
  #whenSettled: (() => void) | undefined;

  /** A request's handling ended (its audit line is written): once per request counted in `handling`. */
  ended(): void {
    if (--this.handling === 0 && this.#whenSettled) this.#whenSettled();
  }

  /**
   * Once no request is being handled, or `maxMs` later: how many still are then. Requests cut at
   * the drain deadline end a moment after their connections close, and the audit log must not be
   * closed before they have written their lines.
   */
  async settled(maxMs: number): Promise<number> {
    if (this.handling > 0) {
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolveSettled) => {
        this.#whenSettled = resolveSettled;
        timer = setTimeout(resolveSettled, maxMs);
      });
      clearTimeout(timer);
      this.#whenSettled = undefined;
    }
    return this.handling;
  }
}

interface DrainedAnswer {
  shouldKeepAlive: boolean;
  readonly req: { readonly socket: object | null; readonly complete: boolean };
}

/**
 * During a drain, just before an answer's head is written: it says `Connection: close`. An answer
 * that said keep-alive was followed by the drain closing the idle connection under the caller, and
 * a request its client pool had just sent on it (the connection looked reusable) met a closed
 * connection: a network error, one a client does not retry for a POST.
 *
 * Only the latest request's answer on a connection closes it: Node closes the connection once an
 * answer that says so is written, and answers pipelined behind an earlier one would be lost with
 * requests already sent upstream; requests that arrive behind it are not processed (markClosing).
 * When something waits to be answered behind it (a pipelined CONNECT, answered 503 shutting_down,
 * or bytes that do not parse, answered 400), that answer closes the connection instead.
 */
export function closeForDrain(res: DrainedAnswer): void {
  const socket = res.req.socket;
  const state = socket ? (socket as Carrier)[STATE] : undefined;
  if (state && (state.latest !== res.req || state.whenIdle)) return;
  res.shouldKeepAlive = false;
  if (state) state.closing = true;
}
