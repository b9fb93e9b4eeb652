import type { IncomingHttpHeaders, ServerResponse } from 'node:http';
import type { Dispatcher } from 'undici';
import { ProxyError } from '../errors.ts';
import { answerTaken, watchStall } from './connection-state.ts';

/** Body bytes held while nobody reads them yet (between the response head and relay); past this the upstream is paused. */
const HOLD_BYTES = 64 * 1024;

/** A complete body up to this size leaves in the same string as the response head (see pipeTo). */
const ONE_STRING_BYTES = 16 * 1024;

/**
 * One request to the upstream through undici's dispatch handler API, relayed without an
 * intermediate stream: the body chunks go straight to the caller's response with back-pressure
 * (pause the upstream socket while the caller's socket is full), or are collected when the body
 * has to be inspected. undici's `request()` wraps every response in a Readable and a promise chain;
 * on the proxy's hot path that cost more than all of the proxy's own checks.
 *
 * The exchange resolves `head` when the status and headers arrive; what happens to the body is
 * decided after that: `pipeTo` (relay as it streams), `readAll` (inspect, bounded) or `discard`.
 * Chunks that arrive before the decision are held (up to HOLD_BYTES, then the upstream is paused).
 */
export class UpstreamExchange implements Dispatcher.DispatchHandler {
  status = 0;
  headers: IncomingHttpHeaders = {};
  readonly head: Promise<UpstreamExchange>;
  #resolveHead!: (exchange: UpstreamExchange) => void;
  #rejectHead!: (err: Error) => void;
  #headSeen = false;
  #controller: Dispatcher.DispatchController | undefined;
  #abortReason: Error | undefined;
  #held: Buffer[] = [];
  #heldBytes = 0;
  /** Hard limit while reading the whole body (readAll); HOLD_BYTES pauses, this fails. */
  #readLimit = 0;
  #ended = false;
  #failure: Error | undefined;
  #sink: ServerResponse | undefined;
  #waitingForDrain = false;
  /** How long the caller may leave its socket full before its connection is cut (0: no limit). */
  #stallMs = 0;
  /** The pending pipeTo/readAll: told when the body ends or fails. */
  #onSettle: ((err?: Error) => void) | undefined;
  /** The pending peek: told of every held chunk and of the end. */
  #onHeld: (() => void) | undefined;

  constructor() {
    this.head = new Promise((resolve, reject) => {
      this.#resolveHead = resolve;
      this.#rejectHead = reject;
    });
    // The head promise may be rejected after nobody awaits it any more (an abort during fallback).
    this.head.catch(() => {});
  }

  /** Stop the exchange (the caller went away, or the body is not wanted). Safe to call at any time. */
  abort(reason: Error): void {
    if (this.#controller) {
      if (!this.#controller.aborted) this.#controller.abort(reason);
    } else {
      this.#abortReason ??= reason;
    }
  }

  /** The request could not be dispatched at all (a pool refused its options): fail before any head. */
  refused(err: Error): void {
    this.#rejectHead(err);
  }

  // ---- undici's handler -------------------------------------------------------------------

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller;
    if (this.#abortReason) controller.abort(this.#abortReason);
  }

  onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders): void {
    // 1xx informational responses are the upstream's business with us, not the caller's.
    if (statusCode < 200) return;
    this.#controller = controller;
    this.status = statusCode;
    this.headers = headers;
    this.#headSeen = true;
    this.#resolveHead(this);
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    const sink = this.#sink;
    if (sink) {
      if (!sink.write(chunk) && !this.#waitingForDrain) {
        controller.pause();
        this.#awaitDrain(sink);
      }
      return;
    }
    this.#held.push(chunk);
    this.#heldBytes += chunk.length;
    this.#onHeld?.();
    if (this.#readLimit > 0) {
      if (this.#heldBytes > this.#readLimit) {
        const err = new ProxyError('upstream_error', 'The upstream error body is too large to inspect.');
        this.#fail(err);
        controller.abort(err);
      }
    } else if (this.#heldBytes > HOLD_BYTES) {
      controller.pause();
    }
  }

  onResponseEnd(): void {
    this.#ended = true;
    this.#onHeld?.();
    const sink = this.#sink;
    if (sink) {
      sink.end();
      // The end of the body may still wait in the caller's socket: the relay settles at 'finish'.
      if (sink.writableLength > 0) this.#watchCaller(sink, true);
    } else {
      this.#onSettle?.();
    }
  }

  onResponseError(_controller: Dispatcher.DispatchController, err: Error): void {
    if (!this.#headSeen) {
      this.#rejectHead(err);
      return;
    }
    this.#fail(err);
  }

  /**
   * The caller's socket is full: the upstream stays paused until it drains. A caller that stops
   * reading would hold this exchange, its in-flight slot and a connection of the upstream's pool
   * for good (undici's bodyTimeout does not run while the upstream is paused), so the wait is
   * bounded like the upstream's own silence: past `stallMs` with nothing taken, the caller's
   * connection is cut, the relay fails with it ('close') and the upstream is aborted.
   */
  #awaitDrain(sink: ServerResponse): void {
    this.#waitingForDrain = true;
    this.#watchCaller(sink, false);
    sink.once('drain', () => {
      this.#waitingForDrain = false;
      this.#controller?.resume();
    });
  }

  /**
   * Bytes wait in the caller's socket: bound how long, with the watch every answer uses. An ended
   * answer is waited for like any other (answerTaken); the pipeTo pending on it settles at its
   * 'finish' or 'close' by itself.
   */
  #watchCaller(sink: ServerResponse, ended: boolean): void {
    const socket = sink.req?.socket;
    if (this.#stallMs === 0 || !socket) return;
    if (ended) void answerTaken(socket, sink, this.#stallMs);
    else watchStall(socket, this.#stallMs);
  }

  #fail(err: Error): void {
    if (this.#failure) return;
    this.#failure = err;
    this.#held = [];
    this.#onSettle?.(err);
    this.#onHeld?.();
  }

  // ---- what the proxy does with the body ----------------------------------------------------

  /**
   * Relay the status, `headers` and the body to the caller as it streams. Settles when the caller's
   * response has finished (resolve), or when either side fails or closes first (reject), or when
   * the caller leaves its socket full for `stallMs` and loses the connection (reject).
   */
  pipeTo(res: ServerResponse, status: number, headers: readonly string[], stallMs = 0): Promise<void> {
    this.#stallMs = stallMs;
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      const settle = (err?: Error) => {
        if (settled) return;
        settled = true;
        this.#onSettle = undefined;
        this.#sink = undefined;
        res.off('finish', onFinish);
        res.off('close', onClose);
        if (err) reject(err);
        else resolve();
      };
      const onFinish = () => settle();
      const onClose = () => settle(res.writableFinished ? undefined : new Error('the caller closed the connection'));
      // `on`, not `once` (no wrapper per listener): settle removes both.
      res.on('finish', onFinish);
      res.on('close', onClose);
      if (this.#failure) {
        settle(this.#failure);
        return;
      }
      // Closed already: neither 'finish' nor 'close' would come.
      if (res.destroyed) {
        settle(new Error('the caller closed the connection'));
        return;
      }
      try {
        res.writeHead(status, headers as string[]);
      } catch (err) {
        // A header value Node refuses to send (control bytes from the upstream): nothing was written yet.
        settle(err as Error);
        return;
      }
      const held = this.#held;
      this.#held = [];
      this.#heldBytes = 0;
      if (this.#ended) {
        // The common case for small responses: head, body and end go out in one write. The
        // exchange takes no reference to the response: a finished handler stays reachable from
        // undici through young-generation collections (not through a full one), and while it
        // pointed at the response, every request and response outlived two scavenges. A sixth
        // of all allocation was promoted and full GCs ran 1.4 times a second at 2,000 req/s.
        if (held.length === 1) {
          const body = held[0]!;
          // A small body goes as a latin1 string (the bytes unchanged): Node then joins it to the
          // head and sends one string in one write, instead of a writev of the head and a Buffer.
          if (body.length <= ONE_STRING_BYTES) res.end(body.toString('latin1'), 'latin1');
          else res.end(body);
        } else {
          res.cork();
          for (const chunk of held) res.write(chunk);
          res.end();
        }
        // Not all of it went out at once (the caller is not reading): 'finish' waits on the caller.
        if (res.writableLength > 0) this.#watchCaller(res, true);
        return;
      }
      // Still streaming: upstream failures fail the relay, and its end ends the caller's response.
      this.#onSettle = (err) => {
        if (err) settle(err);
      };
      this.#sink = res;
      let full = false;
      for (const chunk of held) full = !res.write(chunk) || full;
      if (full) {
        // Paused here too, not only past HOLD_BYTES: an answer queued behind another one (the caller
        // pipelines) is full at its first write, and the upstream went on flowing into it unread.
        this.#controller?.pause();
        this.#awaitDrain(res);
      } else {
        this.#controller?.resume();
      }
    });
  }

  /** The whole body, up to `limit` bytes (more fails the exchange with upstream_error). */
  readAll(limit: number): Promise<Buffer> {
    return new Promise<Buffer>((resolve, reject) => {
      const done = (err?: Error) => {
        this.#onSettle = undefined;
        if (err) reject(err);
        else resolve(Buffer.concat(this.#held, this.#heldBytes));
      };
      if (this.#failure) return done(this.#failure);
      if (this.#heldBytes > limit) {
        const err = new ProxyError('upstream_error', 'The upstream error body is too large to inspect.');
        this.#fail(err);
        this.abort(err);
        return done(err);
      }
      if (this.#ended) return done();
      this.#readLimit = limit;
      this.#onSettle = done;
      this.#controller?.resume();
    });
  }

  /**
   * The whole body when it ends within HOLD_BYTES, without taking it: a later pipeTo or readAll
   * still gets every byte. Undefined when the body is longer (the upstream is then paused until
   * one of those reads on) or fails. For a success status that may still carry an auth failure
   * (Kraken's HTTP 200 "EAPI:Invalid key"): such a rejection is short, a longer body is not one.
   */
  peek(): Promise<Buffer | undefined> {
    return new Promise<Buffer | undefined>((resolve) => {
      let waiting = true;
      const done = (body: Buffer | undefined) => {
        waiting = false;
        this.#onHeld = undefined;
        resolve(body);
      };
      const check = () => {
        if (this.#failure || this.#heldBytes > HOLD_BYTES) done(undefined);
        else if (this.#ended) done(Buffer.concat(this.#held, this.#heldBytes));
      };
      this.#onHeld = check;
      check();
      if (waiting) this.#controller?.resume();
    });
  }

  /** The body is not wanted: stop receiving it. */
  discard(): void {
    this.#held = [];
    this.#heldBytes = 0;
    if (!this.#ended) this.abort(new ProxyError('upstream_error', 'The response body was not needed.'));
  }
}

/** Send one request on `dispatcher`; the exchange's `head` settles with the response head or the failure. */
export function dispatchExchange(dispatcher: Dispatcher, options: Dispatcher.DispatchOptions): UpstreamExchange {
  const exchange = new UpstreamExchange();
  try {
    dispatcher.dispatch(options, exchange);
  } catch (err) {
    exchange.refused(err as Error);
  }
  return exchange;
}
