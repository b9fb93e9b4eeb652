import type { IncomingMessage, ServerResponse } from 'node:http';
import { ProxyError } from '../errors.ts';

/**
 * Methods whose content has no defined meaning (RFC 9110 §9.3.1, §9.3.2) or is forbidden (§9.3.8).
 * An upstream that ignores a GET's content reads it as the next request on its connection, and the
 * proxy shares upstream connections between callers (CL.0 desync): such content is never sent.
 */
export const NO_CONTENT_METHODS: ReadonlySet<string> = new Set(['GET', 'HEAD', 'TRACE']);

/** Does the inbound request carry a body (RFC 9112 §6.3)? */
export function hasBody(req: IncomingMessage): boolean {
  // Node's parser has checked the digits; "00" is as empty as "0".
  return req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length'] ?? 0) > 0;
}

/**
 * An Expect that cannot be met: 100-continue is the only expectation there is (RFC 9110 §10.1.1).
 * An HTTP/1.0 request's Expect is ignored, as Node does.
 */
export function unmetExpectation(req: IncomingMessage): boolean {
  const expectation = req.headers.expect;
  return expectation !== undefined && req.httpVersionMinor !== 0 && expectation.trim().toLowerCase() !== '100-continue';
}

const continued = new WeakSet<ServerResponse>();

/**
 * A caller that sent `Expect: 100-continue` waits for a go-ahead before its body (RFC 9110
 * §10.1.1): it gets it here, just before the body is read, once the request passed every check.
 * The listeners take Node's 'checkContinue' so that no 100 goes out before the caller is known:
 * a refused request is answered without its body ever being invited.
 */
export function continueBody(req: IncomingMessage, res: ServerResponse): void {
  // HTTP/1.0 has no 1xx: its Expect is ignored (RFC 9110 §10.1.1), and a 100 would be read as the answer.
  if (req.headers.expect?.toLowerCase() !== '100-continue' || req.httpVersionMinor === 0 || continued.has(res)) return;
  continued.add(res);
  res.writeContinue();
}

/**
 * Content codings a refusal names (RFC 9110 §8.4.1, the IANA registry, and the x- aliases): a
 * coding outside the list is named as unknown, so no header text of the caller's is echoed.
 */
const NAMED_CODINGS = new Set(['gzip', 'x-gzip', 'deflate', 'br', 'zstd', 'compress', 'x-compress', 'aes128gcm', 'dcb', 'dcz', 'exi', 'pack200-gzip']);

/**
 * The codings other than identity the body is declared to be under, lower-cased, in order. Every
 * Content-Encoding line counts, in either spelling ("Content_Encoding" is HTTP_CONTENT_ENCODING to
 * CGI and WSGI): an upstream may read any of them, and one that inflates the body reads what the
 * proxy did not. Codings are compared without regard to case (RFC 9110 §8.4.1); empty list
 * elements are no coding (§5.6.1).
 */
export function bodyCodings(rawHeaders: readonly string[]): string[] {
  return codingsOf(rawHeaders, (name) => name.replaceAll('_', '-') === 'content-encoding').filter((c) => c !== 'identity');
}

/**
 * The codings every line of a coding field names (`name` matches the lower-cased field name), over
 * all its lines, lower-cased, empty list elements dropped. Content-Encoding and Transfer-Encoding alike.
 */
export function codingsOf(rawHeaders: readonly string[], name: (lowerCased: string) => boolean): string[] {
  const codings: string[] = [];
  for (let i = 0; i < rawHeaders.length; i += 2) {
    if (!name(rawHeaders[i]!.toLowerCase())) continue;
    for (const element of rawHeaders[i + 1]!.split(',')) {
      const coding = element.trim().toLowerCase();
      if (coding !== '') codings.push(coding);
    }
  }
  return codings;
}

/**
 * A step that reads the body (`reader` says which and why) reads the bytes as they arrive: under a
 * Content-Encoding it would check, parse or sign bytes that the upstream (or a front proxy that
 * inflates request bodies) reads as something else, or write a body of its own under the caller's
 * coding. Such a body is refused (400 bad_request) before the caller is invited to send it.
 */
export function refuseCodedBody(req: IncomingMessage, reader: string): void {
  const coding = bodyCodings(req.rawHeaders)[0];
  if (coding === undefined) return;
  const named = NAMED_CODINGS.has(coding) ? `Content-Encoding: ${coding}` : 'a Content-Encoding the proxy does not know';
  throw new ProxyError('bad_request', `${reader}, and cannot read a body under ${named}. Send the body unencoded (no Content-Encoding, or identity).`);
}

/** Refuse a declared Content-Length over the limit before reading a byte of it. */
export function checkDeclaredLength(req: IncomingMessage, max: number): void {
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > max) throw new ProxyError('body_too_large');
}

const CALLER_GONE = 'the caller closed the connection before the end of its body';

/** Read the whole body, refusing it as soon as it passes `max` bytes; fails if the caller goes away first. */
export function readBody(req: IncomingMessage, max: number): Promise<Buffer> {
  // A caller gone while an earlier step waited (a rate-limit check in Redis, say) has had its
  // 'close' already: none of the events below would come, and the request would wait for good,
  // unrecorded, holding its caller's in-flight slot.
  if (req.destroyed) return Promise.reject(new Error(CALLER_GONE));
  checkDeclaredLength(req, max);
  return new Promise<Buffer>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const done = (err?: Error) => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', done);
      req.off('close', onClose);
      if (err) reject(err);
      else resolve(Buffer.concat(chunks, size));
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > max) return done(new ProxyError('body_too_large'));
      chunks.push(chunk);
    };
    const onEnd = () => done();
    const onClose = () => done(new Error(CALLER_GONE));
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', done);
    req.on('close', onClose);
  });
}

/**
 * Stream the body through, counting: past `max` the stream fails, which aborts the upstream
 * request mid-body (the caller gets 413 if no response has started).
 */
export async function* limitBody(req: IncomingMessage, max: number, onTooLarge: () => void): AsyncGenerator<Buffer> {
  let size = 0;
  for await (const chunk of joined(req)) {
    size += chunk.length;
    if (size > max) {
      onTooLarge();
      throw new ProxyError('body_too_large');
    }
    yield chunk;
  }
}

/** Past this many bytes waiting to be sent, the caller's body is paused (back-pressure). */
const JOIN_BYTES = 64 * 1024;

/**
 * The body's pieces, joined while they wait to be sent. Node's parser hands over every chunk of
 * a chunked body on its own: a body written one byte per chunk went upstream as one chunk per
 * byte, each through the stream machinery and a socket write, some ten times the CPU the parser
 * itself spends on it. Joined, everything one socket read delivered goes as one piece.
 */
async function* joined(req: IncomingMessage): AsyncGenerator<Buffer> {
  const parts: Buffer[] = [];
  let bytes = 0;
  let ended = false;
  let failure: Error | undefined;
  let wake: (() => void) | undefined;
  let scheduled = false;
  // Not woken at once: Node runs the microtasks after each chunk it hands over, so the piece would
  // be sent before the next chunk of the same socket read arrived. setImmediate runs after the read.
  const wakeAfterRead = () => {
    scheduled = false;
    wake?.();
  };
  const onData = (chunk: Buffer) => {
    parts.push(chunk);
    bytes += chunk.length;
    if (bytes >= JOIN_BYTES) req.pause();
    if (!scheduled) {
      scheduled = true;
      setImmediate(wakeAfterRead);
    }
  };
  const onEnd = () => {
    ended = true;
    wake?.();
  };
  const onError = (err: Error) => {
    failure ??= err;
    wake?.();
  };
  const onClose = () => onError(new Error(CALLER_GONE));
  // Gone before the body was asked for (see readBody): no event would wake the loop below.
  if (req.destroyed) failure = new Error(CALLER_GONE);
  req.on('data', onData);
  req.on('end', onEnd);
  req.on('error', onError);
  req.on('close', onClose);
  try {
    for (;;) {
      if (parts.length > 0) {
        const piece = parts.length === 1 ? parts[0]! : Buffer.concat(parts, bytes);
        parts.length = 0;
        bytes = 0;
        req.resume();
        yield piece;
      } else if (ended) {
        return;
      } else if (failure) {
        throw failure;
      } else {
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
    }
  } finally {
    req.off('data', onData);
    req.off('end', onEnd);
    req.off('error', onError);
    req.off('close', onClose);
  }
}
