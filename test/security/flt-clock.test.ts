import { existsSync, readdirSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { CANARY, forms, startLab } from './lab.ts';
import { bankRoute, basic, connectTunnel, faultRoute, makeCerts } from './sec-helpers.ts';

/**
 * FLT-09 clock skew. The serve child runs under libfaketime (Debian `faketime`, LD_PRELOAD) with
 * only its wall clock (CLOCK_REALTIME) moved, as a wrong or stepped system clock moves it; the
 * monotonic clock is left alone (FAKETIME_DONT_FAKE_MONOTONIC). The offset is read from a file the
 * test rewrites, so the clock can also step while the process runs (picked up within 1 s). Deadlines
 * must run on the monotonic clock, rate windows on Redis's TIME, and grace ends on one clock that
 * every instance shares, so that no instance retires a credential version early or late. (Checks
 * made per request on an instance's own clock, whether a previous version may still serve a
 * fallback and whether a caller token has expired, are off by at most that instance's skew and
 * change nothing in the store.)
 */
const LIBFAKETIME = ['/usr/lib', '/usr/lib64', '/usr/local/lib']
  .flatMap((root) => (existsSync(root) ? readdirSync(root).map((d) => join(root, d, 'faketime', 'libfaketime.so.1')) : []))
  .concat(['/usr/lib/faketime/libfaketime.so.1'])
  .find((p) => existsSync(p));

let u: Upstream;
let hung: Upstream;
beforeAll(async () => {
  expect(LIBFAKETIME, 'libfaketime is installed (apt-get install faketime; .ci/run does)').toBeDefined();
  u = await startUpstream((_req, res) => res.end('{}'));
  // An upstream that never answers: only the route's response deadline ends the request.
  hung = await startUpstream(() => undefined);
});
afterAll(async () => {
  await u?.close();
  await hung?.close();
});

/** A file holding the child's wall-clock offset ("+1h", "-1h", "+0"), and the env that applies it. */
async function skewedClock(offset: string): Promise<{ env: Record<string, string>; set(offset: string): Promise<void> }> {
  const file = join(await makeTempDir('egress-faketime-'), 'offset');
  await writeFile(file, `${offset}\n`);
  return {
    env: { LD_PRELOAD: LIBFAKETIME!, FAKETIME_TIMESTAMP_FILE: file, FAKETIME_CACHE_DURATION: '1', FAKETIME_DONT_FAKE_MONOTONIC: '1' },
    set: (next: string) => writeFile(file, `${next}\n`),
  };
}

/** The child's wall clock minus ours, in hours, from the Date header its admin listener sends. */
async function skewHours(serve: ServeProcess): Promise<number> {
  const res = await fetch(`${serve.admin}/healthz`);
  await res.arrayBuffer();
  return Math.round((Date.parse(res.headers.get('date')!) - Date.now()) / 3_600_000);
}


async function get(serve: ServeProcess, token: string): Promise<{ status: number; ms: number; headers: Headers }> {
  const t0 = performance.now();
  const res = await fetch(`${serve.url}/r/x`, { headers: { 'x-egress-token': token } });
  await res.arrayBuffer();
  return { status: res.status, ms: performance.now() - t0, headers: res.headers };
}

const V2_SECRET = 'sk_v2_CANARY_9e21';

function clean(serve: ServeProcess): void {
  expect(serve.child.exitCode, 'process alive').toBeNull();
  for (const f of [...forms(CANARY), ...forms(V2_SECRET)]) expect(serve.output()).not.toContain(f);
}

describe('FLT-09 clock skew', () => {
  it('FLT-09a route deadlines run on the monotonic clock: a 3 s response timeout fires after 3 s when the wall clock steps an hour forward or back mid-request', async () => {
    const clock = await skewedClock('+0');
    const dir = await makeTempDir('egress-flt09a-');
    const { tokens } = await seedDataDir(dir, { routes: { r: faultRoute(hung.url, { route: 'timeouts: { connect: 2s, response: 3s }\n' }) }, credentials: { c: { secret: CANARY } }, callers: ['a'] });
    const serve = await startServe(envFor(dir, clock.env));
    try {
      for (const [step, hours] of [['+1h', 1], ['-1h', -1]] as const) {
        const pending = get(serve, tokens.a!);
        await new Promise((r) => setTimeout(r, 200));
        await clock.set(step);
        const { status, ms } = await pending;
        // The step was in effect while the request waited (libfaketime re-reads the offset each second).
        expect(await skewHours(serve), `wall clock stepped ${step}`).toBe(hours);
        console.log(`FLT-09 deadline: wall clock stepped ${step} mid-request: ${status} after ${ms.toFixed(0)} ms (route response timeout 3 s)`);
        expect(status).toBe(504);
        expect(ms, 'not early').toBeGreaterThanOrEqual(2_900);
        // undici checks its timers about once a second; an hour's step would show as 0 s or 3,600 s.
        expect(ms, 'not late').toBeLessThan(6_000);
      }
      clean(serve);
    } finally {
      await serve.stop();
    }
  }, 40_000);

  it('FLT-09b rate windows use Redis TIME: two instances an hour ahead and an hour behind share one quota exactly, with the same Retry-After', async () => {
    const redis = await TestRedis.create();
    const dir = await makeTempDir('egress-flt09b-');
    const { tokens } = await seedDataDir(dir, { routes: { r: faultRoute(u.url, { rule: '    rate: { rate: 1/h, burst: 5 }\n' }) }, credentials: { c: { secret: CANARY } }, callers: ['a'], store: redis.url });
    // Two instances: each has its own audit log (one writer per file).
    const ahead = await startServe(envFor(dir, { EGRESS_STORE: redis.url, EGRESS_AUDIT_LOG: join(dir, 'audit-ahead.log'), ...(await skewedClock('+1h')).env }));
    const behind = await startServe(envFor(dir, { EGRESS_STORE: redis.url, EGRESS_AUDIT_LOG: join(dir, 'audit-behind.log'), ...(await skewedClock('-1h')).env }));
    try {
      expect(await skewHours(ahead)).toBe(1);
      expect(await skewHours(behind)).toBe(-1);
      const results = [];
      for (let i = 0; i < 12; i++) results.push(await get(i % 2 ? behind : ahead, tokens.a!));
      const statuses = results.map((r) => r.status);
      // Exactly the burst, in order, whichever instance took each request; then both refuse.
      expect(statuses).toEqual([200, 200, 200, 200, 200, 429, 429, 429, 429, 429, 429, 429]);
      // Both compute the wait on the same clock: one emission interval (1 h), not an hour apart.
      const waits = results.filter((r) => r.status === 429).map((r) => Number(r.headers.get('retry-after')));
      console.log(`FLT-09 rate: statuses ${statuses.join(' ')}; Retry-After ${waits.join(' ')} s`);
      for (const w of waits) {
        expect(w).toBeGreaterThanOrEqual(3_590);
        expect(w).toBeLessThanOrEqual(3_600);
      }
      clean(ahead);
      clean(behind);
    } finally {
      await ahead.stop();
      await behind.stop();
      await redis.destroy();
    }
  }, 40_000);

  it('FLT-09g OAuth2 tokens shared through Redis keep their lifetime on Redis\'s clock: an instance two hours ahead takes the token another instance minted (no second mint), and the document holds Redis-clock times', async () => {
    let mints = 0;
    const api = await startUpstream((req, res) => {
      if (req.url === '/token') {
        mints++;
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ access_token: `at_${mints}`, expires_in: 3600 }));
        return;
      }
      res.end('{}');
    });
    const redis = await TestRedis.create();
    const dir = await makeTempDir('egress-flt09g-');
    const route = `name: r\nprefix: /r\nupstream: ${api.url}\nallow_private_addresses: true\ncredential: c\ninject:\n  scheme: oauth2_client_credentials\n  token_url: ${api.url}/token\n  client_auth: body\nallow:\n  - caller: a\n    methods: [GET]\n    paths: [/x]\n`;
    const { tokens } = await seedDataDir(dir, { routes: { r: route }, credentials: { c: { client_id: 'id', client_secret: CANARY } }, callers: ['a'], store: redis.url });
    const start = async (name: string, offset: string) => startServe(envFor(dir, { EGRESS_STORE: redis.url, EGRESS_AUDIT_LOG: join(dir, `audit-${name}.log`), ...(await skewedClock(offset)).env }));
    const right = await start('right', '+0');
    const ahead = await start('ahead', '+2h');
    const c = redis.client();
    try {
      expect(await skewHours(ahead)).toBe(2);
      expect((await get(right, tokens.a!)).status).toBe(200);
      expect(mints).toBe(1);
      // Two hours ahead, the token minted a moment ago looked an hour past its end: minted again.
      expect((await get(ahead, tokens.a!)).status).toBe(200);
      expect(mints).toBe(1);
      expect(api.requests.filter((r) => r.url === '/x').map((r) => r.headers.authorization)).toEqual(['Bearer at_1', 'Bearer at_1']);
      // What the shared document says is on Redis's clock: its end is an hour from Redis's now, not three.
      const [key] = (await c.keys('egress:oauth:*')).filter((k) => !k.endsWith(':lock'));
      const doc = JSON.parse((await c.get(key!))!) as { expiresAt: number };
      const [seconds] = (await c.time()).map(Number);
      expect(Math.abs(doc.expiresAt - (seconds! * 1000 + 3_600_000))).toBeLessThan(60_000);
      clean(right);
      clean(ahead);
    } finally {
      c.disconnect();
      await right.stop();
      await ahead.stop();
      await redis.destroy();
      await api.close();
    }
  }, 40_000);

  /** A Redis store with credential c, and a serve instance whose wall clock is `offset` from ours. */
  async function graceSetup(offset: string) {
    const redis = await TestRedis.create();
    const dir = await makeTempDir('egress-flt09c-');
    const { tokens } = await seedDataDir(dir, { routes: { r: faultRoute(u.url) }, credentials: { c: { secret: CANARY } }, callers: ['a'], store: redis.url });
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const c = redis.client();
    const serve = await startServe({ ...env, EGRESS_AUDIT_LOG: join(dir, 'audit-skewed.log'), ...(await skewedClock(offset)).env });
    return {
      serve,
      dir,
      redisUrl: redis.url,
      token: tokens.a!,
      versions: async () => (JSON.parse((await c.get('egress:{egress}:credential:c'))!) as { versions: { version: number; state: string; data?: unknown; grace_until?: string; retired_at?: string }[] }).versions,
      // The rotation is made with our (true) clock, as an operator's CLI would.
      rotate: async (secret: string, grace: string) => {
        const r = await runCli(['keys', 'rotate', 'c', '--from-stdin', '--grace', grace], env, JSON.stringify({ secret }));
        expect(r.code, r.stderr).toBe(0);
      },
      close: async () => {
        c.disconnect();
        await serve.stop();
        await redis.destroy();
      },
    };
  }

  it('FLT-09c (regression) grace ends on the store\'s clock: an instance an hour ahead does not retire the previous version early for everyone', async () => {
    const g = await graceSetup('+1h');
    try {
      expect(await skewHours(g.serve)).toBe(1);
      // Grace 30 min: by the fast instance's own clock it ended half an hour ago. Its sweeper used to
      // retire v1 (destroying its ciphertext in the shared store) at once.
      await g.rotate(V2_SECRET, '30m');
      await eventually(async () => (await get(g.serve, g.token)).status === 200, 5_000, 'serving v2');
      await new Promise((r) => setTimeout(r, 3_000));
      const v1 = (await g.versions()).find((v) => v.version === 1)!;
      expect(v1.state, 'v1 is still the previous version, 30 min from its grace end').toBe('previous');
      expect(v1.data, 'and still decryptable').toBeDefined();
      clean(g.serve);
    } finally {
      await g.close();
    }
  }, 40_000);

  it('FLT-09d (regression) grace ends on the store\'s clock: an instance an hour behind retires the previous version on time, not an hour late', async () => {
    const g = await graceSetup('-1h');
    try {
      expect(await skewHours(g.serve)).toBe(-1);
      await g.rotate(V2_SECRET, '3s');
      const rotatedAt = performance.now();
      const v1 = (await g.versions()).find((v) => v.version === 1)!;
      expect(v1.state).toBe('previous');
      await eventually(async () => (await g.versions()).find((v) => v.version === 1)!.state === 'retired', 10_000, 'v1 retired after its 3 s grace');
      const retired = (await g.versions()).find((v) => v.version === 1)!;
      // retired_at is stamped with the clock the sweeper judged by; the grace end with the writer's (ours).
      const lateMs = Date.parse(retired.retired_at!) - Date.parse(v1.grace_until!);
      console.log(`FLT-09 grace: the instance an hour behind retired v1 ${lateMs} ms after its 3 s grace ended (${(performance.now() - rotatedAt).toFixed(0)} ms after the rotate command returned)`);
      expect(lateMs, 'not early').toBeGreaterThanOrEqual(0);
      expect(lateMs, 'not late').toBeLessThan(2_500);
      expect(retired.data, 'ciphertext destroyed on retirement').toBeUndefined();
      clean(g.serve);
    } finally {
      await g.close();
    }
  }, 40_000);

  it('FLT-09f grace ends are written on the store\'s clock: a CLI and an admin API an hour behind give a 30 min grace, not one that ended half an hour ago', async () => {
    const g = await graceSetup('-1h');
    const skewed = (await skewedClock('-1h')).env;
    const env = envFor(g.dir, { EGRESS_STORE: g.redisUrl });
    try {
      expect(await skewHours(g.serve)).toBe(-1);
      // The CLI on a host whose clock is an hour behind (a CI runner, a laptop).
      const r = await runCli(['keys', 'rotate', 'c', '--from-stdin', '--grace', '30m'], { ...env, ...skewed }, JSON.stringify({ secret: V2_SECRET }));
      expect(r.code, r.stderr).toBe(0);
      // The admin API of the instance an hour behind.
      const created = await runCli(['admin-token', 'create', 'rotator', '--json'], env);
      expect(created.code, created.stderr).toBe(0);
      const admin = (JSON.parse(created.stdout) as { token: string }).token;
      await eventually(async () => (await fetch(`${g.serve.admin}/v1/credentials`, { headers: { authorization: `Bearer ${admin}` } })).status === 200, 3_000, 'the admin token');
      await new Promise((res) => setTimeout(res, 2_000));
      let v1 = (await g.versions()).find((v) => v.version === 1)!;
      expect(v1.state, 'v1 is previous for 30 min, not retired at once').toBe('previous');
      expect(Math.abs(Date.parse(v1.grace_until!) - (Date.now() + 30 * 60_000)), 'its grace ends 30 min from now').toBeLessThan(60_000);
      const res = await fetch(`${g.serve.admin}/v1/credentials/c/versions`, { method: 'POST', headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' }, body: JSON.stringify({ fields: { secret: `${V2_SECRET}_3` }, grace: '30m' }) });
      expect(res.status, await res.text()).toBe(201);
      await new Promise((res) => setTimeout(res, 2_000));
      const v2 = (await g.versions()).find((v) => v.version === 2)!;
      expect(v2.state, 'v2 is previous for 30 min, not retired at once').toBe('previous');
      expect(Math.abs(Date.parse(v2.grace_until!) - (Date.now() + 30 * 60_000)), 'its grace ends 30 min from now').toBeLessThan(60_000);
      v1 = (await g.versions()).find((v) => v.version === 1)!;
      expect(v1.state).toBe('retired');
      clean(g.serve);
    } finally {
      await g.close();
    }
  }, 40_000);

  it('FLT-09e / MITM-07 a forward-mode leaf is re-minted before it expires, for a host already served: 25 hours after a leaf was made, a tunnel gets a new valid one', async () => {
    const { certs } = await makeCerts(['api.bank.test']);
    const clock = join(await makeTempDir('egress-leaf-'), 'offset');
    // The first leaf is made "25 hours ago": it expired an hour ago, as after a day of uptime.
    await writeFile(clock, '-25h\n');
    const lab = await startLab({ env: { EGRESS_CERTS: certs, LD_PRELOAD: LIBFAKETIME!, FAKETIME_TIMESTAMP_FILE: clock, FAKETIME_CACHE_DURATION: '1', FAKETIME_DONT_FAKE_MONOTONIC: '1' }, routes: (up) => ({ bank: bankRoute(up.url) }) });
    const leafValidTo = async () => {
      const t = await connectTunnel(lab.port, 'api.bank.test:443', basic('a', lab.tokens.a));
      return new Promise<number>((resolve, reject) => {
        const tls: TLSSocket = tlsConnect({ socket: t.socket, servername: 'api.bank.test', rejectUnauthorized: false }, () => {
          resolve(Date.parse(tls.getPeerCertificate(false).valid_to));
          tls.destroy();
        });
        tls.on('error', reject);
      });
    };
    try {
      expect(await leafValidTo()).toBeLessThan(Date.now());
      await writeFile(clock, '+0\n');
      await new Promise((r) => setTimeout(r, 2_000));
      expect(await leafValidTo()).toBeGreaterThan(Date.now() + 23 * 3_600_000);
    } finally {
      await lab.close();
    }
  }, 60_000);
});
