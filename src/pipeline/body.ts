import type { IncomingMessage } from 'node:http';
import { ProxyError } from '../errors.ts';

/** Does the inbound request carry a body (RFC 9112 §6.3)? */
export function hasBody(req: IncomingMessage): boolean {
  return req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] !== undefined && req.headers['content-length'] !== '0');
}

/** Refuse a declared Content-Length over the limit before reading a byte of it. */
export function checkDeclaredLength(req: IncomingMessage, max: number): void {
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > max) throw new ProxyError('body_too_large');
}

/** Read the whole body, refusing it as soon as it passes `max` bytes. */
export async function readBody(req: IncomingMessage, max: number): Promise<Buffer> {
  checkDeclaredLength(req, max);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > max) throw new ProxyError('body_too_large');
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks, size);
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
