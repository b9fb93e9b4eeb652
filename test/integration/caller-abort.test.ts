import { connect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { apiKeyRoute, bearerRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** A caller that hangs up is not an upstream failure: no 5xx in the metrics, an honest audit line. */
let upstream: Upstream;
let proxy: TestProxy;

beforeAll(async () => {
  upstream = await startUpstream((req, res) => {
    if (req.url === '/token') {
      // A token endpoint that answers late: the caller gives up while the proxy waits for it.
      setTimeout(() => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ access_token: 'at_abort_token', expires_in: 3600 }));
      }, 500);
      return;
    }
    if (req.url === '/accounts') {
      res.writeHead(200);
      res.end('accounts');
      return;
    }
    if (req.url === '/slow') {
      setTimeout(() => {
        res.writeHead(200);
        res.end('late');
      }, 800);
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    const chunk = Buffer.alloc(64 * 1024, 1);
    let sent = 0;
    const timer = setInterval(() => {
      if (res.destroyed || sent++ > 50) {
        clearInterval(timer);
        res.end();
        return;
      }
      res.write(chunk);
    }, 20);
  });
  proxy = await startTestProxy({
    routes: {
      api: bearerRoute({ upstream: upstream.url, paths: ['/slow', '/stream'] }),
      bank: `name: bank\nprefix: /bank\nupstream: ${upstream.url}\nallow_private_addresses: true\ncredential: bank\ninject:\n  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/token\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/accounts]\n`,
    },
    credentials: { key: { token: 'tok_abort_1234' }, bank: { client_id: 'client-1', client_secret: 'cs_abort_secret' } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

describe('a caller that hangs up', () => {
  it.each([
    ['before the upstream answers', '/slow'],
    ['in the middle of a streamed response', '/stream'],
  ])('%s is recorded as aborted, not as an upstream error', async (_what, path) => {
    const ac = new AbortController();
    const res = fetch(`${proxy.url}/api${path}`, { headers: { 'x-egress-token': proxy.tokens.svc! }, signal: ac.signal });
    if (path === '/stream') {
      const r = await res;
      const reader = r.body!.getReader();
      await reader.read();
      ac.abort();
    } else {
      setTimeout(() => ac.abort(), 200);
      await expect(res).rejects.toThrow();
    }
    await eventually(async () => (await proxy.auditText()).includes(`"path":"/api${path}"`), 3_000, 'the audit line');
    const line = (await proxy.auditText()).trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.path === `/api${path}`)!;
    expect(line).toMatchObject({ decision: 'aborted', reason: 'caller_closed' });
    const metrics = await (await fetch(`${proxy.admin}/metrics`)).text();
    expect(metrics).not.toMatch(/egress_requests_total\{[^}]*status_class="5xx"/);
    expect((await fetch(`${proxy.admin}/healthz`)).status).toBe(200);
  });

  it('while an earlier step waits (a late token endpoint): nothing is sent upstream, and the request is recorded as aborted', async () => {
    const ac = new AbortController();
    const res = fetch(`${proxy.url}/bank/accounts`, { headers: { 'x-egress-token': proxy.tokens.svc! }, signal: ac.signal });
    setTimeout(() => ac.abort(), 150);
    await expect(res).rejects.toThrow();
    await eventually(async () => (await proxy.auditText()).includes('"path":"/bank/accounts"'), 3_000, 'the audit line');
    const line = (await proxy.auditText()).trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.path === '/bank/accounts')!;
    expect(line).toMatchObject({ decision: 'aborted', reason: 'caller_closed', upstream_status: null });
    expect(upstream.requests.filter((r) => r.url === '/token').length).toBe(1);
    expect(upstream.requests.filter((r) => r.url === '/accounts')).toEqual([]);
  });
});

describe('a caller that hangs up while its rate-limit check waits for Redis', () => {
  let redis: TestRedis | undefined;
  let shared: TestProxy | undefined;
  afterAll(async () => {
    redis?.thaw();
    await shared?.close();
    await redis?.destroy();
  });

  // The body was read only after the check: a caller gone by then had emitted its 'close' already,
  // and the read waited for an end that never came. The request was never recorded, and it held
  // the caller's in-flight slot for good: after EGRESS_CALLER_MAX_IN_FLIGHT of them, every
  // request of that caller was 429.
  it('its POST is recorded as aborted and gives its in-flight slot back', async () => {
    redis = await TestRedis.create();
    const route = apiKeyRoute({ upstream: upstream.url, paths: ['/x'], methods: ['POST'], extra: 'upstream_rate: { rate: 1000/s }\n' });
    shared = await startTestProxy({ routes: { api: route }, credentials: { key: { secret: 'sk_abort_redis' } }, callers: ['svc'], store: `${redis.url}/0`, env: { EGRESS_CALLER_MAX_IN_FLIGHT: '1' } });
    const port = Number(new URL(shared.url).port);
    // Redis frozen: the check waits for its command timeout, then falls back to local buckets.
    redis.freeze();
    const socket = connect(port, '127.0.0.1');
    socket.on('error', () => {});
    socket.write(`POST /api/x HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${shared.tokens.svc!}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`);
    await new Promise((r) => setTimeout(r, 150));
    socket.destroy();
    await new Promise((r) => setTimeout(r, 900));
    redis.thaw();
    await eventually(async () => (await shared!.auditText()).includes('"path":"/api/x"'), 3_000, 'the audit line');
    const line = (await shared.auditText()).trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.path === '/api/x')!;
    expect(line).toMatchObject({ decision: 'aborted', reason: 'caller_closed', upstream_status: null });
    const next = await fetch(`${shared.url}/api/x`, { method: 'POST', headers: { 'x-egress-token': shared.tokens.svc!, 'content-type': 'application/json' }, body: '{}' });
    expect(next.status).toBe(200);
    // Nothing left being handled once the answers are out (the last one is recorded just after it is sent).
    await eventually(async () => /^egress_requests_in_flight 0$/m.test(await (await fetch(`${shared!.admin}/metrics`)).text()), 3_000, 'no request in flight');
  }, 20_000);
});
