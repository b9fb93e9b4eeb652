import type { IncomingMessage } from 'node:http';
import { countHeader } from '../pipeline/canonicalise-target.ts';

/** Proxy-Authorization sent more than once: Node keeps only the first, so the order would choose the caller. */
export const AMBIGUOUS = Symbol('ambiguous Proxy-Authorization');

/**
 * The caller token in a forward-mode request's Proxy-Authorization (CONNECT or absolute form):
 * undefined when absent or not a token, AMBIGUOUS when the header came more than once.
 */
export function proxyAuthorizationToken(req: IncomingMessage): string | undefined | typeof AMBIGUOUS {
  if (countHeader(req.rawHeaders, 'proxy-authorization') > 1) return AMBIGUOUS;
  return tokenFromAuthorization(req.headers['proxy-authorization']);
}

/**
 * The token in an Authorization or Proxy-Authorization value: `Bearer <token>`, or Basic with the
 * token as the password (what HTTPS_PROXY=http://caller:token@… and browsers send). Undefined for
 * anything else, malformed percent-escapes included: a header must never be able to throw here.
 */
export function tokenFromAuthorization(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const bearer = bearerToken(header);
  if (bearer) return bearer;
  const basic = /^Basic ([A-Za-z0-9+/=]+)$/i.exec(header);
  if (!basic) return undefined;
  const decoded = Buffer.from(basic[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon === -1) return undefined;
  try {
    return decodeURIComponent(decoded.slice(colon + 1));
  } catch {
    return undefined;
  }
}

/** The token of `Bearer <token>` only: a scheme a browser never sends by itself. */
export function bearerToken(header: string | undefined): string | undefined {
  return header ? /^Bearer (\S+)$/i.exec(header)?.[1] : undefined;
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
 */
export function lingerOnClose(socket: import('node:net').Socket): void {
  socket.destroySoon = () => {
    lingering.add(socket);
    linger(socket);
    socket.end();
  };
}

function linger(socket: import('node:stream').Duplex): void {
  const timer = setTimeout(() => socket.destroy(), LINGER_MS);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
  socket.on('data', () => {});
}
