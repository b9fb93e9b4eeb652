import { connect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startLab, statuses, type Lab } from './lab.ts';
import { BANK_HOST, bankRoute, basic, makeCerts, tlsListener } from './sec-helpers.ts';

/**
 * DOS-03e: an answer given before the request body was read to its end (a 413 over max_body, a 401,
 * 403, 404, 429 or 400 refused before the body is read) closes the connection, and the caller still
 * uploading that body gets the answer, not a TCP reset (RFC 9112 §9.6): the proxy lingers, reading
 * and dropping what comes, for a bounded time before it closes. On every caller listener: plain,
 * TLS, and inside a CONNECT tunnel.
 */
let lab: Lab;
let tlsPort: number;
let tlsCa: string;
let caPem: string;

beforeAll(async () => {
  const tls = await tlsListener('egress-linger-');
  tlsCa = tls.ca;
  tlsPort = tls.port;
  const made = await makeCerts([BANK_HOST]);
  caPem = made.caPem;
  lab = await startLab({
    env: {
      EGRESS_CERTS: made.certs,
      ...tls.env,
    },
    routes: (u) => ({
      bank: bankRoute(u.url).replace('timeouts:', 'max_body: 64kb\ntimeouts:'),
      limited: `name: limited\nprefix: /limited\nupstream: ${u.url}\nallow_private_addresses: true\ncredential: plaid\ninject:\n  scheme: headers\n  headers:\n    X-Api-Key: "{secret}"\nallow:\n  - caller: a\n    methods: [POST]\n    paths: [/x]\n    rate: { rate: 1/h, burst: 1 }\n`,
    }),
  });
}, 60_000);
afterAll(async () => {
  await lab?.close();
});

interface Upload {
  /** Everything the proxy sent, latin1. */
  readonly answer: string;
  /** The socket error the client saw, if any (ECONNRESET when the proxy reset the connection). */
  readonly error: string | undefined;
  /** Whether the proxy closed the connection before the client gave up; ms from the first answer byte to the close. */
  readonly closedAfterMs: number | undefined;
}

/**
 * A client that sends `head`, then writes `chunk` as fast as the proxy takes it, reading whatever
 * comes back: until the connection closes (at most `giveUpMs`), or, `politely`, until the answer
 * starts, after which it sends nothing more and waits for the close.
 */
function upload(socket: Socket, head: string, chunk: Buffer, politely: boolean, giveUpMs = 6_000): Promise<Upload> {
  return new Promise((resolve) => {
    let answer = '';
    let error: string | undefined;
    let firstByteAt: number | undefined;
    let finished = false;
    const finish = (closed: boolean) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      socket.destroy();
      resolve({ answer, error, closedAfterMs: closed ? performance.now() - (firstByteAt ?? performance.now()) : undefined });
    };
    const timer = setTimeout(() => finish(false), giveUpMs);
    socket.on('data', (d: Buffer) => {
      firstByteAt ??= performance.now();
      answer += d.toString('latin1');
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      error ??= err.code ?? err.message;
      finish(true);
    });
    socket.on('close', () => finish(true));
    socket.write(head);
    const pump = () => {
      while (!finished && socket.writable && !(politely && firstByteAt !== undefined)) if (!socket.write(chunk)) return void socket.once('drain', pump);
    };
    pump();
  });
}

/**
 * The answer is one whole proxy error with `status`, its body read to the end, saying Connection:
 * close, and the proxy closed the connection: cleanly for a client that stopped sending when the
 * answer came; for one that goes on sending, after the linger (about a second).
 */
async function expectWholeAnswer(open: (allowHalfOpen: boolean) => Promise<Socket>, head: string, chunk: Buffer, politely: boolean, status: number, label: string): Promise<void> {
  // One that sends on keeps its side open after the proxy's FIN (Node's clients end theirs by default).
  const got = await upload(await open(!politely), head, chunk, politely);
  lab.seen(got.answer);
  expect(statuses(got.answer), `${label}: the answer, not a reset (${got.error ?? 'no error'})`).toEqual([status]);
  // Before: the proxy closed at once with the body unread, and the client saw a reset.
  if (politely) expect(got.error, `${label}: a clean close`).toBeUndefined();
  expect(bodyWhole(got.answer), `${label}: the whole error body read (${JSON.stringify(got.answer.slice(0, 80))}, ${got.error ?? 'no error'})`).toBe(true);
  expect(got.answer, label).toMatch(/\r\nconnection: close\r\n/i);
  expect(got.answer, label).toMatch(/\r\nx-request-id: [0-9a-f-]{36}\r\n/i);
  // Closed by the proxy, however fast the client keeps sending.
  expect(got.closedAfterMs, `${label}: closed by the proxy`).toBeDefined();
  expect(got.closedAfterMs!, label).toBeLessThan(3_000);
}

function bodyWhole(answer: string): boolean {
  const end = answer.indexOf('\r\n\r\n');
  const length = Number(/\r\ncontent-length: (\d+)\r\n/i.exec(answer)?.[1]);
  return end !== -1 && Number.isFinite(length) && answer.length - end - 4 >= length && answer.slice(end + 4, end + 4 + length).endsWith('}}');
}

const BLOCK = Buffer.alloc(64 * 1024, 'a');
const CHUNKED = Buffer.from(`${BLOCK.length.toString(16)}\r\n${BLOCK.toString('latin1')}\r\n`, 'latin1');
const DECLARED = 1024 * 1024 * 1024;

function plain(allowHalfOpen: boolean): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ port: lab.port, host: '127.0.0.1', allowHalfOpen }, () => resolve(s));
    s.once('error', reject);
  });
}

/** tls.connect passes allowHalfOpen on to its socket, though its option type leaves it out. */
function halfOpen(allowHalfOpen: boolean): ConnectionOptions {
  return { allowHalfOpen } as ConnectionOptions;
}

function tls(allowHalfOpen: boolean): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ port: tlsPort, host: '127.0.0.1', servername: 'localhost', ca: tlsCa, ...halfOpen(allowHalfOpen) }, () => resolve(s));
    s.once('error', reject);
  });
}

/** A tunnel to the bank host, TLS inside it; the outer connection half-open as asked, as the inner one is. */
async function tunnel(allowHalfOpen: boolean): Promise<Socket> {
  const outer = await new Promise<Socket>((resolve, reject) => {
    const s = connect({ port: lab.port, host: '127.0.0.1', allowHalfOpen }, () => s.write(`CONNECT ${BANK_HOST}:443 HTTP/1.1\r\nHost: ${BANK_HOST}:443\r\nProxy-Authorization: ${basic('a', lab.tokens.a)}\r\n\r\n`));
    let head = '';
    const onData = (d: Buffer) => {
      head += d.toString('latin1');
      if (!head.includes('\r\n\r\n')) return;
      s.off('data', onData);
      expect(head).toMatch(/^HTTP\/1\.1 200 /);
      resolve(s);
    };
    s.on('data', onData);
    s.once('error', reject);
  });
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ socket: outer, servername: BANK_HOST, ca: caPem, ...halfOpen(allowHalfOpen) }, () => resolve(s));
    s.once('error', reject);
  });
}

const ROUNDS = 3;

describe('DOS-03e an early answer to a caller still uploading its body', () => {
  it('plain listener: 413 (declared or while streaming), 401, 403, 404, 429 and 400 reach the caller whole, then the connection closes', async () => {
    const a = () => `X-Egress-Token: ${lab.tokens.a}\r\nContent-Type: application/octet-stream\r\n`;
    // The one request the rate allows, so that the next is refused 429.
    expect((await fetch(`${lab.url}/limited/x`, { method: 'POST', headers: { 'x-egress-token': lab.tokens.a }, body: '{}' })).status).toBe(200);
    const mark = lab.u.requests.length;
    for (const [label, head, chunk, status] of [
      ['413 declared', `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\n${a()}Content-Length: ${DECLARED}\r\n\r\n`, BLOCK, 413],
      ['413 while streaming', `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\n${a()}Transfer-Encoding: chunked\r\n\r\n`, CHUNKED, 413],
      ['401 no token', `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nContent-Length: ${DECLARED}\r\n\r\n`, BLOCK, 401],
      ['403 forbidden path', `POST /plaid/item/remove HTTP/1.1\r\nHost: p\r\n${a()}Content-Length: ${DECLARED}\r\n\r\n`, BLOCK, 403],
      ['404 no route', `POST /nothing/x HTTP/1.1\r\nHost: p\r\n${a()}Transfer-Encoding: chunked\r\n\r\n`, CHUNKED, 404],
      ['429 rate limited', `POST /limited/x HTTP/1.1\r\nHost: p\r\n${a()}Content-Length: ${DECLARED}\r\n\r\n`, BLOCK, 429],
      ['400 dot segment', `POST /plaid/x/../accounts/get HTTP/1.1\r\nHost: p\r\n${a()}Content-Length: ${DECLARED}\r\n\r\n`, BLOCK, 400],
    ] as const) {
      for (let i = 0; i < ROUNDS; i++) await expectWholeAnswer(plain, head, chunk, true, status, `${label} #${i + 1}`);
      await expectWholeAnswer(plain, head, chunk, false, status, `${label}, sending on`);
    }
    await lab.g0(mark, 0);
  }, 120_000);

  it('TLS listener and inside a tunnel: 413 and a refusal before the body reach the caller whole, then the connection closes', async () => {
    const mark = lab.u.requests.length;
    for (const [label, open, head, chunk, status] of [
      ['TLS 413', tls, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Type: application/octet-stream\r\nContent-Length: ${DECLARED}\r\n\r\n`, BLOCK, 413],
      ['TLS 401', tls, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n`, CHUNKED, 401],
      ['tunnel 413', tunnel, `POST /accounts HTTP/1.1\r\nHost: ${BANK_HOST}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n`, CHUNKED, 413],
      ['tunnel 403', tunnel, `POST /elsewhere HTTP/1.1\r\nHost: ${BANK_HOST}\r\nContent-Type: application/octet-stream\r\nContent-Length: ${DECLARED}\r\n\r\n`, BLOCK, 403],
    ] as const) {
      for (let i = 0; i < ROUNDS; i++) await expectWholeAnswer(open, head, chunk, true, status, `${label} #${i + 1}`);
      await expectWholeAnswer(open, head, chunk, false, status, `${label}, sending on`);
    }
    await lab.g0(mark, 0);
  }, 120_000);

  it('an HTTP client (fetch) streaming a body over max_body gets the 413, not a network error', async () => {
    for (let i = 0; i < ROUNDS; i++) {
      // 16 MiB in 64 KiB pieces, against max_body 64kb.
      let left = 256;
      const body = new Readable({ read() { this.push(left-- > 0 ? BLOCK : null); } });
      const res = await fetch(`${lab.url}/plaid/accounts/get`, { method: 'POST', headers: { 'x-egress-token': lab.tokens.a, 'content-type': 'application/octet-stream' }, body: Readable.toWeb(body) as ReadableStream, duplex: 'half' } as RequestInit);
      const text = await res.text();
      lab.seen(text);
      expect(res.status, `#${i + 1}`).toBe(413);
      expect(res.headers.get('x-egress-error')).toBe('body_too_large');
    }
  }, 60_000);
});

/** Everything the proxy sends on `socket` after `bytes`, until it closes (at most 3 s). */
function exchangeUntilClosed(socket: Socket, bytes: string): Promise<{ data: string; closed: boolean }> {
  return new Promise((resolve) => {
    let data = '';
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ data, closed: false });
    }, 3_000);
    socket.on('data', (d: Buffer) => (data += d.toString('latin1')));
    socket.on('error', () => {});
    socket.once('close', () => {
      clearTimeout(timer);
      resolve({ data, closed: true });
    });
    socket.write(bytes);
  });
}

describe('SMUG-02d a transfer coding other than chunked, on the TLS listener and inside a tunnel', () => {
  it('gzip, chunked is refused with the proxy\'s own 400 and the connection closed; nothing reaches the upstream (SMUG-02c covers the plain listener)', async () => {
    const mark = lab.u.requests.length;
    const body = 'Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n';
    for (const [label, open, head] of [
      ['TLS', tls, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Type: application/json\r\n`],
      ['tunnel', tunnel, `POST /accounts HTTP/1.1\r\nHost: ${BANK_HOST}\r\nContent-Type: application/json\r\n`],
    ] as const) {
      const { data, closed } = await exchangeUntilClosed(await open(false), `${head}${body}`);
      lab.seen(data);
      expect(statuses(data), label).toEqual([400]);
      expect(data, label).toMatch(/\r\nx-egress-error: bad_request\r\n/i);
      expect(data, label).toContain('Transfer-Encoding may name only chunked');
      expect(closed, `${label}: closed`).toBe(true);
    }
    await lab.g0(mark, 0);
  }, 30_000);
});
