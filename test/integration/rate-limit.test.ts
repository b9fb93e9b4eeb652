import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { apiKeyRoute } from '../helpers/routes.ts';
import { echo, startUpstream, type Upstream } from '../helpers/upstream.ts';

/** Rate limits as a caller of a running proxy (file store: the in-memory limiter) sees them. */
const inAMinute = () => new Date(Date.now() + 60_000).toUTCString();
/** Retry-After sent more than once, as field lines (each array element is one line), made when the answer is sent. */
const REPEATED: Record<string, () => string[]> = {
  lines: () => ['30', '30'],
  list: () => ['30, 20'],
  larger: () => ['20', '30, 10'],
  dates: () => [inAMinute(), inAMinute()],
  mixed: () => ['30', 'soon'],
  none: () => ['soon', 'later'],
};
let upstream: Upstream;
beforeAll(async () => {
  // /slow answers after 600 ms: a request that holds its caller's in-flight slot meanwhile.
  // /busy answers 429 with Retry-After: 30, the provider's quota spent.
  upstream = await startUpstream((req, res, body) => {
    if (req.url === '/slow') return void setTimeout(() => echo(req, res, body), 600);
    if (req.url === '/busy') return void res.writeHead(429, { 'retry-after': '30', 'content-type': 'application/json' }).end('{"error":"slow down"}');
    // /repeat/NAME answers 429 with the Retry-After field lines REPEATED[NAME] lists.
    const repeated = REPEATED[req.url!.replace(/^\/repeat\//, '')];
    if (req.url!.startsWith('/repeat/') && repeated) {
      res.setHeader('retry-after', repeated());
      return void res.writeHead(429).end('slow down');
    }
    echo(req, res, body);
  });
});
afterAll(async () => {
  await upstream?.close();
});

describe('rate limits on a running proxy', () => {
  let proxy: TestProxy | undefined;
  afterEach(async () => {
    await proxy?.close();
    proxy = undefined;
  });

  const get = (path: string, caller = 'svc') => fetch(`${proxy!.url}${path}`, { headers: { 'x-egress-token': proxy!.tokens[caller]! } });

  it('a limit raised by a reload applies within one of its own intervals: the bucket spent under the old, slower limit no longer refuses for the rest of its day', async () => {
    const route = (rate: string) => apiKeyRoute({ upstream: upstream.url, extra: `upstream_rate: { rate: ${rate}, burst: 1 }\n` });
    proxy = await startTestProxy({ routes: { api: route('1/day') }, credentials: { key: { secret: 'sk_rl_1' } }, callers: ['svc'] });
    expect((await get('/api/x')).status).toBe(200);
    const refused = await get('/api/x');
    expect(refused.status).toBe(429);
    expect(Number(refused.headers.get('retry-after'))).toBeGreaterThan(80_000);

    // The operator raises the quota: 10 a second, a burst of 1.
    await writeFile(join(proxy.routesDir, 'api.yaml'), route('10/s'));
    await eventually(() => proxy!.logs().includes('routes reloaded'), 5_000, 'the reload');
    // The bucket counts as spent under the new limit (as the Redis limiter has it): the next
    // request is told to come back within the new interval, 100 ms, and then it is served.
    const first = await get('/api/x');
    if (first.status === 429) expect(first.headers.get('retry-after')).toBe('1');
    await new Promise((r) => setTimeout(r, 150));
    const after = await get('/api/x');
    expect(after.status, `retry-after ${after.headers.get('retry-after')}`).toBe(200);
  });

  it('a request refused for its caller\'s in-flight limit spends nothing from the route\'s upstream quota, which other callers share', async () => {
    const route = apiKeyRoute({ upstream: upstream.url, callers: ['svc', 'web'], paths: ['/x', '/slow'], extra: 'upstream_rate: { rate: 4/min }\n' });
    proxy = await startTestProxy({ routes: { api: route }, credentials: { key: { secret: 'sk_rl_2' } }, callers: ['svc', 'web'], env: { EGRESS_CALLER_MAX_IN_FLIGHT: '1' } });
    const slow = get('/api/slow');
    await new Promise((r) => setTimeout(r, 200));
    // svc's one slot is taken: these are refused before anything is sent.
    for (let i = 0; i < 3; i++) {
      const refused = await get('/api/x');
      expect(refused.status).toBe(429);
      expect(await refused.text()).toContain('in flight');
    }
    expect((await slow).status).toBe(200);
    // One of the route's 4 a minute went upstream: web has the other 3.
    const web: number[] = [];
    for (let i = 0; i < 3; i++) web.push((await get('/api/x', 'web')).status);
    expect(web).toEqual([200, 200, 200]);
    expect((await get('/api/x', 'web')).status).toBe(429);
  });

  it('a refusal\'s RateLimit t is when the next request is allowed, as Retry-After says, not when the whole burst has refilled (draft-ietf-httpapi-ratelimit-headers-10 on)', async () => {
    // One request a second, a burst of 5: once the burst is spent, the next is allowed a second later.
    const route = apiKeyRoute({ upstream: upstream.url, extra: 'upstream_rate: { rate: 60/min, burst: 5 }\n' });
    proxy = await startTestProxy({ routes: { api: route }, credentials: { key: { secret: 'sk_rl_3' } }, callers: ['svc'] });
    for (let i = 0; i < 5; i++) expect((await get('/api/x')).status).toBe(200);
    const refused = await get('/api/x');
    expect(refused.status).toBe(429);
    expect(refused.headers.get('retry-after')).toBe('1');
    expect(refused.headers.get('ratelimit')).toBe('"upstream";r=0;t=1');
  });

  it('RateLimit-Policy states the rate the bucket allows: its burst over the seconds it takes to refill, or the rate as written when that is not whole seconds', async () => {
    const cases: [string, string][] = [
      // 1 a second with a burst of 5 is 5 per 5 s, not 5 a minute (12 times too few).
      ['{ rate: 60/min, burst: 5 }', '"caller";q=5;w=5'],
      // 20 a second with a burst of 40 is 40 per 2 s, not 40 a second (twice too many).
      ['{ rate: 20/s, burst: 40 }', '"caller";q=40;w=2'],
      // A burst of 1 at 7 a second refills in 1/7 s: the rate as written.
      ['{ rate: 7/s, burst: 1 }', '"caller";q=7;w=1'],
      ['{ rate: 2/min }', '"caller";q=2;w=60'],
    ];
    const routes: Record<string, string> = {};
    cases.forEach(([rate], i) => {
      routes[`r${i}`] = apiKeyRoute({ upstream: upstream.url, name: `r${i}` }).replace('    paths: [/x]\n', `    paths: [/x]\n    rate: ${rate}\n`);
    });
    proxy = await startTestProxy({ routes, credentials: { key: { secret: 'sk_rl_4' } }, callers: ['svc'] });
    for (const [i, [rate, policy]] of cases.entries()) {
      let res = await get(`/r${i}/x`);
      for (let n = 0; n < 50 && res.status === 200; n++) res = await get(`/r${i}/x`);
      expect(res.status, rate).toBe(429);
      expect(res.headers.get('ratelimit-policy'), rate).toBe(policy);
    }
  });

  it('an upstream 429 pauses the route for every caller, and the proxy\'s 429 meanwhile carries RateLimit with Retry-After, as every rate_limited answer does', async () => {
    const route = apiKeyRoute({ upstream: upstream.url, callers: ['svc', 'web'], paths: ['/x', '/busy'] });
    proxy = await startTestProxy({ routes: { api: route }, credentials: { key: { secret: 'sk_rl_5' } }, callers: ['svc', 'web'] });
    const busy = await get('/api/busy');
    expect(busy.status).toBe(429);
    expect(busy.headers.get('retry-after')).toBe('30');
    const before = upstream.requests.length;
    const paused = await get('/api/x', 'web');
    expect(paused.status).toBe(429);
    expect(paused.headers.get('x-egress-error')).toBe('rate_limited');
    const retry = Number(paused.headers.get('retry-after'));
    expect(retry).toBeGreaterThanOrEqual(29);
    expect(retry).toBeLessThanOrEqual(30);
    expect(paused.headers.get('ratelimit')).toBe(`"upstream";r=0;t=${retry}`);
    expect(upstream.requests.length).toBe(before);
  });

  it('an upstream 429 that sends Retry-After more than once (two field lines, or one line with a list) pauses the route for the largest value when every value parses, and not at all when one does not', async () => {
    const names = Object.keys(REPEATED);
    const routes = Object.fromEntries(names.map((name) => [name, apiKeyRoute({ upstream: upstream.url, name, paths: ['/x', `/repeat/${name}`] })]));
    proxy = await startTestProxy({ routes, credentials: { key: { secret: 'sk_rl_6' } }, callers: ['svc'] });
    const pausedFor: Record<string, number | 'not paused'> = {};
    for (const name of names) {
      expect((await get(`/${name}/repeat/${name}`)).status, name).toBe(429);
      const next = await get(`/${name}/x`);
      pausedFor[name] = next.status === 200 ? 'not paused' : Number(next.headers.get('retry-after'));
    }
    const about = (seconds: number) => expect.toSatisfy((n: unknown) => typeof n === 'number' && n >= seconds - 2 && n <= seconds);
    expect(pausedFor).toEqual({ lines: about(30), list: about(30), larger: about(30), dates: about(60), mixed: 'not paused', none: 'not paused' });
  });
});
