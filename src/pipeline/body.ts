import type { IncomingMessage, ServerResponse } from 'node:http';
import { ProxyError } from '../errors.ts';

/** Does the inbound request carry a body (RFC 9112 §6.3)? */
export function hasBody(req: IncomingMessage): boolean {
  // Node's parser has checked the digits; "00" is as empty as "0".
  return req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length'] ?? 0) > 0;
}

const continued = new WeakSet<ServerResponse>();

/**
 * A caller that sent `Expect: 100-continue` waits for a go-ahead before its body (RFC 9110
 * §10.1.1): it gets it here, just before the body is read, once the request passed every check.
 * The listeners take Node's 'checkContinue' so that no 100 goes out before the caller is known:
 * a refused request is answered without its body ever being invited.
 */
export function continueBody(req: IncomingMessage, res: ServerResponse): void {
  if (req.headers.expect?.toLowerCase() !== '100-continue' || continued.has(res)) return;
  continued.add(res);
  res.writeContinue();
}

/** Refuse a declared Content-Length over the limit before reading a byte of it. */
export function checkDeclaredLength(req: IncomingMessage, max: number): void {
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > max) throw new ProxyError('body_too_large');
}

/** Read the whole body, refusing it as soon as it passes `max` bytes; fails if the caller goes away first. */
export function readBody(req: IncomingMessage, max: number): Promise<Buffer> {
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
    const onClose = () => done(new Error('the caller closed the connection before the end of its body'));
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
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > max) {
      onTooLarge();
      throw new ProxyError('body_too_large');
    }
    yield chunk as Buffer;
  }
}
