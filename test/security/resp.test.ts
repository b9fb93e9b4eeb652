import { createServer, type Server, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { brotliCompressSync, deflateRawSync, deflateSync, gunzipSync, gzipSync, zstdCompressSync } from 'node:zlib';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { CANARY, rawRequest, startLab, statuses, type Lab } from './lab.ts';

/**
 * RESP: what upstream responses can do. Route /resp (U, caller a, any path) and /jbody (U, the
 * secret merged into the JSON body) exercise redirects and echoes; route /raw points at a raw TCP
 * server that answers with hand-made bytes chosen by the request path.
 */
let lab: Lab;
let raw: Server;
let rawPort: number;
const rawSockets = new Set<Socket>();

/** Hand-made upstream answers, by path (relative to the /raw prefix); `secret` is the PLAID-SECRET received. */
const RAW_ANSWERS: Record<string, (secret: string) => string> = {
  '/ctl-value': () => 'HTTP/1.1 200 OK\r\nContent-Type: \x01\r\nContent-Length: 2\r\n\r\nok',
  '/space-name': () => 'HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok',
  '/nul-value': () => 'HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok',
  '/cr-value': () => 'HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok',
  '/space-colon': () => 'HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok',
  '/obs-fold': () => 'HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok',
  '/cl-abc': () => 'HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nok',
  '/cl-dup': () => 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nokxyz',
  '/cl-te': () => 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n',
  '/bad-status': () => 'HTTP/1.1 99999 Nope\r\nContent-Length: 2\r\n\r\nok',
  '/not-http': () => 'SSH-2.0-OpenSSH_9.2\r\n\r\n',
  '/switching': () => 'HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi',
  '/huge-headers': () => `HTTP/1.1 200 OK\r\n${Array.from({ length: 100 }, (_, i) => `X-H${i}: ${'h'.repeat(1024)}`).join('\r\n')}\r\nContent-Length: 2\r\n\r\nok`,
  '/one-huge-header': () => `HTTP/1.1 200 OK\r\nX-Big: ${'h'.repeat(100 * 1024)}\r\nContent-Length: 2\r\n\r\nok`,
  '/set-cookies': () => `HTTP/1.1 200 OK\r\n${Array.from({ length: 10_000 }, (_, i) => `Set-Cookie: c${i}=v`).join('\r\n')}\r\nContent-Length: 2\r\n\r\nok`,
  '/truncated': () => 'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort',
  '/bad-chunk': () => 'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n',
  // A second, unsolicited response after the first: must never be given to the next request.
  '/poison': () => 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON',
  '/clean': () => 'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean',
  '/hop': () => 'HTTP/1.1 200 OK\r\nConnection: X-Secret-Hop\r\nX-Secret-Hop: drop\r\nKeep-Alive: timeout=99\r\nProxy-Authenticate: Basic\r\nX-Egress-Error: forged\r\nContent-Length: 2\r\n\r\nok',
  // A body on a response that cannot have one: the bytes must never become the next response.
  '/204-body': () => 'HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON',
  '/304-body': () => 'HTTP/1.1 304 Not Modified\r\nContent-Length: 6\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON',
  // The secret where the proxy relays nothing: trailers, the reason phrase, 1xx heads.
  '/trailer-200': (s) => `HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n2\r\nok\r\n0\r\nX-T: ${s}\r\n\r\n`,
  '/trailer-400': (s) => `HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n2\r\nok\r\n0\r\nX-T: ${s}\r\n\r\n`,
  '/reason-400': (s) => `HTTP/1.1 400 ${s}\r\nContent-Length: 2\r\n\r\nok`,
  '/reason-200': (s) => `HTTP/1.1 200 ${s}\r\nContent-Length: 2\r\n\r\nok`,
  '/early-hints': (s) => `HTTP/1.1 103 Early Hints\r\nLink: </x?k=${s}>\r\nX-Leak: ${s}\r\n\r\nHTTP/1.1 102 Processing\r\nX-Leak: ${s}\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok`,
  // The secret split across two chunks of an error body, and quoted in WWW-Authenticate.
  '/split-400': (s) => `HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n${s.slice(0, 5)}\r\n${(s.length - 5).toString(16)}\r\n${s.slice(5)}\r\n0\r\n\r\n`,
  // The secret as (part of) a header name: a name cannot hold [REDACTED], so the header must go.
  '/secret-name-200': (s) => `HTTP/1.1 200 OK\r\nX-Key-${s}: 1\r\nX-${s.toUpperCase()}: 2\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok`,
  '/secret-name-400': (s) => `HTTP/1.1 400 Bad\r\n${s}: 1\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok`,
  // A transfer coding other than chunked (RFC 9112 §6.1: never sent unasked); the body is gzip data
  // with the secret inside, and the connection closes to end it where chunked does not frame it.
  '/te-gzip-200': (s) => `HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n${gzipSync(Buffer.from(`key ${s}`)).toString('latin1')}`,
  '/te-gzip-400': (s) => `HTTP/1.1 400 Bad\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n${gzipSync(Buffer.from(`key ${s}`)).toString('latin1')}`,
  '/te-gzip-chunked-400': (s) => {
    const zipped = gzipSync(Buffer.from(`key ${s}`));
    return `HTTP/1.1 400 Bad\r\nTransfer-Encoding: gzip, chunked\r\n\r\n${zipped.length.toString(16)}\r\n${zipped.toString('latin1')}\r\n0\r\n\r\n`;
  },
  '/te-x-chunked-200': () => 'HTTP/1.1 200 OK\r\nTransfer-Encoding: x-custom\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n',
  '/te-chunked-200': () => 'HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n',
  '/www-auth': (s) => `HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm="x", error="invalid_token", token="${s}"\r\nContent-Length: 0\r\n\r\n`,
};

function rawHandler(socket: Socket): void {
  rawSockets.add(socket);
  socket.on('close', () => rawSockets.delete(socket));
  socket.on('error', () => undefined);
  let buf = '';
  socket.on('data', (d: Buffer) => {
    buf += d.toString('latin1');
    for (;;) {
      const end = buf.indexOf('\r\n\r\n');
      if (end === -1) return;
      const head = buf.slice(0, end);
      buf = buf.slice(end + 4);
      const cl = Number(/\r\ncontent-length:\s*(\d+)/i.exec(head)?.[1] ?? 0);
      buf = buf.slice(cl);
      const path = head.split(' ')[1] ?? '/';
      const secret = /\r\nplaid-secret:\s*([^\r]*)/i.exec(head)?.[1] ?? '';
      const answer = RAW_ANSWERS[path];
      // Keep the connection open (keep-alive) so that anything left over could be misread later.
      const bytes = answer ? answer(secret) : 'HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n';
      if (/\r\nConnection: close\r\n/.test(bytes.slice(0, bytes.indexOf('\r\n\r\n') + 2))) socket.end(bytes, 'latin1');
      else socket.write(bytes, 'latin1');
    }
  });
}

const REDIRECTS = [301, 302, 303, 307, 308];
const BIG_ERROR = 2 * 1024 * 1024;

function upstream(req: IncomingMessage, res: ServerResponse, body: Buffer): void {
  const url = req.url ?? '/';
  const secret = String(req.headers['plaid-secret'] ?? '');
  const parts = url.split('?')[0]!.split('/');
  if (parts[1] === 'redirect') {
    const code = Number(parts[2]);
    const e = lab.e.url;
    const location: Record<string, string> = {
      abs: `${e}/steal`,
      rel: '/steal',
      protorel: `//127.0.0.1:${lab.e.port}/steal`,
      meta: 'http://169.254.169.254/latest/meta-data/iam/security-credentials/',
      metahttps: 'https://169.254.169.254/latest/meta-data/',
      self: `${lab.url}/plaid/accounts/get`,
      secret: `${e}/steal?k=${encodeURIComponent(secret)}`,
    };
    if (parts[3] === 'secret') {
      // As Express's res.redirect() answers: the Location repeated in a text body.
      const text = `Found. Redirecting to ${location.secret}`;
      res.writeHead(code, { location: location.secret!, 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(text) });
      res.end(text);
      return;
    }
    res.writeHead(code, { location: location[parts[3]!] ?? '/', 'content-type': 'application/json', 'content-length': 2 });
    res.end('{}');
    return;
  }
  if (url === '/echo-header') {
    res.writeHead(200, { 'x-seen': secret, 'x-seen-b64': Buffer.from(secret).toString('base64'), 'set-cookie': [`s=${secret}`, 'ok=1'], 'content-length': 2 });
    res.end('ok');
    return;
  }
  if (url.startsWith('/echo-error')) {
    const text = JSON.stringify({ error: 'INVALID_API_KEYS', message: `key ${secret} rejected`, echoed_body: body.toString('utf8') });
    const enc = url.slice('/echo-error'.length).replace(/^-/, '');
    const buf = Buffer.from(text);
    const coded = enc === 'gzip' ? gzipSync(buf) : enc === 'deflate' ? deflateSync(buf) : enc === 'deflate-raw' ? deflateRawSync(buf) : enc === 'br' ? brotliCompressSync(buf) : enc === 'zstd' ? zstdCompressSync(buf) : buf;
    res.writeHead(400, { 'content-type': 'application/json', ...(enc ? { 'content-encoding': enc.replace('-raw', '') } : {}), 'content-length': coded.length });
    res.end(coded);
    return;
  }
  if (url.startsWith('/gzip-file/')) {
    // An error body that is gzip data without Content-Encoding (a .gz answer, or octet-stream), or
    // gzip data with Content-Encoding: gzip on top; /clean has no secret inside, /corrupt is cut short.
    const [, , type, inside] = url.split('/');
    const zipped = gzipSync(Buffer.from(inside === 'clean' ? 'rejected: no such account' : `{"error":"INVALID_API_KEYS","key":"${secret}"}`));
    const body = inside === 'corrupt' ? zipped.subarray(0, zipped.length - 12) : inside === 'twice' ? gzipSync(zipped) : zipped;
    const coded = type === 'encoded' ? gzipSync(body) : body;
    res.writeHead(400, { 'content-type': type === 'octet' ? 'application/octet-stream' : 'application/gzip', ...(type === 'encoded' ? { 'content-encoding': 'gzip' } : {}), 'content-length': coded.length });
    res.end(coded);
    return;
  }
  if (url.startsWith('/empty-encoded/')) {
    // An error or redirect with no content, labelled with a Content-Encoding all the same.
    const [, , enc, code] = url.split('/');
    res.writeHead(Number(code), { 'content-encoding': enc!, ...(Number(code) === 302 ? { location: '/elsewhere' } : {}), 'content-length': 0 });
    res.end();
    return;
  }
  if (url === '/echo-body-b64') {
    // The request body as received, base64-encoded (as gateways and debug answers quote it): the
    // secret sits somewhere inside a longer base64 text, at whatever offset the body gives it.
    const text = JSON.stringify({ error: 'INVALID_API_KEYS', received_b64: body.toString('base64') });
    res.writeHead(400, { 'content-type': 'application/json', 'x-received-b64': body.toString('base64'), 'content-length': Buffer.byteLength(text) });
    res.end(text);
    return;
  }
  if (url === '/bomb') {
    // 64 MiB of zeros, gzip: about 64 KiB on the wire.
    const zipped = gzipSync(Buffer.alloc(64 * 1024 * 1024));
    res.writeHead(500, { 'content-encoding': 'gzip', 'content-type': 'text/plain', 'content-length': zipped.length });
    res.end(zipped);
    return;
  }
  if (url === '/late-secret') {
    // The secret after more than 1 MiB of an error body: redacted, or the body is refused (502).
    const text = `${'x'.repeat(BIG_ERROR)} secret=${secret}`;
    res.writeHead(400, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(text) });
    res.end(text);
    return;
  }
  if (url === '/late-secret-gzip') {
    const zipped = gzipSync(Buffer.from(`${'x'.repeat(BIG_ERROR)} secret=${secret}`));
    res.writeHead(401, { 'content-encoding': 'gzip', 'content-length': zipped.length });
    res.end(zipped);
    return;
  }
  if (url === '/double-gzip') {
    const zipped = gzipSync(gzipSync(Buffer.from(`rejected ${secret}`)));
    res.writeHead(401, { 'content-encoding': 'gzip, gzip', 'content-length': zipped.length });
    res.end(zipped);
    return;
  }
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ method: req.method, url }));
}

beforeAll(async () => {
  raw = createServer(rawHandler);
  await new Promise<void>((r) => raw.listen(0, '127.0.0.1', r));
  rawPort = (raw.address() as AddressInfo).port;
  const route = (name: string, url: string, inject: string) => `name: ${name}
prefix: /${name}
upstream: ${url}
allow_private_addresses: true
credential: plaid
inject:
${inject}
max_body: 64kb
timeouts: { connect: 2s, response: 3s }
allow:
  - caller: a
    methods: [GET, POST]
    paths: [/**]
`;
  const headers = '  scheme: headers\n  headers:\n    PLAID-CLIENT-ID: "{client_id}"\n    PLAID-SECRET: "{secret}"';
  lab = await startLab({
    upstream,
    routes: (u) => ({
      resp: route('resp', u.url, headers),
      jbody: route('jbody', u.url, '  scheme: json_body\n  fields:\n    secret: "{secret}"\n    client_id: "{client_id}"'),
      raw: route('raw', `http://127.0.0.1:${rawPort}`, headers),
    }),
  });
}, 30_000);

afterAll(async () => {
  await lab?.close();
  for (const s of rawSockets) s.destroy();
  await new Promise<void>((r) => raw?.close(() => r()));
});

async function call(path: string, init: { method?: string; body?: string; headers?: Record<string, string> } = {}): Promise<{ status: number; headers: Headers; text: string; error: string | null }> {
  const res = await fetch(`${lab.url}${path}`, {
    method: init.method ?? 'POST',
    headers: { 'x-egress-token': lab.tokens.a, 'content-type': 'application/json', ...init.headers },
    body: (init.method ?? 'POST') === 'GET' ? undefined : (init.body ?? '{}'),
    redirect: 'manual',
  });
  const text = await res.text();
  lab.seen(`${res.status} ${JSON.stringify([...res.headers])} ${text}`);
  expect(text).not.toMatch(/at .*\.(ts|js):\d+/);
  return { status: res.status, headers: res.headers, text, error: res.headers.get('x-egress-error') };
}

/** One raw request from caller a on its own connection; returns the raw answer bytes. */
async function rawCall(path: string): Promise<string> {
  const answer = await rawRequest(lab.port, `POST ${path} HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
  lab.seen(answer);
  expect(answer).not.toMatch(/at .*\.(ts|js):\d+/);
  return answer;
}

describe('RESP: redirects', () => {
  it('RESP-01 cross-origin redirects (301/302/303/307/308 to E, absolute) are passed back, never followed', async () => {
    for (const code of REDIRECTS) {
      const mark = lab.u.requests.length;
      const r = await call(`/resp/redirect/${code}/abs`);
      expect(r.status, String(code)).toBe(code);
      expect(r.headers.get('location'), String(code)).toBe(`${lab.e.url}/steal`);
      expect(lab.e.requests, String(code)).toHaveLength(0);
      await lab.g0(mark, 1);
    }
  });

  it('RESP-01b relative, protocol-relative and self-pointing redirects are not followed either', async () => {
    for (const kind of ['rel', 'protorel', 'self']) {
      for (const code of [302, 307]) {
        const mark = lab.u.requests.length;
        const r = await call(`/resp/redirect/${code}/${kind}`);
        expect(r.status, `${code} ${kind}`).toBe(code);
        // Exactly one request at U: a relative redirect was not followed back to U either.
        expect(lab.u.requests.length - mark, `${code} ${kind}`).toBe(1);
        expect(lab.e.requests).toHaveLength(0);
        await lab.g0(mark, 1);
      }
    }
  });

  it('RESP-01c a 307/308 with a json_body route never replays the body carrying the secret anywhere', async () => {
    for (const code of [307, 308]) {
      const mark = lab.u.requests.length;
      const r = await call(`/jbody/redirect/${code}/abs`, { body: '{"a":1}' });
      expect(r.status).toBe(code);
      expect(lab.u.requests.length - mark).toBe(1);
      expect(lab.u.requests.at(-1)!.body.toString()).toContain(CANARY);
      expect(lab.e.requests).toHaveLength(0);
      await lab.g0(mark, 1);
    }
  });

  it('RESP-01d a redirect whose Location and body carry the injected secret is redacted for the caller', async () => {
    const mark = lab.u.requests.length;
    for (const code of REDIRECTS) {
      const r = await call(`/resp/redirect/${code}/secret`);
      expect(r.status).toBe(code);
      expect(r.headers.get('location')).not.toContain(CANARY);
      // The body repeats the Location: redacted the same way.
      expect(r.text).toMatch(/^Found\. Redirecting to http:\/\/127\.0\.0\.1:\d+\/steal\?k=.*REDACTED/);
      expect(r.text).not.toContain(CANARY);
    }
    expect(lab.e.requests).toHaveLength(0);
    await lab.g0(mark, REDIRECTS.length);
  });

  it('RESP-03 redirects to the metadata address are not followed (no connection is made)', async () => {
    for (const kind of ['meta', 'metahttps']) {
      for (const code of REDIRECTS) {
        const mark = lab.u.requests.length;
        const started = Date.now();
        const r = await call(`/resp/redirect/${code}/${kind}`);
        expect(r.status, `${code} ${kind}`).toBe(code);
        expect(r.headers.get('location')).toMatch(/^https?:\/\/169\.254\.169\.254\//);
        // Following it would mean a connect attempt to a blackholed address (a 2 s connect timeout).
        expect(Date.now() - started).toBeLessThan(1_500);
        await lab.g0(mark, 1);
      }
    }
  });
});

describe('RESP: secrets echoed by the upstream', () => {
  it('RESP-04 the secret echoed in response headers (incl. Set-Cookie) is redacted', async () => {
    const mark = lab.u.requests.length;
    const r = await call('/resp/echo-header');
    expect(r.status).toBe(200);
    expect(r.headers.get('x-seen')).toBe('[REDACTED]');
    expect(r.headers.get('x-seen-b64') ?? '').not.toContain(Buffer.from(CANARY).toString('base64'));
    expect(r.headers.get('set-cookie') ?? '').not.toContain(CANARY);
    expect(r.headers.get('set-cookie') ?? '').toContain('ok=1');
    await lab.g0(mark, 1);
  });

  it('RESP-04b the secret echoed in an error body, plain, gzip, deflate or br, is redacted', async () => {
    for (const enc of ['', '-gzip', '-deflate', '-br']) {
      const mark = lab.u.requests.length;
      const r = await call(`/resp/echo-error${enc}`);
      expect(r.status, enc).toBe(400);
      expect(r.text, enc).toContain('[REDACTED]');
      expect(r.text, enc).toContain('INVALID_API_KEYS');
      await lab.g0(mark, 1);
    }
  });

  it('RESP-04f the secret echoed in a zstd error body (Content-Encoding: zstd, as Cloudflare answers clients that accept it) is redacted, not refused', async () => {
    const mark = lab.u.requests.length;
    const r = await call('/resp/echo-error-zstd', { headers: { 'accept-encoding': 'zstd' } });
    expect(r.status).toBe(400);
    expect(r.error).toBeNull();
    expect(r.headers.get('content-encoding')).toBeNull();
    expect(r.text).toContain('[REDACTED]');
    expect(r.text).toContain('INVALID_API_KEYS');
    await lab.g0(mark, 1);
  });

  it('RESP-04h the secret echoed in a "deflate" error body sent as raw deflate without the zlib wrapper (as IIS and older servers send it) is redacted, not refused', async () => {
    const mark = lab.u.requests.length;
    const r = await call('/resp/echo-error-deflate-raw');
    expect(r.status).toBe(400);
    expect(r.error).toBeNull();
    expect(r.text).toContain('[REDACTED]');
    expect(r.text).toContain('INVALID_API_KEYS');
    await lab.g0(mark, 1);
  });

  it('RESP-04g an error or redirect with no content but a Content-Encoding is relayed as it came (empty), not refused', async () => {
    for (const enc of ['gzip', 'deflate', 'br', 'zstd']) {
      for (const code of [302, 401, 503]) {
        const mark = lab.u.requests.length;
        const r = await call(`/resp/empty-encoded/${enc}/${code}`);
        expect(r.status, `${enc} ${code}`).toBe(code);
        expect(r.error, `${enc} ${code}`).toBeNull();
        expect(r.text, `${enc} ${code}`).toBe('');
        // The upstream's "/elsewhere", on its route's prefix (reverse mode).
        if (code === 302) expect(r.headers.get('location')).toBe('/resp/elsewhere');
        await lab.g0(mark, 1);
      }
    }
  });

  it('RESP-04j the json_body secret echoed inside a base64 text of the whole body (at each of the three base64 alignments) is redacted', async () => {
    for (const pad of ['', 'a', 'ab']) {
      const mark = lab.u.requests.length;
      const r = await call('/jbody/echo-body-b64', { body: JSON.stringify({ pad }) });
      expect(r.status, pad).toBe(400);
      const sent = lab.u.requests.at(-1)!.body;
      expect(sent.toString(), 'the secret went upstream in the body').toContain(CANARY);
      const quoted = (JSON.parse(r.text) as { received_b64: string }).received_b64;
      expect(quoted, pad).toContain('[REDACTED]');
      for (const b64 of [quoted, r.headers.get('x-received-b64') ?? '']) {
        // Whatever base64 is left, decoded: the secret is not in it.
        for (const piece of b64.split('[REDACTED]')) expect(Buffer.from(piece, 'base64').toString('latin1'), pad).not.toContain(CANARY.slice(2, -2));
      }
      await lab.g0(mark, 1);
    }
  });

  it('RESP-04c the json_body secret echoed back in an error body is redacted', async () => {
    const mark = lab.u.requests.length;
    const r = await call('/jbody/echo-error', { body: '{"x":1}' });
    expect(r.status).toBe(400);
    expect(r.text).toContain('[REDACTED]');
    await lab.g0(mark, 1);
  });

  it('RESP-16 an error body of gzip data without Content-Encoding (or under it) is inflated and redacted, and compressed again', async () => {
    for (const type of ['gzip', 'octet', 'encoded']) {
      const mark = lab.u.requests.length;
      const res = await fetch(`${lab.url}/resp/gzip-file/${type}/secret`, { method: 'POST', headers: { 'x-egress-token': lab.tokens.a }, body: '{}' });
      const bytes = Buffer.from(await res.arrayBuffer());
      lab.seen(bytes.toString('latin1'));
      expect(res.status, type).toBe(400);
      expect(res.headers.get('content-encoding'), type).toBeNull();
      const inside = gunzipSync(bytes).toString();
      lab.seen(inside);
      expect(inside, type).toBe('{"error":"INVALID_API_KEYS","key":"[REDACTED]"}');
      await lab.g0(mark, 1);
    }
  });

  it('RESP-16b gzip data with no secret inside is relayed as it came; gzip that does not inflate, or gzip in gzip, is refused (502)', async () => {
    const clean = await fetch(`${lab.url}/resp/gzip-file/gzip/clean`, { method: 'POST', headers: { 'x-egress-token': lab.tokens.a }, body: '{}' });
    const bytes = Buffer.from(await clean.arrayBuffer());
    expect(clean.status).toBe(400);
    expect(gunzipSync(bytes).toString()).toBe('rejected: no such account');
    expect(bytes).toEqual(gzipSync(Buffer.from('rejected: no such account')));
    for (const path of ['/resp/gzip-file/octet/corrupt', '/resp/gzip-file/gzip/twice', '/resp/gzip-file/encoded/twice']) {
      const r = await call(path);
      expect(r.status, path).toBe(502);
      expect(r.error, path).toBe('upstream_error');
    }
    await lab.g0();
  });

  it('RESP-06 a decompression bomb (64 MiB of gzip zeros) as an error body is bounded', async () => {
    const mark = lab.u.requests.length;
    const started = Date.now();
    const r = await call('/resp/bomb');
    expect([500, 502]).toContain(r.status);
    expect(r.text.length).toBeLessThan(2 * 1024 * 1024);
    expect(Date.now() - started).toBeLessThan(5_000);
    await lab.g0(mark, 1);
  });

  it('RESP-06b a secret past the 1 MiB inspection window of an error body never reaches the caller', async () => {
    for (const path of ['/resp/late-secret', '/resp/late-secret-gzip']) {
      const mark = lab.u.requests.length;
      const r = await call(path);
      expect([400, 401, 502], path).toContain(r.status);
      expect(r.text, path).not.toContain(CANARY);
      await lab.g0(mark, 1);
    }
  });

  it('RESP-06c stacked encodings (gzip, gzip) in an error body: the secret is still not shown', async () => {
    const mark = lab.u.requests.length;
    const r = await call('/resp/double-gzip');
    expect([401, 502]).toContain(r.status);
    await lab.g0(mark, 1);
  });

  it('RESP-12 the secret in upstream trailers, the reason phrase or 1xx heads is never relayed', async () => {
    for (const [path, status] of [['/raw/trailer-200', 200], ['/raw/trailer-400', 400], ['/raw/reason-200', 200], ['/raw/reason-400', 400], ['/raw/early-hints', 200]] as const) {
      const answer = await rawCall(path);
      expect(statuses(answer), path).toEqual([status]);
      expect(answer, path).not.toContain(CANARY);
      expect(answer, path).not.toMatch(/X-T:|X-Leak:|\r\nLink:/i);
      await lab.g0();
    }
  });

  it('RESP-14 the secret split across two chunks of an error body, or quoted in WWW-Authenticate, is redacted', async () => {
    const split = await rawCall('/raw/split-400');
    expect(statuses(split)).toEqual([400]);
    expect(split).toContain('[REDACTED]');
    expect(split).not.toContain(CANARY);
    const auth = await rawCall('/raw/www-auth');
    expect(statuses(auth)).toEqual([401]);
    expect(auth).toMatch(/www-authenticate: Bearer realm="x", error="invalid_token", token="\[REDACTED\]"/i);
    await lab.g0();
  });

  it('RESP-15 a response header whose name holds the secret (any case) is dropped, the others relayed', async () => {
    for (const [path, status] of [['/raw/secret-name-200', 200], ['/raw/secret-name-400', 400]] as const) {
      const answer = await rawCall(path);
      expect(statuses(answer), path).toEqual([status]);
      expect(answer.toLowerCase(), path).not.toContain(CANARY.toLowerCase());
      expect(answer, path).toMatch(/\r\nx-kept: k\r\n/i);
      expect(answer.endsWith('\r\n\r\nok'), path).toBe(true);
      await lab.g0();
    }
  });
});

describe('RESP: malformed upstream responses', () => {
  it('RESP-17 a transfer coding other than chunked (gzip, gzip + chunked, an unknown one) → 502, never its undecoded bytes', async () => {
    for (const path of ['/te-gzip-200', '/te-gzip-400', '/te-gzip-chunked-400', '/te-x-chunked-200']) {
      const res = await fetch(`${lab.url}/raw${path}`, { method: 'POST', headers: { 'x-egress-token': lab.tokens.a }, body: '{}' });
      const bytes = Buffer.from(await res.arrayBuffer());
      lab.seen(bytes.toString('latin1'));
      expect(`${res.status} ${res.headers.get('x-egress-error')}`, `${path}: ${bytes.toString('hex').slice(0, 16)}`).toBe('502 upstream_error');
      await lab.g0();
    }
    // Chunked alone (in any case) is the one transfer coding that is relayed.
    const chunked = await call('/raw/te-chunked-200');
    expect(chunked.status).toBe(200);
    expect(chunked.text).toBe('ok');
  });

  it('RESP-05 bad header bytes (control byte value, a name with a space, NUL, bare CR) → 502, no crash', async () => {
    for (const path of ['/ctl-value', '/space-name', '/nul-value', '/cr-value', '/space-colon', '/obs-fold']) {
      const r = await call(`/raw${path}`);
      expect(r.status, path).toBe(502);
      expect(r.error, path).toBe('upstream_error');
      expect(JSON.stringify([...r.headers]), path).not.toContain('injected');
      await lab.g0();
    }
  });

  it('RESP-05b broken framing from the upstream (CL abc, two CLs, CL+TE, bad chunk, bad status, not HTTP, unsolicited 101) → 502', async () => {
    for (const path of ['/cl-abc', '/cl-dup', '/cl-te', '/bad-chunk', '/bad-status', '/not-http', '/switching']) {
      const r = await call(`/raw${path}`).catch((e: Error) => ({ status: 0, text: '', cut: `${e.message} ${String((e.cause as Error | undefined)?.message)}` }));
      // A bad chunk arrives after a valid head: the proxy may already have relayed the head, so
      // the caller's connection is cut instead (never a complete-looking response). Everything else is a 502.
      if (path === '/bad-chunk' && r.status === 0) expect('cut' in r && r.cut).toMatch(/terminated|closed|socket/i);
      else expect(r.status, path).toBe(502);
      expect(r.text, path).not.toContain('POISON');
      await lab.g0();
    }
  });

  it('RESP-05c a truncated body is cut off, not padded or retried', async () => {
    let outcome: string;
    try {
      const res = await fetch(`${lab.url}/raw/truncated`, { method: 'POST', headers: { 'x-egress-token': lab.tokens.a }, body: '{}' });
      if (res.status >= 500) outcome = `status ${res.status}`;
      else {
        try {
          outcome = `complete ${res.status} ${await res.text()}`;
        } catch {
          outcome = 'cut';
        }
      }
    } catch {
      outcome = 'cut';
    }
    lab.seen(outcome);
    // Either an error status before the head, or the caller's connection cut short: never a complete response.
    expect(outcome).toMatch(/^(cut|status 50[24])$/);
    await lab.g0();
  });

  it('RESP-07 huge response headers: 100 KiB, one 100 KiB header, or 10k Set-Cookie → 502', async () => {
    for (const path of ['/huge-headers', '/one-huge-header', '/set-cookies']) {
      const started = Date.now();
      const r = await call(`/raw${path}`);
      expect(r.status, path).toBe(502);
      expect(r.error, path).toBe('upstream_error');
      expect(Date.now() - started).toBeLessThan(3_000);
      await lab.g0();
    }
  });

  it('RESP-08 hop-by-hop and proxy-owned response headers are not relayed', async () => {
    const r = await call('/raw/hop');
    expect(r.status).toBe(200);
    for (const h of ['x-secret-hop', 'proxy-authenticate', 'x-egress-error']) expect(r.headers.get(h), h).toBeNull();
    // The proxy's own keep-alive header may be present; the upstream's never is.
    expect(r.headers.get('keep-alive') ?? '').not.toContain('99');
    expect(r.headers.get('connection') ?? '').not.toMatch(/secret-hop/i);
    expect(r.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/);
    await lab.g0();
  });

  it('RESP-09 an unsolicited second response from the upstream is never served to a later request', async () => {
    const first = await call('/raw/poison');
    expect(first.status).toBe(200);
    expect(first.text).toBe('ok');
    for (let i = 0; i < 3; i++) {
      const next = await call('/raw/clean');
      expect(next.text).not.toContain('POISON');
      expect([200, 502]).toContain(next.status);
      if (next.status === 200) expect(next.text).toBe('clean');
    }
    // And on one caller connection, pipelined.
    const rawAnswer = await rawRequest(lab.port, `POST /raw/poison HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\n\r\nPOST /raw/clean HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
    lab.seen(rawAnswer);
    expect(rawAnswer).not.toContain('POISON');
    expect(statuses(rawAnswer)[0]).toBe(200);
    await lab.g0();
  });

  it('RESP-10 a body after a 204 or 304 is never served as the answer to a later request', async () => {
    for (const [path, status] of [['/raw/204-body', 204], ['/raw/304-body', 304]] as const) {
      const first = await rawCall(path);
      expect(statuses(first), path).toEqual([status]);
      expect(first, path).not.toContain('POISON');
      for (let i = 0; i < 3; i++) {
        const next = await rawCall('/raw/clean');
        expect(next, `${path} then /clean #${i}`).not.toContain('POISON');
        expect(statuses(next), `${path} then /clean #${i}`).toEqual([200]);
        expect(next.endsWith('clean'), `${path} then /clean #${i}`).toBe(true);
      }
      await lab.g0();
    }
  });
});

/**
 * An upstream that answers every request 400 with `answer(req)` (the echo of the key in its body and
 * headers), behind a proxy that sends KEY as X-Api-Key: started before the tests of the describe
 * it is called in, closed after them.
 */
function echoingUpstream(key: string, answer: (req: IncomingMessage) => { body: Buffer; headers: Record<string, string> }): { readonly proxy: TestProxy; readonly up: Upstream } {
  const made = {} as { proxy: TestProxy; up: Upstream };
  beforeAll(async () => {
    made.up = await startUpstream((req, res) => {
      const { body, headers } = answer(req);
      res.writeHead(400, { 'content-type': 'application/json', ...headers, 'content-length': body.length });
      res.end(body);
    });
    made.proxy = await startTestProxy({
      routes: { api: `name: api\nprefix: /api\nupstream: ${made.up.url}\nallow_private_addresses: true\ncredential: key\ninject:\n  scheme: headers\n  headers:\n    X-Api-Key: "{secret}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/*]\n` },
      credentials: { key: { secret: key } },
      callers: ['svc'],
    });
  }, 30_000);
  afterAll(async () => {
    await made.proxy?.close();
    await made.up?.close();
  });
  return made;
}

const keyError = (echo: string, encoding: BufferEncoding = 'utf8') => Buffer.from(`{"error":"INVALID_API_KEYS","key":"${echo}"}`, encoding);

/**
 * A key with characters that encodings change (+ / = and a space, as base64 keys of Kraken or
 * Coinbase have), echoed by the upstream in an error body and a header in each form an upstream
 * framework writes.
 */
describe('RESP-04d echoes of a key with + / = in other encodings', () => {
  const KEY = 'CANARY+b/64== x&y';
  const forms: Record<string, string> = {
    'percent-upper': encodeURIComponent(KEY),
    'percent-lower': encodeURIComponent(KEY).replace(/%[0-9A-F]{2}/g, (m) => m.toLowerCase()),
    'form-encoded': encodeURIComponent(KEY).replaceAll('%20', '+'),
    // Python's urllib.parse.quote() keeps "/" by default (safe='/'), as in a path it builds.
    'percent-slash-kept': encodeURIComponent(KEY).replaceAll('%2F', '/'),
    // PHP's json_encode (and Jackson with ESCAPE_FORWARD_SLASHES) write "/" as "\/".
    'json-escaped-slash': JSON.stringify(KEY).slice(1, -1).replaceAll('/', '\\/'),
    'html-escaped': KEY.replace('&', '&amp;'),
    'base64-unpadded': Buffer.from(KEY).toString('base64').replace(/=+$/, ''),
    base64url: Buffer.from(KEY).toString('base64url'),
    'hex-lower': Buffer.from(KEY).toString('hex'),
    'hex-upper': Buffer.from(KEY).toString('hex').toUpperCase(),
    // An upstream that normalises the key it quotes.
    'upper-cased': KEY.toUpperCase(),
    'lower-cased': KEY.toLowerCase(),
    // JSON encoders that escape every character (ensure_ascii-style writers, some loggers).
    'json-unicode-lower': [...KEY].map((c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join(''),
    'json-unicode-upper': [...KEY].map((c) => `\\u${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}`).join(''),
    // Go's encoding/json and Rails' to_json escape <, > and & (HTML-safe JSON), the rest as it is.
    'json-html-safe': JSON.stringify(KEY).slice(1, -1).replace(/[<>&]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`),
    'json-unicode-mixed': [...KEY].map((c, i) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0').replace(/[a-f]/g, (h) => (i % 2 ? h.toUpperCase() : h))}`).join(''),
  };
  const lab = echoingUpstream(KEY, (req) => {
    const form = forms[(req.url ?? '').slice(1)] ?? '';
    return { body: keyError(form), headers: { 'x-key': form } };
  });

  it.each(Object.keys(forms))('the key echoed %s is redacted in the body and the header', async (form) => {
    expect(forms[form], 'an encoded form, not the key itself').not.toBe(KEY);
    const res = await fetch(`${lab.proxy.url}/api/${form}`, { headers: { 'x-egress-token': lab.proxy.tokens.svc! } });
    const text = await res.text();
    expect(res.status).toBe(400);
    expect(text).toBe('{"error":"INVALID_API_KEYS","key":"[REDACTED]"}');
    expect(res.headers.get('x-key')).toBe('[REDACTED]');
  });
});


/**
 * A key holding characters that encodeURIComponent leaves as they are (! ' ( ) * ~) but stricter
 * encoders escape: Go's url.QueryEscape, PHP's rawurlencode, Python's quote(safe=''), Java's URLEncoder.
 */
describe('RESP-04i echoes of a key percent-encoded by strict encoders', () => {
  const KEY = "CANARY!k*e'y(1)~z w";
  const strict = KEY.replace(/[^A-Za-z0-9\-._~]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`);
  const forms: Record<string, string> = {
    'rfc3986 (rawurlencode, quote(safe=""))': strict,
    'go-query-escape': strict.replaceAll('%20', '+'),
    'java-urlencoder': strict.replaceAll('%20', '+').replaceAll('%2A', '*').replaceAll('~', '%7E'),
  };
  const lab = echoingUpstream(KEY, (req) => {
    const form = forms[decodeURIComponent((req.url ?? '').slice(1))] ?? '';
    return { body: keyError(form), headers: { location: `https://e.example/?k=${form}` } };
  });

  it.each(Object.keys(forms))('the key echoed %s is redacted in the body and the header', async (form) => {
    expect(forms[form], 'an encoded form, not encodeURIComponent\'s').not.toBe(encodeURIComponent(KEY));
    const res = await fetch(`${lab.proxy.url}/api/${encodeURIComponent(form)}`, { headers: { 'x-egress-token': lab.proxy.tokens.svc! } });
    const text = await res.text();
    expect(res.status).toBe(400);
    expect(text).toBe('{"error":"INVALID_API_KEYS","key":"[REDACTED]"}');
    expect(res.headers.get('location')).toBe('https://e.example/?k=[REDACTED]');
  });
});

/**
 * A key with latin1 letters, injected as a header: undici writes header values as latin1, so the
 * upstream receives (and may echo) one byte per letter, not the key's UTF-8 bytes.
 */
describe('RESP-04e echoes of a non-ASCII key as the bytes the upstream received', () => {
  const KEY = 'clé-privée-ÄÖÜ-9f2';
  const lab = echoingUpstream(KEY, (req) => {
    // Node decodes header values as latin1: writing the string back as latin1 echoes the bytes received.
    const received = String(req.headers['x-api-key'] ?? '');
    const echo = req.url === '/upper' ? received.toUpperCase() : received;
    return { body: keyError(echo, 'latin1'), headers: { 'x-key': echo } };
  });

  it.each(['/as-received', '/upper'])('the key echoed %s (latin1 bytes) is redacted in the body and the header', async (path) => {
    const res = await fetch(`${lab.proxy.url}/api${path}`, { headers: { 'x-egress-token': lab.proxy.tokens.svc! } });
    const body = Buffer.from(await res.arrayBuffer()).toString('latin1');
    expect(res.status).toBe(400);
    expect(lab.up.requests.at(-1)!.headers['x-api-key']).toBe(KEY);
    expect(body).toBe('{"error":"INVALID_API_KEYS","key":"[REDACTED]"}');
    expect(res.headers.get('x-key')).toBe('[REDACTED]');
  });
});
