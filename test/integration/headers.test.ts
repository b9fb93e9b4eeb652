import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { rawRequest, statuses } from '../helpers/raw.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

const SECRET = 'sk_test_CANARY_7f3a9c';
const BEARER = 'tok_CANARY_bearer_99';
let upstream: Upstream;
let evil: Upstream;
let proxy: TestProxy;

beforeAll(async () => {
  evil = await startUpstream();
  upstream = await startUpstream((req, res, body) => {
    const url = req.url ?? '';
    if (url.startsWith('/redirect/')) {
      const status = Number(url.split('/')[2]);
      res.writeHead(status, { location: `${evil.url}/steal`, 'content-length': '0' });
      res.end();
    } else if (url === '/echo-header') {
      res.writeHead(200, { 'x-seen-key': String(req.headers['x-api-key']), 'x-seen-auth': String(req.headers.authorization), 'content-length': '2' });
      res.end('ok');
    } else if (url === '/echo-error') {
      const text = JSON.stringify({ error: 'INVALID_API_KEYS', message: `key ${String(req.headers['x-api-key'])} rejected`, auth: req.headers.authorization });
      res.writeHead(400, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
      res.end(text);
    } else if (url === '/echo-error-gzip') {
      const zipped = gzipSync(Buffer.from(`rejected: ${String(req.headers['x-api-key'])}`));
      res.writeHead(401, { 'content-encoding': 'gzip', 'content-length': zipped.length });
      res.end(zipped);
    } else if (url === '/big') {
      const chunk = Buffer.alloc(64 * 1024, 'b');
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      for (let i = 0; i < 64; i++) res.write(chunk);
      res.end();
    } else if (url === '/hash') {
      const text = createHash('sha256').update(body).digest('hex');
      res.writeHead(200, { 'content-length': text.length, connection: 'x-secret-hop', 'x-secret-hop': 'drop me', 'keep-alive': 'timeout=77' });
      res.end(text);
    } else {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ headers: req.headers, rawHeaders: req.rawHeaders }));
    }
  });
  proxy = await startTestProxy({
    routes: {
      api: `name: api
prefix: /api
upstream: ${upstream.url}
allow_private_addresses: true
credential: key
inject:
  - scheme: headers
    headers:
      X-Api-Key: "{secret}"
  - scheme: bearer
max_body: 10mb
allow:
  - caller: svc
    methods: [GET, POST, PUT]
    paths: [/**]
`,
    },
    credentials: { key: { secret: SECRET, token: BEARER } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
  await evil?.close();
});

function lastHeaders(): { headers: Record<string, string | string[]>; rawHeaders: string[] } {
  const r = upstream.requests.at(-1)!;
  return { headers: r.headers as Record<string, string | string[]>, rawHeaders: [...r.rawHeaders] };
}

function countRaw(raw: readonly string[], name: string): number {
  let n = 0;
  for (let i = 0; i < raw.length; i += 2) if (raw[i]!.toLowerCase() === name) n++;
  return n;
}

describe('what the upstream receives', () => {
  it('caller copies of claimed headers never arrive: exactly one credential of each kind', async () => {
    const port = proxy.proxy.proxyAddress.port;
    const raw = await rawRequest(port, [
      'GET /api/x HTTP/1.1', 'Host: p', `X-Egress-Token: ${proxy.tokens.svc}`,
      'Authorization: Bearer attacker', 'AUTHORIZATION: Basic YTpi', 'x-api-key: forged-1', 'X-API-KEY: forged-2',
      'Connection: close', '', ''].join('\r\n'));
    expect(statuses(raw)).toEqual([200]);
    const { headers, rawHeaders } = lastHeaders();
    expect(countRaw(rawHeaders, 'authorization')).toBe(1);
    expect(countRaw(rawHeaders, 'x-api-key')).toBe(1);
    expect(headers.authorization).toBe(`Bearer ${BEARER}`);
    expect(headers['x-api-key']).toBe(SECRET);
    expect(JSON.stringify(rawHeaders)).not.toMatch(/attacker|forged|YTpi/);
  });

  it('hop-by-hop, Connection-listed, proxy, forwarding and method-override headers are stripped; Host is the upstream', async () => {
    const port = proxy.proxy.proxyAddress.port;
    const raw = await rawRequest(port, [
      'GET /api/x HTTP/1.1', 'Host: caller.example', `X-Egress-Token: ${proxy.tokens.svc}`,
      'Connection: close, X-Private-Hop', 'X-Private-Hop: secret-hop', 'Keep-Alive: timeout=99', 'Proxy-Authorization: Basic Zm9vOmJhcg==',
      'X-Forwarded-For: 10.0.0.1', 'Forwarded: for=10.0.0.1', 'X-Real-IP: 10.0.0.1', 'Via: 1.1 evil', 'X-Forwarded-Client-Cert: By=spiffe://corp/admin',
      'X-HTTP-Method-Override: DELETE', 'TE: trailers', 'X-Custom: kept', 'X-Custom: twice', '', ''].join('\r\n'));
    expect(statuses(raw)).toEqual([200]);
    const { headers, rawHeaders } = lastHeaders();
    for (const name of ['x-egress-token', 'x-private-hop', 'keep-alive', 'proxy-authorization', 'x-forwarded-for', 'forwarded', 'x-real-ip', 'via', 'x-forwarded-client-cert', 'x-http-method-override', 'te']) {
      expect(headers[name], name).toBeUndefined();
    }
    expect(headers.host).toBe(`127.0.0.1:${upstream.port}`);
    expect(countRaw(rawHeaders, 'x-custom')).toBe(2);
  });

  it('headers named __proto__ or constructor are plain headers, not a crash', async () => {
    const raw = await rawRequest(proxy.proxy.proxyAddress.port, `GET /api/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${proxy.tokens.svc}\r\n__proto__: x\r\nconstructor: y\r\nConnection: close\r\n\r\n`);
    expect(statuses(raw)).toEqual([200]);
    expect(({} as Record<string, unknown>).x).toBeUndefined();
  });

  it('request bodies stream through intact (5 MB)', async () => {
    const body = Buffer.alloc(5 * 1024 * 1024, 7);
    const res = await fetch(`${proxy.url}/api/hash`, { method: 'PUT', body, headers: { 'x-egress-token': proxy.tokens.svc! } });
    expect(res.status).toBe(200);
    expect(await res.text()).toBe(createHash('sha256').update(body).digest('hex'));
    expect(res.headers.get('x-secret-hop')).toBeNull();
    expect(res.headers.get('keep-alive')).not.toBe('timeout=77');
  });

  it('response bodies stream through intact (4 MB)', async () => {
    const res = await fetch(`${proxy.url}/api/big`, { headers: { 'x-egress-token': proxy.tokens.svc! } });
    expect(res.status).toBe(200);
    expect((await res.arrayBuffer()).byteLength).toBe(4 * 1024 * 1024);
  });

  it('protocol upgrades are refused', async () => {
    const raw = await rawRequest(proxy.proxy.proxyAddress.port, `GET /api/ws HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${proxy.tokens.svc}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`);
    expect(statuses(raw)).toEqual([400]);
  });
});

describe('what the caller receives', () => {
  it.each([301, 302, 303, 307, 308])('a %i redirect is passed back, not followed', async (status) => {
    const before = evil.requests.length;
    const res = await fetch(`${proxy.url}/api/redirect/${status}`, { method: 'POST', body: '{"a":1}', headers: { 'x-egress-token': proxy.tokens.svc! }, redirect: 'manual' });
    expect(res.status).toBe(status);
    expect(res.headers.get('location')).toBe(`${evil.url}/steal`);
    await new Promise((r) => setTimeout(r, 100));
    expect(evil.requests.length).toBe(before);
  });

  it('an injected secret echoed in response headers is redacted', async () => {
    const res = await fetch(`${proxy.url}/api/echo-header`, { headers: { 'x-egress-token': proxy.tokens.svc! } });
    expect(res.headers.get('x-seen-key')).toBe('[REDACTED]');
    expect(res.headers.get('x-seen-auth')).toBe('Bearer [REDACTED]');
  });

  it('an injected secret echoed in an error body is redacted', async () => {
    const res = await fetch(`${proxy.url}/api/echo-error`, { headers: { 'x-egress-token': proxy.tokens.svc! } });
    expect(res.status).toBe(400);
    const text = await res.text();
    expect(text).toContain('INVALID_API_KEYS');
    expect(text).toContain('[REDACTED]');
    expect(text).not.toContain(SECRET);
    expect(text).not.toContain(BEARER);
  });

  it('an injected secret echoed in a gzip error body is redacted', async () => {
    const res = await fetch(`${proxy.url}/api/echo-error-gzip`, { headers: { 'x-egress-token': proxy.tokens.svc! } });
    expect(res.status).toBe(401);
    const text = await res.text();
    expect(text).toBe('rejected: [REDACTED]');
  });
});
