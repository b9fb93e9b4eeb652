import { createServer, type Server, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { rawRequest, statuses } from '../helpers/raw.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

const SECRET = 'sk_test_CANARY_7f3a9c';
let upstream: Upstream;
let hanging: Upstream;
let garbage: Server;
let garbagePort: number;
const garbageSockets = new Set<Socket>();
let closedPort: number;
let proxy: TestProxy;

beforeAll(async () => {
  upstream = await startUpstream();
  hanging = await startUpstream(() => {
    /* never answers */
  });
  garbage = createServer((s) => {
    garbageSockets.add(s);
    s.end('this is not HTTP\r\n\r\n');
  });
  await new Promise<void>((r) => garbage.listen(0, '127.0.0.1', r));
  garbagePort = (garbage.address() as AddressInfo).port;
  const probe = createServer();
  await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
  closedPort = (probe.address() as AddressInfo).port;
  await new Promise<void>((r) => probe.close(() => r()));

  const route = (name: string, url: string, extra = '') => `name: ${name}
prefix: /${name}
upstream: ${url}
allow_private_addresses: true
credential: key
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
max_body: 1kb
timeouts: { connect: 1s, response: 300ms }
${extra}allow:
  - caller: svc
    methods: [GET, POST]
    paths: [/ok, /items/*, /deep/**]
  - caller: other
    methods: [GET]
    paths: [/other]
`;
  proxy = await startTestProxy({
    routes: {
      up: route('up', upstream.url),
      hang: route('hang', hanging.url),
      refused: route('refused', `http://127.0.0.1:${closedPort}`),
      garbage: route('garbage', `http://127.0.0.1:${garbagePort}`),
      limited: route('limited', upstream.url, 'upstream_rate: { rate: 2/min }\n'),
      nocred: route('nocred', upstream.url).replace('credential: key', 'credential: missing'),
      nofield: route('nofield', upstream.url).replace('{secret}', '{other_field}'),
    },
    credentials: { key: { secret: SECRET } },
    callers: ['svc', 'other'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
  await hanging?.close();
  for (const s of garbageSockets) s.destroy();
  await new Promise<void>((r) => garbage.close(() => r()));
});

async function call(path: string, init: RequestInit & { token?: string | null } = {}): Promise<Response> {
  const token = init.token === undefined ? proxy.tokens.svc! : init.token;
  const headers: Record<string, string> = { ...(init.headers as Record<string, string>) };
  if (token !== null) headers['x-egress-token'] = token;
  return fetch(`${proxy.url}${path}`, { ...init, headers, redirect: 'manual' });
}

async function expectProxyError(res: Response, status: number, code: string): Promise<void> {
  expect(res.status).toBe(status);
  expect(res.headers.get('x-egress-error')).toBe(code);
  const requestId = res.headers.get('x-request-id');
  expect(requestId).toMatch(/^[0-9a-f-]{36}$/);
  const body = (await res.json()) as { error: { code: string; message: string; request_id: string } };
  expect(body.error.code).toBe(code);
  expect(body.error.request_id).toBe(requestId);
  expect(body.error.message).not.toContain(SECRET);
  expect(body.error.message).not.toMatch(/at .*\.ts:\d+/);
}

describe('errors made by the proxy', () => {
  it('401 without a token, with an unknown token, and with two tokens', async () => {
    const before = upstream.requests.length;
    await expectProxyError(await call('/up/ok', { token: null }), 401, 'caller_unauthenticated');
    await expectProxyError(await call('/up/ok', { token: `egt_${'A'.repeat(43)}` }), 401, 'caller_unauthenticated');
    await expectProxyError(await call('/up/ok', { token: 'not-a-token' }), 401, 'caller_unauthenticated');
    const raw = await rawRequest(proxy.proxy.proxyAddress.port, `GET /up/ok HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${proxy.tokens.svc}\r\nX-Egress-Token: ${proxy.tokens.other}\r\n\r\n`);
    expect(statuses(raw)).toEqual([401]);
    expect(upstream.requests.length).toBe(before);
  });

  it('403 for a method, a path or a caller the allowlist does not name', async () => {
    const before = upstream.requests.length;
    await expectProxyError(await call('/up/ok', { method: 'DELETE' }), 403, 'route_forbidden');
    await expectProxyError(await call('/up/nope'), 403, 'route_forbidden');
    await expectProxyError(await call('/up/items'), 403, 'route_forbidden');
    await expectProxyError(await call('/up/items/1/2'), 403, 'route_forbidden');
    await expectProxyError(await call('/up/OK'), 403, 'route_forbidden');
    await expectProxyError(await call('/up/ok', { token: proxy.tokens.other! }), 403, 'route_forbidden');
    expect(upstream.requests.length).toBe(before);
    expect((await call('/up/items/42')).status).toBe(200);
    expect((await call('/up/deep/a/b/c')).status).toBe(200);
  });

  it('404 when no route owns the prefix, matched on whole segments', async () => {
    await expectProxyError(await call('/nothing/ok'), 404, 'route_not_found');
    await expectProxyError(await call('/upx/ok'), 404, 'route_not_found');
    await expectProxyError(await call('/UP/ok'), 404, 'route_not_found');
  });

  it('400 for unsafe targets, and nothing reaches the upstream', async () => {
    const before = upstream.requests.length;
    const port = proxy.proxy.proxyAddress.port;
    const t = proxy.tokens.svc;
    const targets = ['/up/items/%2e%2e/ok', '/up/items/../ok', '/up/items/.%2E/ok', '/up/items%2Fok', '/up/items%5cok', '/up/ok%00', '/up//ok', '/up/ok#frag', 'http://evil.example/up/ok', '/up/items\\..\\ok', `/up/${'a'.repeat(9000)}`];
    for (const target of targets) {
      const raw = await rawRequest(port, `GET ${target} HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${t}\r\nConnection: close\r\n\r\n`);
      expect(statuses(raw), target).toEqual([400]);
    }
    const dupHost = await rawRequest(port, `GET /up/ok HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Egress-Token: ${t}\r\nConnection: close\r\n\r\n`);
    expect(statuses(dupHost)).toEqual([400]);
    expect(upstream.requests.length).toBe(before);
  });

  it('413 for a body over max_body, declared or chunked, before or while forwarding', async () => {
    await expectProxyError(await call('/up/ok', { method: 'POST', body: 'x'.repeat(2048) }), 413, 'body_too_large');
    const chunked = new ReadableStream({
      start(controller) {
        for (let i = 0; i < 4; i++) controller.enqueue(new TextEncoder().encode('y'.repeat(512)));
        controller.close();
      },
    });
    const res = await call('/up/ok', { method: 'POST', body: chunked, duplex: 'half' } as RequestInit);
    await expectProxyError(res, 413, 'body_too_large');
    expect((await call('/up/ok', { method: 'POST', body: 'z'.repeat(1000) })).status).toBe(200);
  });

  it('504 when the upstream misses the route deadline', async () => {
    const started = Date.now();
    await expectProxyError(await call('/hang/ok'), 504, 'upstream_timeout');
    expect(Date.now() - started).toBeLessThan(3_000);
  });

  it('502 when the upstream refuses the connection or answers garbage', async () => {
    await expectProxyError(await call('/refused/ok'), 502, 'upstream_error');
    await expectProxyError(await call('/garbage/ok'), 502, 'upstream_error');
  });

  it('503 when the credential is missing from the store or lacks a field the templates need', async () => {
    const before = upstream.requests.length;
    await expectProxyError(await call('/nocred/ok'), 503, 'credential_unavailable');
    await expectProxyError(await call('/nofield/ok'), 503, 'credential_unavailable');
    expect(upstream.requests.length).toBe(before);
  });

  it('429 with Retry-After and RateLimit headers once the route quota is spent', async () => {
    expect((await call('/limited/ok')).status).toBe(200);
    expect((await call('/limited/ok')).status).toBe(200);
    const res = await call('/limited/ok');
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect(res.headers.get('ratelimit-policy')).toBe('"upstream";q=2;w=60');
    expect(res.headers.get('ratelimit')).toMatch(/^"upstream";r=0;t=\d+$/);
    await expectProxyError(res, 429, 'rate_limited');
  });

  it('every response carries X-Request-Id, forwarded ones too', async () => {
    const res = await call('/up/ok');
    expect(res.status).toBe(200);
    expect(res.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/);
  });

  it('writes one audit line per request with the SPEC fields, denied ones included', async () => {
    const res = await call('/up/items/7?account=secret-query-value');
    const id = res.headers.get('x-request-id');
    await call('/up/nope');
    const lines = (await proxy.auditText()).trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    const line = lines.find((l) => l.request_id === id)!;
    expect(line).toMatchObject({ caller: 'svc', route: 'up', method: 'GET', path: '/up/items/7', decision: 'allow', reason: 'forwarded', upstream_status: 200, credential: 'key', credential_version: 1 });
    expect(typeof line.duration_ms).toBe('number');
    expect(typeof line.prev).toBe('string');
    expect(JSON.stringify(lines)).not.toContain('secret-query-value');
    expect(lines.some((l) => l.decision === 'deny' && l.reason === 'route_forbidden' && l.path === '/up/nope')).toBe(true);
  });
});
