import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** Two proxy instances, one Redis: they behave as one proxy. */
let redis: TestRedis;
let upstream: Upstream;
let a: TestProxy;
let b: TestProxy;
let dir: string;
let tokens: Record<string, string>;

beforeAll(async () => {
  redis = await TestRedis.create();
  upstream = await startUpstream((req, res) => {
    if (req.url === '/busy' || req.url === '/long-busy') {
      res.writeHead(429, { 'retry-after': req.url === '/busy' ? '3' : '30' });
      res.end('slow down');
      return;
    }
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(String(req.headers['x-api-key']));
  });
  dir = await makeTempDir('egress-two-');
  const route = (name: string, credential: string, extra = '') => `name: ${name}
prefix: /${name}
upstream: ${upstream.url}
allow_private_addresses: true
credential: ${credential}
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
${extra}allow:
  - caller: svc
    methods: [GET]
    paths: [/x, /busy, /long-busy]
  - caller: late
    methods: [GET]
    paths: [/x]
`;
  ({ tokens } = await seedDataDir(dir, {
    routes: {
      quota: route('quota', 'key', 'upstream_rate: { rate: 10/min }\n'),
      open: route('open', 'key'),
      paused: route('paused', 'key'),
      held: route('held', 'key'),
      rejoin: route('rejoin', 'key'),
      fresh: route('fresh', 'fresh-key'),
    },
    credentials: { key: { secret: 'secret-one-1234' } },
    callers: ['svc'],
    store: redis.url,
  }));
  a = await startTestProxy({ routes: {}, dir, store: redis.url });
  b = await startTestProxy({ routes: {}, dir, store: redis.url });
});

afterAll(async () => {
  await a?.close();
  await b?.close();
  await upstream?.close();
  await redis?.destroy();
});

const get = (proxy: TestProxy, path: string, token = tokens.svc!) => fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': token } });

describe('two instances, one Redis', () => {
  it('a route quota holds across both: 10 per window in all, the rest 429', async () => {
    const statuses: number[] = [];
    for (let i = 0; i < 30; i++) {
      const res = await get(i % 2 === 0 ? a : b, '/quota/x');
      statuses.push(res.status);
      await res.arrayBuffer();
    }
    expect(statuses.filter((s) => s === 200)).toHaveLength(10);
    expect(statuses.filter((s) => s === 429)).toHaveLength(20);
  });

  it('a caller added and a credential stored through the CLI work on the other instance within a second', async () => {
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const added = await runCli(['callers', 'add', 'late', '--json'], env);
    expect(added.code).toBe(0);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    const started = Date.now();
    await eventually(async () => (await get(b, '/open/x', token)).status === 200, 1_000, 'instance B to accept the new caller');
    expect(Date.now() - started).toBeLessThan(1_000);

    expect((await get(a, '/fresh/x')).status).toBe(503);
    expect((await runCli(['keys', 'put', 'fresh-key', '--from-stdin'], env, '{"secret":"secret-fresh-5678"}')).code).toBe(0);
    await eventually(async () => (await get(b, '/fresh/x')).status === 200, 1_000, 'instance B to use the new credential');
    expect(await (await get(a, '/fresh/x')).text()).toBe('secret-fresh-5678');
  });

  it('an upstream 429 with Retry-After seen by one instance pauses the route on both', async () => {
    expect((await get(a, '/paused/busy')).status).toBe(429);
    await eventually(async () => {
      const res = await get(b, '/paused/x');
      return res.status === 429 && res.headers.get('x-egress-error') === 'rate_limited';
    }, 1_000, 'instance B to honour the pause');
    // Paused: neither instance calls the upstream for this route until the Retry-After passes.
    const before = upstream.requests.length;
    expect((await get(b, '/paused/x')).status).toBe(429);
    expect((await get(a, '/paused/x')).status).toBe(429);
    expect(upstream.requests.length).toBe(before);
    expect((await get(b, '/open/x')).status).toBe(200);
  });

  it('the Redis store holds only ciphertext', async () => {
    const c = redis.client();
    const keys = await c.keys('egress:*');
    const values = await Promise.all(keys.filter((k) => k.includes(':credential:')).map((k) => c.get(k)));
    c.disconnect();
    expect(values.length).toBeGreaterThanOrEqual(2);
    for (const v of values) {
      expect(v).not.toContain('secret-one-1234');
      expect(v).not.toContain('secret-fresh-5678');
    }
  });

  it('an instance started after an upstream 429 honours the pause another instance took: it is kept in Redis, not only broadcast', async () => {
    expect((await get(a, '/held/long-busy')).status).toBe(429);
    const c = await startTestProxy({ routes: {}, dir, store: redis.url });
    try {
      const before = upstream.requests.length;
      const res = await get(c, '/held/x');
      expect(res.status).toBe(429);
      expect(res.headers.get('x-egress-error')).toBe('rate_limited');
      expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(25);
      expect(Number(res.headers.get('retry-after'))).toBeLessThanOrEqual(30);
      expect(upstream.requests.length).toBe(before);
      expect((await get(c, '/open/x')).status).toBe(200);
    } finally {
      await c.close();
    }
  });

  it('an instance whose subscriber was disconnected when the pause was broadcast learns it when the subscriber reconnects', async () => {
    const admin = redis.client();
    // Every subscriber is cut as soon as it comes back (ioredis waits 200 ms or more to reconnect),
    // until well after the 429: the broadcast reaches nobody.
    let cutting = true;
    const cut = (async () => {
      while (cutting) {
        await admin.call('CLIENT', 'KILL', 'TYPE', 'pubsub').catch(() => {});
        await new Promise((r) => setTimeout(r, 10));
      }
    })();
    try {
      await new Promise((r) => setTimeout(r, 50));
      expect((await get(a, '/rejoin/long-busy')).status).toBe(429);
      await new Promise((r) => setTimeout(r, 200));
    } finally {
      cutting = false;
      await cut;
    }
    await eventually(async () => {
      const res = await get(b, '/rejoin/x');
      return res.status === 429 && res.headers.get('x-egress-error') === 'rate_limited';
    }, 3_000, 'instance B to honour the pause once its subscriber is back');
    admin.disconnect();
  });
});
