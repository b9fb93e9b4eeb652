import { readFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
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

/** The requests the proxy has started and not yet audited, from the admin listener's /metrics. */
async function inFlight(admin: string): Promise<number> {
  return Number(/^egress_requests_in_flight (\d+)$/m.exec(await (await fetch(`${admin}/metrics`)).text())?.[1]);
}

/** What follows pipelined requests: a protocol switch, or a CONNECT (no forward mode here: both are refused). */
const HANDOVERS = [
  ['an upgrade', 'GET /api/fast HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n'],
  ['a CONNECT', 'CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n'],
] as const;

describe('a caller that pipelines an upgrade or a CONNECT behind requests in flight, then goes', () => {
  // Node hands the socket of an upgrade or a CONNECT over at once, and stops watching it for the
  // requests before it: the answer being sent, paused for a full socket, never heard that it had
  // drained (and the stall watch, seeing the socket empty, never cut it); once the connection was
  // cut, an answer queued behind it was never closed, so its request waited for good, unrecorded.
  describe('when the proxy cuts the connection for leaving its answers unread', () => {
    let bulk: Upstream;
    let stalled: TestProxy;
    beforeAll(async () => {
      bulk = await startUpstream((req, res) => {
        res.writeHead(200, { 'content-type': 'application/octet-stream' });
        if (req.url !== '/big') return void res.end('fast');
        // 32 MiB as it comes, more than the connections in between hold.
        const chunk = Buffer.alloc(256 * 1024, 1);
        let left = 128;
        const timer = setInterval(() => {
          if (res.destroyed || --left < 0) {
            clearInterval(timer);
            res.end();
          } else {
            res.write(chunk);
          }
        }, 5);
      });
      const route = apiKeyRoute({ upstream: bulk.url, paths: ['/big', '/fast'], extra: 'timeouts: { response: 1s }\n' });
      stalled = await startTestProxy({ routes: { api: route }, credentials: { key: { secret: 'sk_handover' } }, callers: ['svc'] });
    });
    afterAll(async () => {
      await stalled?.close();
      await bulk?.close();
    });

    it.each(HANDOVERS)('after %s, the answer queued behind the cut one is closed, and its request recorded', async (_what, handover) => {
      const before = (await stalled.auditText()).split('"path":"/api/fast"').length;
      const socket = connect(Number(new URL(stalled.url).port), '127.0.0.1');
      socket.on('error', () => {});
      // Never read: the answer to /big fills the connection, and the route's 1 s cuts it.
      socket.pause();
      const token = stalled.tokens.svc!;
      socket.write(`GET /api/big HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${token}\r\n\r\nGET /api/fast HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${token}\r\n\r\n${handover}`);
      try {
        await eventually(async () => (await stalled.auditText()).split('"path":"/api/fast"').length > before, 8_000, 'the audit line of the queued request');
        await eventually(async () => (await inFlight(stalled.admin)) === 0, 3_000, 'no request in flight');
      } finally {
        socket.destroy();
      }
    }, 20_000);
  });

  // Nothing listened for the handed-over socket's errors until the answers before it were out: a
  // caller that reset the connection meanwhile took the whole proxy down (an uncaught ECONNRESET
  // or EPIPE), with every request in flight on it.
  describe('with a reset', () => {
    let serve: ServeProcess | undefined;
    let slow: Upstream;
    beforeAll(async () => {
      slow = await startUpstream((req, res) => {
        setTimeout(() => {
          res.writeHead(200, { 'content-type': 'text/plain' });
          res.end('late');
        }, req.url === '/slow' ? 400 : 0);
      });
    });
    afterEach(() => {
      serve?.child.kill('SIGKILL');
      serve = undefined;
    });
    afterAll(async () => {
      await slow?.close();
    });

    it.each(HANDOVERS)('after %s, the proxy stays up and records every request', async (_what, handover) => {
      const dir = await makeTempDir('egress-handover-');
      const { tokens } = await seedDataDir(dir, { routes: { api: apiKeyRoute({ upstream: slow.url, paths: ['/slow', '/fast'] }) }, credentials: { key: { secret: 'sk_handover' } }, callers: ['svc'] });
      serve = await startServe(envFor(dir));
      const socket = connect(Number(new URL(serve.url).port), '127.0.0.1');
      socket.on('error', () => {});
      await new Promise((r) => socket.once('connect', r));
      socket.write(`GET /api/slow HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${tokens.svc!}\r\n\r\nGET /api/fast HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${tokens.svc!}\r\n\r\n${handover}`);
      await new Promise((r) => setTimeout(r, 150));
      socket.resetAndDestroy();
      // The answer to /slow comes 400 ms after it was asked for, and goes to a connection that is gone.
      await new Promise((r) => setTimeout(r, 1_000));
      expect(serve.child.exitCode, serve.output()).toBeNull();
      expect((await fetch(`${serve.admin}/healthz`)).status).toBe(200);
      await eventually(async () => (await inFlight(serve!.admin)) === 0, 3_000, 'no request in flight');
      const audit = await readFile(join(dir, 'audit.log'), 'utf8');
      expect(audit).toContain('"path":"/api/slow"');
      expect(audit).toContain('"path":"/api/fast"');
    }, 30_000);
  });
});
