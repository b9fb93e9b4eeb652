import { createHash, randomBytes } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * How responses travel back: relayed as they stream (byte-exact, any size, with or without a
 * length), or read whole when they must be inspected (error bodies, bounded), and what the caller
 * sees when the upstream fails halfway.
 */
const SECRET = 'sk_live_CANARY_relay_99';
const BIG = randomBytes(5 * 1024 * 1024);
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
/** `n` bytes cycling through every value 0-255, UTF-8-invalid sequences included. */
const smallBody = (n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + 0xf0) & 0xff));

let upstream: Upstream;
let proxy: TestProxy;

beforeAll(async () => {
  upstream = await startUpstream((req, res) => {
    const path = (req.url ?? '').split('?')[0];
    switch (path) {
      case '/big-length':
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': BIG.length });
        res.end(BIG);
        return;
      case '/big-chunked': {
        // Written in uneven pieces with pauses, so the proxy relays while the upstream is still sending.
        res.writeHead(200, { 'content-type': 'application/octet-stream' });
        let at = 0;
        const next = () => {
          if (at >= BIG.length) return void res.end();
          const size = 10_000 + Math.floor(Math.random() * 300_000);
          const ok = res.write(BIG.subarray(at, at + size));
          at += size;
          if (ok) setImmediate(next);
          else res.once('drain', next);
        };
        next();
        return;
      }
      case '/error-echo': {
        // 100 KB of error body (more than is held before the proxy decides what to do with it), the key in the middle.
        const pad = 'x'.repeat(50_000);
        const body = JSON.stringify({ error: `${pad} bad key ${SECRET} ${pad}` });
        res.writeHead(500, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
        res.end(body);
        return;
      }
      case '/error-huge':
        res.writeHead(500, { 'content-type': 'text/plain', 'content-length': 2 * 1024 * 1024 });
        res.end(Buffer.alloc(2 * 1024 * 1024, 0x61));
        return;
      case '/early-hints':
        res.writeEarlyHints({ link: '</style.css>; rel=preload; as=style' });
        res.writeHead(200, { 'content-type': 'text/plain', 'content-length': 2 });
        res.end('ok');
        return;
      case '/small-binary': {
        // Every byte value, at the sizes around the proxy's one-string limit (16 KiB), with a length or chunked.
        const body = smallBody(Number(new URL(req.url!, 'http://u').searchParams.get('n')));
        res.writeHead(200, { 'content-type': 'application/octet-stream', ...(req.headers['x-chunked'] ? {} : { 'content-length': body.length }) });
        res.end(body);
        return;
      }
      case '/no-content':
        res.writeHead(204);
        res.end();
        return;
      case '/cut': {
        // Promise 1 MiB, send 300 KB, then reset the connection.
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': 1024 * 1024 });
        res.write(Buffer.alloc(300_000, 0x62), () => setTimeout(() => res.socket?.destroy(), 20));
        return;
      }
      default:
        res.writeHead(200, { 'content-type': 'text/plain', 'content-length': 5 });
        res.end(req.method === 'HEAD' ? undefined : 'hello');
    }
  });
  proxy = await startTestProxy({
    routes: {
      api: `name: api
prefix: /api
upstream: ${upstream.url}
allow_private_addresses: true
credential: api
inject:
  scheme: bearer
  token: "{token}"
allow:
  - caller: svc
    methods: [GET, HEAD]
    paths: ["/**"]
`,
    },
    credentials: { api: { token: SECRET } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

const get = (path: string, method = 'GET') => fetch(`${proxy.url}/api${path}`, { method, headers: { 'x-egress-token': proxy.tokens.svc! } });

describe('relaying responses', () => {
  it('a 5 MiB body with a Content-Length arrives byte for byte', async () => {
    const res = await get('/big-length');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-length')).toBe(String(BIG.length));
    expect(sha(Buffer.from(await res.arrayBuffer()))).toBe(sha(BIG));
  });

  it('a 5 MiB chunked body, sent in uneven pieces, arrives byte for byte', async () => {
    const res = await get('/big-chunked');
    expect(res.status).toBe(200);
    expect(sha(Buffer.from(await res.arrayBuffer()))).toBe(sha(BIG));
  });

  it('an error body larger than what is held before relaying is still read whole and redacted', async () => {
    const res = await get('/error-echo');
    expect(res.status).toBe(500);
    const text = await res.text();
    expect(text).not.toContain(SECRET);
    expect(text).toContain('bad key [REDACTED]');
    expect(text.length).toBeGreaterThan(100_000);
    expect(res.headers.get('content-length')).toBe(String(Buffer.byteLength(text)));
  });

  it('an error body over the inspection limit is refused with 502, not relayed unchecked', async () => {
    const res = await get('/error-huge');
    expect(res.status).toBe(502);
    expect(res.headers.get('x-egress-error')).toBe('upstream_error');
    expect(((await res.json()) as { error: { message: string } }).error.message).toMatch(/too large to inspect/);
  });

  it('1xx informational responses stay between the proxy and the upstream; the final response is relayed', async () => {
    const res = await get('/early-hints');
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('ok');
  });

  it('small binary bodies (every byte value, 1 B to just past 16 KiB, with a length or chunked) arrive byte for byte', async () => {
    for (const n of [1, 255, 256, 4096, 16 * 1024, 16 * 1024 + 1]) {
      for (const chunked of [false, true]) {
        const res = await fetch(`${proxy.url}/api/small-binary?n=${n}`, { headers: { 'x-egress-token': proxy.tokens.svc!, ...(chunked ? { 'x-chunked': '1' } : {}) } });
        expect(res.status).toBe(200);
        const got = Buffer.from(await res.arrayBuffer());
        expect(got.length, `${n} B${chunked ? ', chunked' : ''}`).toBe(n);
        expect(got.equals(smallBody(n)), `${n} B${chunked ? ', chunked' : ''}`).toBe(true);
      }
    }
  });

  it('HEAD and 204 responses carry no body', async () => {
    const head = await get('/hello', 'HEAD');
    expect(head.status).toBe(200);
    expect(head.headers.get('content-length')).toBe('5');
    expect(await head.text()).toBe('');
    const empty = await get('/no-content');
    expect(empty.status).toBe(204);
    expect(await empty.text()).toBe('');
  });

  it('an upstream that dies mid-body cuts the caller off (never a padded or completed body), and the proxy carries on', async () => {
    const outcome = await new Promise<{ status: number; bytes: number; error?: string }>((resolve) => {
      const req = httpRequest(`${proxy.url}/api/cut`, { headers: { 'x-egress-token': proxy.tokens.svc! } }, (res) => {
        let bytes = 0;
        res.on('data', (c: Buffer) => (bytes += c.length));
        res.on('end', () => resolve({ status: res.statusCode!, bytes }));
        res.on('error', (err) => resolve({ status: res.statusCode!, bytes, error: err.message }));
      });
      req.on('error', (err) => resolve({ status: 0, bytes: 0, error: err.message }));
      req.end();
    });
    expect(outcome.status).toBe(200);
    expect(outcome.bytes).toBeLessThan(1024 * 1024);
    expect(outcome.error).toBeDefined();
    expect((await get('/hello')).status).toBe(200);
    const audit = await proxy.auditText();
    expect(audit).not.toContain(SECRET);
  });
});
