import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ConflictError } from '../../src/errors.ts';
import { newCredentialRecord } from '../../src/store/credentials.ts';
import { readKeyring } from '../../src/store/keyring.ts';
import { parseRedisUrl, serverMajorVersion, takesScriptFlags } from '../../src/store/redis-client.ts';
import { KEYS, RedisStore } from '../../src/store/redis-store.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { TestRedis, freePort } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** Redis breaks in each way it can; the proxy stays up, fails closed when it must, and recovers by itself. */
let redis: TestRedis;
let upstream: Upstream;
let proxy: TestProxy | undefined;
let dir: string;
let tokens: Record<string, string>;

const route = (name: string, credential: string) => `name: ${name}
prefix: /${name}
upstream: ${upstream.url}
allow_private_addresses: true
credential: ${credential}
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
upstream_rate: { rate: 100000/s }
allow:
  - caller: svc
    methods: [GET]
    paths: [/x]
    rate: { rate: 100000/s }
`;

beforeEach(async () => {
  redis = await TestRedis.create();
  upstream = await startUpstream();
  dir = await makeTempDir('egress-redis-faults-');
  ({ tokens } = await seedDataDir(dir, {
    routes: { a: route('a', 'cred-a'), b: route('b', 'cred-b'), c: route('c', 'cred-c'), d: route('d', 'cred-d') },
    credentials: { 'cred-a': { secret: 'secret-a-1234' }, 'cred-b': { secret: 'secret-b-1234' }, 'cred-c': { secret: 'secret-c-1234' }, 'cred-d': { secret: 'secret-d-1234' } },
    callers: ['svc'],
    store: redis.url,
  }));
});

afterEach(async () => {
  await proxy?.close();
  proxy = undefined;
  await upstream.close();
  await redis.destroy();
});

async function start(env: Record<string, string> = {}): Promise<TestProxy> {
  proxy = await startTestProxy({ routes: {}, dir, store: redis.url, env });
  return proxy;
}

/** An admin token made with the CLI, then the proxy started and serving it: the token. */
async function startWithAdminToken(env: Record<string, string>): Promise<string> {
  const created = await runCli(['admin-token', 'create', 'rotator', '--json'], env);
  expect(created.code, created.stderr).toBe(0);
  const admin = (JSON.parse(created.stdout) as { token: string }).token;
  await start();
  await eventually(async () => (await fetch(`${proxy!.admin}/v1/credentials`, { headers: { authorization: `Bearer ${admin}` } })).status === 200, 2_000, 'the admin token to load');
  return admin;
}

async function timed(path: string): Promise<{ status: number; ms: number; code: string | null }> {
  const started = performance.now();
  const res = await fetch(`${proxy!.url}${path}`, { headers: { 'x-egress-token': tokens.svc! } });
  await res.arrayBuffer();
  return { status: res.status, ms: performance.now() - started, code: res.headers.get('x-egress-error') };
}

async function ready(): Promise<{ status: number; body: { store: { error?: string } } }> {
  const res = await fetch(`${proxy!.admin}/readyz`);
  return { status: res.status, body: (await res.json()) as { store: { error?: string } } };
}

describe('Redis faults', () => {
  it('unreachable at start: the process starts, is not ready, answers a fast 503, and recovers by itself', async () => {
    await redis.stop();
    await start();
    const r = await ready();
    expect(r.status).toBe(503);
    expect(r.body.store.error).toBeTruthy();
    const first = await timed('/a/x');
    expect(first).toMatchObject({ status: 503, code: 'credential_unavailable' });
    expect(first.ms).toBeLessThan(500);
    await redis.start();
    await eventually(async () => (await timed('/a/x')).status === 200, 5_000, 'recovery once Redis is up');
    expect((await ready()).status).toBe(200);
  });

  it('dies mid-traffic: cached ciphertext serves for the bounded time, then 503; back when Redis returns', async () => {
    await start({ EGRESS_STORE_MAX_STALE: '2s' });
    expect((await timed('/a/x')).status).toBe(200);
    await redis.stop();
    // Still served from the cached ciphertext (rate limits fall back to this instance).
    for (let i = 0; i < 5; i++) expect((await timed('/a/x')).status).toBe(200);
    await eventually(async () => (await timed('/a/x')).status === 503, 6_000, 'the stale bound to pass');
    expect((await ready()).status).toBe(503);
    expect(proxy!.logs()).toContain('store unreachable');
    expect(proxy!.logs()).toContain('rate limits fall back to per-instance buckets');
    await redis.start();
    await eventually(async () => (await timed('/a/x')).status === 200, 5_000, 'recovery once Redis is back');
  });

  it('frozen (SIGSTOP): every call is bounded; latency stays bounded and nothing queues without limit', async () => {
    await start();
    expect((await timed('/a/x')).status).toBe(200);
    redis.freeze();
    try {
      const results = [];
      for (let i = 0; i < 20; i++) results.push(await timed('/a/x'));
      expect(results.every((r) => r.status === 200)).toBe(true);
      const worst = Math.max(...results.map((r) => r.ms));
      expect(worst).toBeLessThan(1_500);
      // Concurrency does not pile up either: while Redis stays frozen, one request at a time probes
      // it (and may wait out the command timeout); the others use per-instance limits at once.
      const rounds = [];
      for (let round = 0; round < 5; round++) {
        rounds.push(...(await Promise.all(Array.from({ length: 20 }, () => timed('/a/x')))));
        await new Promise((r) => setTimeout(r, 300));
      }
      expect(rounds.every((r) => r.status === 200)).toBe(true);
      expect(Math.max(...rounds.map((r) => r.ms))).toBeLessThan(2_000);
      expect(rounds.filter((r) => r.ms > 400).length).toBeLessThanOrEqual(6);
      expect((await fetch(`${proxy!.admin}/healthz`)).status).toBe(200);
    } finally {
      redis.thaw();
    }
    await eventually(async () => (await ready()).status === 200, 5_000, 'ready after thaw');
  });

  it('ratelimit_degraded: Redis frozen under the rate limiter reaches the webhook and egress_alerts_total; the recovery is logged; a second fall-back inside the cool-down is logged, not sent again', async () => {
    const hooks: { id: string; subject: string; severity: string }[] = [];
    const receiver = createServer((req, res) => {
      let body = '';
      req.on('data', (d: Buffer) => (body += d.toString()));
      req.on('end', () => {
        hooks.push(JSON.parse(body) as { id: string; subject: string; severity: string });
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
    await writeFile(join(dir, 'webhook.secret'), 'whsec_redis_faults_test_0123456789', { mode: 0o600 });
    try {
      await start({ EGRESS_ALERT_WEBHOOK: `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hook`, EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'webhook.secret') });
      expect((await timed('/a/x')).status).toBe(200);
      const degraded = () => hooks.filter((h) => h.id === 'ratelimit_degraded');
      let recoveries = 0;
      const fallBack = async () => {
        redis.freeze();
        try {
          expect((await timed('/a/x')).status).toBe(200);
        } finally {
          redis.thaw();
        }
        // Past the breaker, the next request asks Redis again and finds it answering.
        await eventually(async () => (await timed('/a/x')).status === 200 && proxy!.logs().split('rate limits are shared through Redis again').length > recoveries + 1, 5_000, 'shared limits again');
        recoveries++;
      };
      await fallBack();
      await eventually(() => degraded().length === 1, 5_000, 'the alert at the webhook');
      expect(degraded()[0]).toMatchObject({ severity: 'warning', subject: `redis://127.0.0.1:${redis.port}` });
      await fallBack();
      await new Promise((r) => setTimeout(r, 500));
      expect(degraded()).toHaveLength(1);
      expect(proxy!.logs().split('"msg":"Redis did not answer; rate limits fall back to per-instance buckets"').length - 1).toBe(2);
      const metrics = await (await fetch(`${proxy!.admin}/metrics`)).text();
      expect(metrics).toMatch(/egress_alerts_total\{alert="ratelimit_degraded",severity="warning"\} 1/);
    } finally {
      receiver.closeAllConnections();
      await new Promise<void>((r) => receiver.close(() => r()));
    }
  });

  it('garbage in Redis (wrong type, truncated record, another credential\'s record) fails those credentials closed; others work', async () => {
    await start();
    expect((await timed('/a/x')).status).toBe(200);
    const c = redis.client();
    const other = await c.get(KEYS.record('credential', 'cred-d'));
    await c.del(KEYS.record('credential', 'cred-a'));
    await c.lpush(KEYS.record('credential', 'cred-a'), 'not a string');
    await c.set(KEYS.record('credential', 'cred-b'), other!.slice(0, other!.length / 2));
    await c.set(KEYS.record('credential', 'cred-c'), other!);
    await c.incr(KEYS.version);
    c.disconnect();
    await eventually(async () => (await timed('/a/x')).status === 503, 3_000, 'the damaged credentials to fail closed');
    for (const path of ['/a/x', '/b/x', '/c/x']) expect(await timed(path)).toMatchObject({ status: 503, code: 'credential_unavailable' });
    expect((await timed('/d/x')).status).toBe(200);
    expect(upstream.requests.filter((r) => r.headers['x-api-key'] === 'secret-d-1234' && r.url === '/x').length).toBe(1);
    const logs = proxy!.logs();
    expect(logs).toContain('store_record_damaged');
    for (const s of ['secret-a-1234', 'secret-b-1234', 'secret-c-1234', 'secret-d-1234']) expect(logs).not.toContain(s);
  });

  it('rollback protection: a record put back to an older revision is not accepted', async () => {
    await start();
    const c = redis.client();
    const key = KEYS.record('caller', 'svc');
    const old = await c.get(key);
    c.disconnect();
    expect((await runCli(['callers', 'revoke', 'svc'], envFor(dir, { EGRESS_STORE: redis.url }))).code).toBe(0);
    await eventually(async () => (await timed('/a/x')).status === 401, 1_000, 'the revocation');
    // Someone restores the old, unrevoked record.
    const c2 = redis.client();
    await c2.set(key, old!);
    await c2.incr(KEYS.version);
    c2.disconnect();
    await new Promise((r) => setTimeout(r, 1_000));
    expect((await timed('/a/x')).status).toBe(401);
    expect(proxy!.logs()).toContain('store_rollback');
  });

  it('rollback protection: a copy of an earlier incarnation is not accepted, whatever its revision; adding a revoked caller again is an ordinary change', async () => {
    await start();
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const c = redis.client();
    const key = KEYS.record('caller', 'svc');
    const first = JSON.parse((await c.get(key))!) as { revision: number; created_at: string };
    expect((await runCli(['callers', 'revoke', 'svc'], env)).code).toBe(0);
    // The seeded record and the one added again must not share a millisecond.
    await new Promise((r) => setTimeout(r, 5));
    const added = await runCli(['callers', 'add', 'svc', '--json'], env);
    expect(added.code, added.stderr).toBe(0);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    const call = async (t: string) => (await fetch(`${proxy!.url}/a/x`, { headers: { 'x-egress-token': t } })).status;
    await eventually(async () => (await call(token)) === 200, 3_000, 'the caller added again');
    const second = JSON.parse((await c.get(key))!) as { revision: number; created_at: string };
    expect(second.revision).toBe(3);
    expect(second.created_at > first.created_at).toBe(true);
    // Someone restores the first incarnation's record, with a revision above every one seen.
    await c.set(key, JSON.stringify({ ...first, revision: 99 }));
    await c.incr(KEYS.version);
    c.disconnect();
    await eventually(() => proxy!.logs().includes('store_rollback'), 3_000, 'store_rollback alert');
    expect(await call(tokens.svc!)).toBe(401);
    expect(await call(token)).toBe(200);
    expect(proxy!.logs()).not.toContain('store_new_incarnation');
  });

  it('a replica (READONLY) takes no write: the CLI and the admin API say so (exit 1, 503 store_unavailable), nothing is written, requests go on', async () => {
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const admin = await startWithAdminToken(env);
    // A replica of a primary that is not there: it keeps its data, answers reads, refuses writes.
    const c = redis.client();
    await c.call('REPLICAOF', '127.0.0.1', String(await freePort()));
    await expect(c.set('egress:replica-probe', '1')).rejects.toThrow(/READONLY/);
    const before = await c.get(KEYS.version);

    const rotate = await runCli(['keys', 'rotate', 'cred-a', '--from-stdin'], env, JSON.stringify({ secret: 'secret-a-NEW-5678' }));
    expect(rotate.code).toBe(1);
    expect(rotate.stderr).toBe(`egress: the store redis://127.0.0.1:${redis.port} is a read-only replica (READONLY): writes go to the primary; nothing was written\n`);
    const res = await fetch(`${proxy!.admin}/v1/credentials/cred-a/versions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' },
      body: JSON.stringify({ fields: { secret: 'secret-a-NEW-5678' }, stage: true }),
    });
    const text = await res.text();
    expect(res.status).toBe(503);
    expect(JSON.parse(text)).toMatchObject({ error: { code: 'store_unavailable' } });
    expect(text).not.toContain('secret-a-NEW-5678');
    expect(await c.get(KEYS.version)).toBe(before);
    c.disconnect();
    expect((await timed('/a/x')).status).toBe(200);
    expect(upstream.requests.at(-1)?.headers['x-api-key']).toBe('secret-a-1234');
  });

  it('down: the CLI and the admin API say the store is unreachable (exit 1, 503 store_unavailable) instead of an ioredis error', async () => {
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const admin = await startWithAdminToken(env);
    await redis.stop();
    for (const args of [['keys', 'list'], ['callers', 'add', 'robot']]) {
      const res = await runCli(args, env);
      expect(res.code, args.join(' ')).toBe(1);
      expect(res.stderr).toBe(`egress: the store redis://127.0.0.1:${redis.port} is unreachable (ECONNREFUSED): nothing was read or written\n`);
    }
    const res = await fetch(`${proxy!.admin}/v1/callers`, {
      method: 'POST',
      headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'robot' }),
    });
    expect(res.status).toBe(503);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('store_unavailable');
  });

  it('a master key floor edited into something that is not a whole number (1e999, inf, 2.5, 9e99, 20 digits) counts as no floor, as `master-key status` reports it, and master-key rotate sets it again', async () => {
    const keyring = await readKeyring(join(dir, 'master.key'));
    const store = new RedisStore(parseRedisUrl(redis.url));
    const c = redis.client();
    try {
      for (const [n, garbage] of ['1e999', 'inf', '2.5', '9e99', '99999999999999999999'].entries()) {
        await c.set(KEYS.kekFloor, garbage);
        expect(await store.kekFloor(), garbage).toBe(0);
        // Before: every new data key was refused for good (a leaked key could not be rotated).
        await expect(store.put('credential', newCredentialRecord(keyring, `floor-${n}`, { secret: 'x' }, new Date()), 0), garbage).resolves.toBeUndefined();
        await store.raiseKekFloor(2);
        expect(await store.kekFloor(), garbage).toBe(2);
        const refused = await store.put('credential', newCredentialRecord(keyring, `floor-${n}-after`, { secret: 'x' }, new Date()), 0).catch((err: unknown) => err);
        expect(refused, garbage).toBeInstanceOf(ConflictError);
        expect((refused as Error).message, garbage).toContain('from master key version 2 on');
      }
    } finally {
      c.disconnect();
      await store.close();
    }
  });
  /** A kraken credential in the Redis store and a route to the upstream for it, then the proxy. */
  async function startKraken(): Promise<void> {
    const keyring = await readKeyring(join(dir, 'master.key'));
    const store = new RedisStore(parseRedisUrl(redis.url));
    await store.put('credential', newCredentialRecord(keyring, 'kraken', { api_key: 'key-1', api_secret: Buffer.from('kraken-secret-1234').toString('base64') }, new Date()), 0);
    await store.close();
    await writeFile(join(dir, 'routes', 'k.yaml'), `name: k\nprefix: /k\nallow_private_addresses: true\ncredential: kraken\npreset: kraken\nupstream: ${upstream.url}\nallow:\n  - caller: svc\n    methods: [POST]\n    paths: [/0/private/*]\n`);
    await start();
  }
  it('a Kraken nonce with Redis frozen, down, or its nonce key damaged: a clean 503 and nothing sent, never a 500; a damaged value starts again from the clock', async () => {
    await startKraken();
    const post = async () => {
      const started = performance.now();
      const res = await fetch(`${proxy!.url}/k/0/private/Balance`, { method: 'POST', headers: { 'x-egress-token': tokens.svc!, 'content-type': 'application/x-www-form-urlencoded' }, body: 'asset=ZUSD' });
      await res.arrayBuffer();
      return { status: res.status, code: res.headers.get('x-egress-error'), ms: performance.now() - started };
    };
    const nonceSent = () => BigInt(new URLSearchParams(upstream.requests.at(-1)!.body.toString()).get('nonce')!);
    expect((await post()).status).toBe(200);
    const first = nonceSent();
    const c = redis.client();
    const key = 'egress:nonce:{kraken}';
    try {
      // Damaged: another type, not a number, past what a nonce can be (2^53 and up, infinity).
      for (const damage of [() => c.del(key).then(() => c.lpush(key, 'x')), () => c.set(key, 'abc'), () => c.set(key, '1e999'), () => c.set(key, '99999999999999999999999')]) {
        await damage();
        const sent = upstream.requests.length;
        const res = await post();
        expect(res.status, JSON.stringify(res)).toBe(200);
        expect(upstream.requests.length).toBe(sent + 1);
        const nonce = nonceSent();
        expect(nonce > first).toBe(true);
        // The clock in microseconds again: not far ahead of it.
        expect(nonce < BigInt(Date.now() + 60_000) * 1000n).toBe(true);
      }
      const sent = upstream.requests.length;
      redis.freeze();
      try {
        const frozen = await post();
        expect(frozen.code, JSON.stringify(frozen)).toBe('credential_unavailable');
        expect(frozen.status).toBe(503);
        expect(frozen.ms).toBeLessThan(1_500);
      } finally {
        redis.thaw();
      }
      await redis.stop();
      const down = await post();
      expect(down.code, JSON.stringify(down)).toBe('credential_unavailable');
      expect(down.status).toBe(503);
      expect(upstream.requests.length).toBe(sent);
      expect(proxy!.logs()).not.toContain('unexpected error in the request path');
      expect(proxy!.logs()).not.toContain('kraken-secret-1234');
    } finally {
      c.disconnect();
    }
  });
  it('a Kraken nonce after Redis lost its data: still above every nonce this instance was given, also when those ran ahead of the clock Redis came back with (Kraken refuses a lower one: EAPI:Invalid nonce)', async () => {
    await startKraken();
    const post = async () => {
      const res = await fetch(`${proxy!.url}/k/0/private/Balance`, { method: 'POST', headers: { 'x-egress-token': tokens.svc!, 'content-type': 'application/x-www-form-urlencoded' }, body: 'asset=ZUSD' });
      await res.arrayBuffer();
      return res.status;
    };
    const nonceSent = () => BigInt(new URLSearchParams(upstream.requests.at(-1)!.body.toString()).get('nonce')!);
    // Nonces given while Redis's clock was a minute ahead (a host whose clock was wrong, since
    // replaced), as the counter holds them.
    const c = redis.client();
    await c.set('egress:nonce:{kraken}', String((BigInt(Date.now()) + 60_000n) * 1000n));
    c.disconnect();
    expect(await post()).toBe(200);
    const last = nonceSent();
    expect(last > BigInt(Date.now() + 30_000) * 1000n).toBe(true);
    // Redis restarted without its data, on a clock that is right: the counter is gone.
    await redis.wipe();
    await redis.start();
    await eventually(async () => (await post()) === 200, 5_000, 'requests through Redis again');
    expect(nonceSent() > last).toBe(true);
    expect(await post()).toBe(200);
    expect(nonceSent() > last).toBe(true);
  });

  it('a Redis that evicts any key under memory pressure (maxmemory-policy allkeys-*) is reported (alert store_evicts) at start and when set on a running Redis; noeviction and volatile-* are not', async () => {
    const c = redis.client();
    try {
      await start();
      expect(proxy!.logs()).not.toContain('store_evicts');
      await c.config('SET', 'maxmemory-policy', 'allkeys-lru');
      // A setting changed under a running instance is seen on its next connection.
      await c.call('CLIENT', 'KILL', 'TYPE', 'normal');
      await eventually(async () => proxy!.logs().includes('"alert":"store_evicts"'), 3_000, 'the eviction alert');
      const line = proxy!.logs().split('\n').find((l) => l.includes('"alert":"store_evicts"'))!;
      expect(JSON.parse(line)).toMatchObject({ severity: 'critical', maxmemory_policy: 'allkeys-lru' });
      await proxy!.close();
      proxy = undefined;
      await start();
      await eventually(async () => proxy!.logs().includes('"alert":"store_evicts"'), 3_000, 'the eviction alert at start');
      await c.config('SET', 'maxmemory-policy', 'volatile-lru');
      await proxy!.close();
      proxy = undefined;
      await start();
      await new Promise((r) => setTimeout(r, 500));
      expect(proxy!.logs()).not.toContain('store_evicts');
    } finally {
      c.disconnect();
    }
  });

  it('a credential\'s usage key damaged (another type): keys show and the admin API still describe the credential, and the next usage flush writes it afresh', async () => {
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const admin = await startWithAdminToken(env);
    const c = redis.client();
    try {
      await c.lpush(KEYS.usage('cred-a'), 'not a hash');
      const show = await runCli(['keys', 'show', 'cred-a', '--json'], env);
      expect(show.code, show.stderr).toBe(0);
      expect(show.stdout).toContain('cred-a');
      const res = await fetch(`${proxy!.admin}/v1/credentials/cred-a`, { headers: { authorization: `Bearer ${admin}` } });
      expect(res.status).toBe(200);
      expect((await timed('/a/x')).status).toBe(200);
      await proxy!.services().usage.flush();
      expect(await c.type(KEYS.usage('cred-a'))).toBe('hash');
      expect(Object.keys(await c.hgetall(KEYS.usage('cred-a')))).toEqual(['1|svc']);
      expect(proxy!.logs()).not.toContain('could not record credential usage');
    } finally {
      c.disconnect();
    }
  });
  it('a script cache emptied under the proxy (SCRIPT FLUSH, as after a restart without persistence) costs no request and no shared limit', async () => {
    await start();
    expect((await timed('/a/x')).status).toBe(200);
    const c = redis.client();
    await c.script('FLUSH');
    const statuses = await Promise.all(Array.from({ length: 20 }, () => timed('/a/x').then((r) => r.status)));
    expect(statuses.every((s) => s === 200)).toBe(true);
    // The limits were checked in Redis (the script was loaded again), not by the per-instance fallback.
    const keys = await c.keys('egress:rl:*');
    c.disconnect();
    expect(keys.length).toBeGreaterThan(0);
    expect(proxy!.logs()).not.toContain('ratelimit_degraded');
  });
  it('a store read that fails while the version counter still answers is retried: the instance does not stay unready once Redis is right again', async () => {
    await start({ EGRESS_STORE_MAX_STALE: '1s' });
    expect((await timed('/a/x')).status).toBe(200);
    const c = redis.client();
    try {
      // A read of the store that fails (an index of the wrong type: the load script errors, as a
      // read past the command timeout does) on a change the version poll sees; the poll's GET
      // keeps answering with the same counter.
      await c.set(KEYS.index('admin'), 'not a set');
      await c.incr(KEYS.version);
      await eventually(async () => (await ready()).body.store.error !== undefined, 3_000, 'the read to fail');
      // Redis is right again, repaired by hand: no write through the proxy, no change counted.
      await c.del(KEYS.index('admin'));
      await eventually(async () => (await ready()).status === 200, 3_000, 'ready again without another change');
      expect((await timed('/a/x')).status).toBe(200);
    } finally {
      c.disconnect();
    }
  });
  it('frozen under a connected proxy: the admin API answers 503 store_unavailable (not 500) for a read and a write, and leaks nothing', async () => {
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const admin = await startWithAdminToken(env);
    redis.freeze();
    try {
      const headers = { authorization: `Bearer ${admin}`, 'content-type': 'application/json' };
      const list = await fetch(`${proxy!.admin}/v1/callers`, { headers });
      const listBody = (await list.json()) as { error: { code: string; message: string } };
      expect(list.status).toBe(503);
      expect(listBody.error.code).toBe('store_unavailable');
      expect(listBody.error.message).toContain('did not answer');
      const add = await fetch(`${proxy!.admin}/v1/callers`, { method: 'POST', headers, body: JSON.stringify({ name: 'robot' }) });
      const addText = await add.text();
      expect(add.status).toBe(503);
      expect(JSON.parse(addText)).toMatchObject({ error: { code: 'store_unavailable' } });
      expect(addText).not.toContain(admin);
    } finally {
      redis.thaw();
    }
  });
  it('down under a connected proxy: the status page answers within one bounded wait for the store, not one per credential, and still lists every credential', async () => {
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const admin = await startWithAdminToken(env);
    await redis.stop();
    const started = performance.now();
    const page = await fetch(`${proxy!.admin}/`, { headers: { authorization: `Bearer ${admin}` } });
    const html = await page.text();
    const ms = performance.now() - started;
    expect(page.status).toBe(200);
    for (const id of ['cred-a', 'cred-b', 'cred-c', 'cred-d']) expect(html).toContain(`<h3>${id}</h3>`);
    // Each last-use read waits for the store (up to its connect timeout): four in a row took 2.4 s, together 0.2 s.
    expect(ms).toBeLessThan(1_200);
  });

  it('a write pause (CLIENT PAUSE WRITE, as FAILOVER makes) holds no store read: the store reads and the admin API lists while a write waits', async () => {
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const admin = await startWithAdminToken(env);
    const store = new RedisStore(parseRedisUrl(redis.url));
    const c = redis.client();
    const writer = redis.client();
    try {
      await store.load();
      // A server that has not seen the read script yet, as after a restart or a failover.
      await c.script('FLUSH');
      await c.call('CLIENT', 'PAUSE', '20000', 'WRITE');
      let written = false;
      const write = writer.set('egress:test:during-pause', '1').then(() => {
        written = true;
      });
      const snapshot = await store.load();
      expect(snapshot.credentials.has('cred-a')).toBe(true);
      const list = await fetch(`${proxy!.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } });
      expect(list.status).toBe(200);
      expect(((await list.json()) as { callers: { name: string }[] }).callers.map((x) => x.name)).toContain('svc');
      // The pause was in force throughout: the write is still held.
      expect(written).toBe(false);
      await c.call('CLIENT', 'UNPAUSE');
      await write;
    } finally {
      await c.call('CLIENT', 'UNPAUSE').catch(() => {});
      c.disconnect();
      writer.disconnect();
      await store.close();
    }
  });
  it('a server that refuses HELLO (Redis 6.0 and older) gets the read script as written, by EVALSHA and EVAL, and reads work', async () => {
    const old = await TestRedis.create({ args: ['--rename-command', 'HELLO', ''] });
    const store = new RedisStore(parseRedisUrl(old.url));
    const c = old.client();
    try {
      const snapshot = await store.load();
      expect(snapshot.credentials.size).toBe(0);
      expect(await takesScriptFlags(store.client)).toBe(false);
      const stats = (await c.info('commandstats')) as string;
      expect(stats).toMatch(/cmdstat_eval:/);
      expect(stats).not.toMatch(/cmdstat_eval(sha)?_ro:/);
    } finally {
      c.disconnect();
      await store.close();
      await old.destroy();
    }
  });
  it('a Redis 7 that refuses EVALSHA_RO and EVAL_RO (a Cluster node not upgraded yet behind an upgraded one, an ACL that lists the commands the store used before) still reads, by EVALSHA and EVAL', async () => {
    for (const [what, args, user] of [
      ['the commands renamed away', ['--rename-command', 'EVALSHA_RO', '', '--rename-command', 'EVAL_RO', ''], ''],
      ['an ACL without them', [], 'egress:pw@'],
    ] as const) {
      const server = await TestRedis.create({ args });
      const c = server.client();
      if (user) await c.call('ACL', 'SETUSER', 'egress', 'on', '>pw', '~*', '&*', '+@all', '-evalsha_ro', '-eval_ro');
      await c.set(KEYS.version, '1');
      const store = new RedisStore(parseRedisUrl(server.url.replace('redis://', `redis://${user}`)));
      try {
        const snapshot = await store.load().catch((err: Error) => err);
        expect(snapshot instanceof Error ? snapshot.message : 'read', what).toBe('read');
        expect((await store.load()).credentials.size, what).toBe(0);
        // The server says it is Redis 7 or later: the read went the old way because it was refused.
        expect(serverMajorVersion(await c.hello()), what).toBeGreaterThanOrEqual(7);
      } finally {
        c.disconnect();
        await store.close();
        await server.destroy();
      }
    }
  });
});
