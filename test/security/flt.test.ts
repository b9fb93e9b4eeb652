import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { CANARY, forms, startLab, type Lab } from './lab.ts';

/** FLT: faults in Redis, the file system and route writes leave the proxy up and fail closed or documented. */
let u: Upstream;
beforeAll(async () => {
  u = await startUpstream((_req, res) => res.end('{}'));
});
afterAll(async () => {
  await u?.close();
});

const route = (rate = '') => `name: r
prefix: /r
upstream: ${u.url}
allow_private_addresses: true
credential: c
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
allow:
  - caller: a
    methods: [GET]
    paths: [/x]
${rate}`;

async function alive(serve: ServeProcess): Promise<void> {
  expect((await fetch(`${serve.admin}/healthz`)).status).toBe(200);
  expect(serve.child.exitCode).toBeNull();
  for (const f of forms(CANARY)) expect(serve.output()).not.toContain(f);
}

async function call(serve: ServeProcess, token: string): Promise<{ status: number; ms: number }> {
  const t0 = performance.now();
  const res = await fetch(`${serve.url}/r/x`, { headers: { 'x-egress-token': token } });
  await res.arrayBuffer();
  return { status: res.status, ms: performance.now() - t0 };
}

describe('FLT', () => {
  it('FLT-01 Redis down at startup: starts, not ready, fast 503 (no hang), recovers when Redis returns', async () => {
    const redis = await TestRedis.create();
    const dir = await makeTempDir('egress-flt01-');
    const { tokens } = await seedDataDir(dir, { routes: { r: route('    rate: { rate: 100/s }\n') }, credentials: { c: { secret: CANARY } }, callers: ['a'], store: redis.url });
    await redis.stop();
    const serve = await startServe(envFor(dir, { EGRESS_STORE: redis.url }));
    try {
      expect((await fetch(`${serve.admin}/readyz`)).status).toBe(503);
      const mark = u.requests.length;
      for (let i = 0; i < 3; i++) {
        const r = await call(serve, tokens.a!);
        expect(r.status).toBe(503);
        expect(r.ms).toBeLessThan(1_500);
      }
      expect(u.requests.length).toBe(mark);
      await redis.start();
      // Reconnects back off up to 2 s; on a loaded 2-core CI machine the child may need several rounds.
      await eventually(async () => (await call(serve, tokens.a!)).status === 200, 15_000, 'recovery');
      await alive(serve);
    } finally {
      await serve.stop();
      await redis.destroy();
    }
  }, 30_000);

  it('FLT-05 garbage in rate-limit keys (odd values, odd TTLs) and FLUSHALL mid-window: no crash, no 500, limits still apply', async () => {
    const redis = await TestRedis.create();
    const dir = await makeTempDir('egress-flt05-');
    const { tokens } = await seedDataDir(dir, { routes: { r: route('    rate: { rate: 1/h, burst: 2 }\n') }, credentials: { c: { secret: CANARY } }, callers: ['a'], store: redis.url });
    const serve = await startServe(envFor(dir, { EGRESS_STORE: redis.url }));
    const c = redis.client();
    try {
      expect((await call(serve, tokens.a!)).status).toBe(200);
      const keys = await c.keys('egress:rl:*');
      expect(keys.length).toBeGreaterThan(0);
      const seen: number[] = [];
      for (const value of ['abc', '-1', '1e308', '99999999999999999999999', '', '\u0000\u00ff', 'NaN']) {
        for (const k of keys) await c.set(k, value);
        seen.push((await call(serve, tokens.a!)).status);
      }
      for (const k of keys) await c.pexpire(k, 1);
      seen.push((await call(serve, tokens.a!)).status);
      for (const k of keys) {
        await c.del(k);
        await c.lpush(k, 'wrong type');
      }
      seen.push((await call(serve, tokens.a!)).status);
      for (const s of seen) expect([200, 429, 503]).toContain(s);
      await alive(serve);
      // Clean keys: the limit applies again (burst 2, then 429).
      for (const k of await c.keys('egress:rl:*')) await c.del(k);
      const after = [await call(serve, tokens.a!), await call(serve, tokens.a!), await call(serve, tokens.a!)].map((r) => r.status);
      expect(after.filter((s) => s === 200).length).toBeLessThanOrEqual(2);
      expect(after).toContain(429);
      // FLUSHALL mid-window: nothing crashes; no 500; requests are 200/429 or fail closed (503).
      await c.flushall();
      const flushed = [];
      for (let i = 0; i < 4; i++) flushed.push((await call(serve, tokens.a!)).status);
      for (const s of flushed) expect([200, 429, 503]).toContain(s);
      expect(flushed.filter((s) => s === 200).length).toBeLessThanOrEqual(2);
      await alive(serve);
    } finally {
      c.disconnect();
      await serve.stop();
      await redis.destroy();
    }
  }, 30_000);

  it('FLT-07 401 on the new key during grace: a non-replay-safe POST is not re-sent with the previous key (GET fallback: flt-fallback.test.ts)', async () => {
    const NEW = 'sk_new_REJECTED_00aa';
    const lab: Lab = await startLab({
      upstream: (req, res) => {
        res.writeHead(req.headers['plaid-secret'] === NEW ? 401 : 200, { 'content-type': 'application/json' });
        res.end('{}');
      },
    });
    try {
      const { runCli } = await import('../helpers/cli.ts');
      const r = await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '1h'], envFor(lab.dir), JSON.stringify({ client_id: 'client_new', secret: NEW }));
      expect(r.code, r.stderr).toBe(0);
      await eventually(() => lab.u.requests.length >= 0, 100);
      await new Promise((res) => setTimeout(res, 1_200));
      const mark = lab.u.requests.length;
      const post = await fetch(`${lab.url}/plaid/accounts/get`, { method: 'POST', headers: { 'x-egress-token': lab.tokens.a, 'content-type': 'application/json' }, body: '{}' });
      lab.seen(await post.text());
      expect(post.status).toBe(401);
      expect(lab.u.requests.slice(mark).map((q) => q.headers['plaid-secret'])).toEqual([NEW]);
      await lab.g0(mark, 1);
    } finally {
      await lab.close();
    }
  }, 30_000);

  it('FLT-11 a route file written in two halves (within the debounce) never applies the half state', async () => {
    const lab: Lab = await startLab();
    try {
      const file = join(lab.dir, 'routes', 'plaid.yaml');
      const { readFile } = await import('node:fs/promises');
      const full = (await readFile(file, 'utf8')).replace('paths: [/institutions/*]', 'paths: [/institutions/*, /categories/get]');
      // The first half ends right after PLAID-CLIENT-ID: valid YAML, but without the secret header.
      const cut = full.indexOf('    PLAID-SECRET');
      const mark = lab.u.requests.length;
      await writeFile(file, full.slice(0, cut));
      const polls: Promise<void>[] = [];
      const poll = async () => {
        const res = await fetch(`${lab.url}/plaid/institutions/x`, { headers: { 'x-egress-token': lab.tokens.b } });
        lab.seen(await res.text());
      };
      polls.push(poll());
      await new Promise((r) => setTimeout(r, 40));
      polls.push(poll());
      await writeFile(file, full);
      for (let i = 0; i < 10; i++) {
        polls.push(poll());
        await new Promise((r) => setTimeout(r, 50));
      }
      await Promise.all(polls);
      await eventually(async () => (await fetch(`${lab.url}/plaid/categories/get`, { headers: { 'x-egress-token': lab.tokens.b } })).status === 200, 3_000, 'new config applied');
      // Every request that reached U carried both halves of the credential.
      for (const r of lab.u.requests.slice(mark)) expect(r.headers['plaid-secret'], r.url).toBe(CANARY);
      await lab.g0();
    } finally {
      await lab.close();
    }
  }, 30_000);

  it('FLT-15 disk full for the audit log (/dev/full): the proxy stays up, raises audit_write_failed, leaks nothing', async () => {
    const dir = await makeTempDir('egress-flt15-');
    const { tokens } = await seedDataDir(dir, { routes: { r: route() }, credentials: { c: { secret: CANARY } }, callers: ['a'] });
    const serve = await startServe(envFor(dir, { EGRESS_AUDIT_LOG: '/dev/full' })).catch((err: Error) => err);
    if (serve instanceof Error) {
      // Refusing to start without a writable audit log is also safe: non-zero exit and no secret.
      expect(serve.message).toMatch(/exited with [1-9]/);
      expect(serve.message).not.toContain(CANARY);
      return;
    }
    try {
      const statuses = [];
      for (let i = 0; i < 5; i++) statuses.push((await call(serve, tokens.a!)).status);
      for (const s of statuses) expect([200, 503]).toContain(s);
      await eventually(() => serve.output().includes('audit_write_failed'), 3_000, 'audit_write_failed alert');
      await alive(serve);
    } finally {
      await serve.stop();
    }
  }, 30_000);
});
