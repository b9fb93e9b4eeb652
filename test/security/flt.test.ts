import { execFileSync, spawn } from 'node:child_process';
import { copyFile, mkdir, readFile, rename, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BIN, collect, runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { asA, CANARY, forms, startLab, type Lab } from './lab.ts';
import { openVersion } from '../../src/store/credentials.ts';
import { readKeyring } from '../../src/store/keyring.ts';
import { openStore } from '../../src/store/open-store.ts';
import { faultRoute, unopenable } from './sec-helpers.ts';

/** FLT: faults in Redis, the file system and route writes leave the proxy up and fail closed or documented. */
let u: Upstream;
beforeAll(async () => {
  u = await startUpstream((_req, res) => res.end('{}'));
});
afterAll(async () => {
  await u?.close();
});

const route = (rate = '') => faultRoute(u.url, { rule: rate });

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

  it('FLT-03 failover: the store\'s Redis becomes a READONLY replica mid-traffic, then primary again: no 500, limits kept, recovery bounded', async () => {
    const r1 = await TestRedis.create();
    const r2 = await TestRedis.create();
    const dir = await makeTempDir('egress-flt03-');
    // Caller a: traffic, every request a GCRA write, under a limit one sequential client never reaches
    // (at 1000/s it did: a fast run outpaced the burst on the per-instance buckets of the failover).
    // Caller p: a probe whose bucket is spent before the failover.
    const text = `${route('    rate: { rate: 100000/s }\n')}  - caller: p\n    methods: [GET]\n    paths: [/x]\n    rate: { rate: 1/h, burst: 2 }\n`;
    const { tokens } = await seedDataDir(dir, { routes: { r: text }, credentials: { c: { secret: CANARY } }, callers: ['a', 'p'], store: r1.url });
    const c1 = r1.client();
    const c2 = r2.client();
    // No 5 s wait for more replicas before a full sync (Redis 7's default for diskless sync).
    for (const c of [c1, c2]) await c.config('SET', 'repl-diskless-sync-delay', '0');
    const replicaOf = async (c: typeof c1, primary: TestRedis | undefined) => {
      await c.call('REPLICAOF', ...(primary ? ['127.0.0.1', String(primary.port)] : ['NO', 'ONE']));
      if (primary) await eventually(async () => /master_link_status:up/.test(await c.info('replication')), 10_000, 'replica in sync');
    };
    await replicaOf(c2, r1);
    const serve = await startServe(envFor(dir, { EGRESS_STORE: r1.url }));
    type Seen = { at: number; status: number; code: string };
    const seen: Seen[] = [];
    let running = true;
    const t0 = performance.now();
    const traffic = (async () => {
      while (running) {
        try {
          const res = await fetch(`${serve.url}/r/x`, { headers: { 'x-egress-token': tokens.a! } });
          await res.arrayBuffer();
          seen.push({ at: performance.now() - t0, status: res.status, code: res.headers.get('x-egress-error') ?? '' });
        } catch (err) {
          // A refused or reset connection (a crash) is recorded as status 0 and fails the checks below.
          seen.push({ at: performance.now() - t0, status: 0, code: (err as Error).message });
          await new Promise((r) => setTimeout(r, 50));
        }
      }
    })();
    try {
      expect((await call(serve, tokens.p!)).status).toBe(200);
      expect((await call(serve, tokens.p!)).status).toBe(200);
      expect((await call(serve, tokens.p!)).status).toBe(429);
      const probeKey = (await c1.keys('egress:rl:*')).find((k) => k.includes('"p"'));
      expect(probeKey, 'the probe\'s bucket is in Redis').toBeDefined();
      const probeTat = await c1.get(probeKey!);
      await new Promise((r) => setTimeout(r, 1_000));

      // Failover: r2 is promoted, the store's r1 becomes its replica (resynced from r2) and answers writes with READONLY.
      const failoverAt = performance.now() - t0;
      await replicaOf(c2, undefined);
      await replicaOf(c1, r2);
      await expect(c1.set('egress:flt03:write', '1')).rejects.toThrow(/READONLY/);
      const syncedAt = performance.now() - t0;
      await eventually(() => serve.output().includes('ratelimit_degraded'), 5_000, 'ratelimit_degraded alert (the fallback is not silent)');
      // Meanwhile limits fall back to per-instance buckets (README: documented): bounded by the rule, never off.
      const local = [];
      for (let i = 0; i < 4; i++) local.push((await call(serve, tokens.p!)).status);
      expect(local.filter((s) => s === 200).length, `probe during the failover: ${local}`).toBeLessThanOrEqual(2);
      expect(local.at(-1)).toBe(429);
      // A credential write against the replica fails cleanly (non-zero exit, no hang, no secret echoed).
      const { runCli } = await import('../helpers/cli.ts');
      const rotate = await runCli(['keys', 'rotate', 'c', '--from-stdin'], envFor(dir, { EGRESS_STORE: r1.url }), JSON.stringify({ secret: 'sk_flt03_NEW_0f0f' }));
      console.log(`FLT-03: keys rotate against the replica: exit ${rotate.code}: ${rotate.stderr.trim()}`);
      expect(rotate.code).not.toBe(0);
      expect(rotate.stderr).toMatch(/is a read-only replica \(READONLY\): writes go to the primary; nothing was written/);
      expect(rotate.stdout + rotate.stderr).not.toContain('sk_flt03_NEW_0f0f');
      await new Promise((r) => setTimeout(r, 1_000));

      // Back: r1 is promoted again (r2 follows it), as after a failback.
      const promotedAt = performance.now() - t0;
      const logMark = serve.output().length;
      await replicaOf(c1, undefined);
      await replicaOf(c2, r1);
      const recoveryMs = await eventually(() => serve.output().slice(logMark).includes('rate limits are shared through Redis again'), 10_000, 'shared limits again');
      await new Promise((r) => setTimeout(r, 1_000));
      running = false;
      await traffic;

      const during = seen.filter((s) => s.at >= failoverAt && s.at < promotedAt);
      const after = seen.filter((s) => s.at >= promotedAt + recoveryMs + 200);
      const tally = (xs: Seen[]) => JSON.stringify(Object.entries(Object.groupBy(xs, (s) => `${s.status}${s.code ? ` ${s.code}` : ''}`)).map(([k, v]) => [k, v!.length]));
      console.log(`FLT-03: ${seen.length} requests; failover at ${failoverAt.toFixed(0)} ms (r1 in sync as a replica at ${syncedAt.toFixed(0)}), promoted at ${promotedAt.toFixed(0)}; during the failover ${tally(during)}; shared limits again ${recoveryMs} ms after promotion; after ${tally(after)}`);
      expect(during.length, 'traffic kept flowing during the failover').toBeGreaterThan(10);
      // Never a 500 or a crash: served (local limits) or a clean 503 credential_unavailable.
      for (const s of seen) expect(s.status === 200 || (s.status === 503 && s.code === 'credential_unavailable'), JSON.stringify(s)).toBe(true);
      expect(recoveryMs, 'shared limits back within 5 s of the promotion').toBeLessThan(5_000);
      expect(after.length).toBeGreaterThan(10);
      for (const s of after) expect(s.status, JSON.stringify(s)).toBe(200);
      // Limits were not reset: the probe's bucket survived the round trip through r2, and still refuses.
      expect(await c1.get(probeKey!)).toBe(probeTat);
      expect((await call(serve, tokens.p!)).status).toBe(429);
      await alive(serve);
    } finally {
      running = false;
      await traffic;
      c1.disconnect();
      c2.disconnect();
      await serve.stop();
      await r1.destroy();
      await r2.destroy();
    }
  }, 60_000);

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

  it('FLT-12 the file store replaced under the proxy: a symlink to an older copy does not un-revoke; dangling, /dev/null, truncated or garbage keep the last good state (not ready); a good file makes it ready again', async () => {
    const lab = await startLab();
    const store = join(lab.dir, 'store.json');
    const a = async () => {
      const res = await fetch(`${lab.url}/plaid/accounts/get`, { method: 'POST', headers: { 'x-egress-token': lab.tokens.a, 'content-type': 'application/json' }, body: '{}' });
      lab.seen(await res.text());
      return res.status;
    };
    const b = async () => {
      const res = await fetch(`${lab.url}/plaid/institutions/x`, { headers: { 'x-egress-token': lab.tokens.b } });
      lab.seen(await res.text());
      return res.status;
    };
    const readyz = async () => (await fetch(`${lab.admin}/readyz`)).status;
    const settle = () => new Promise((r) => setTimeout(r, 1_500));
    try {
      expect(await b()).toBe(200);
      expect(await readyz()).toBe(200);
      const old = join(lab.dir, 'old-store.json');
      await copyFile(store, old);
      expect((await runCli(['callers', 'revoke', 'b'], envFor(lab.dir))).code).toBe(0);
      await eventually(async () => (await b()) === 401, 3_000, 'b revoked');
      const current = join(lab.dir, 'current-store.json');
      await copyFile(store, current);
      // Rollback through a symlink to the copy from before the revoke.
      await unlink(store);
      await symlink(old, store);
      await settle();
      expect(await b()).toBe(401);
      expect(await a()).toBe(200);
      await eventually(() => lab.serve.output().includes('store_rollback'), 3_000, 'store_rollback alert');
      for (const broken of ['dangling', '/dev/null', '', '{"not":"a store"', '[]']) {
        await unlink(store);
        if (broken === 'dangling') await symlink(join(lab.dir, 'nope.json'), store);
        else if (broken === '/dev/null') await symlink('/dev/null', store);
        else await writeFile(store, broken);
        await settle();
        expect(await a(), broken).toBe(200);
        expect(await b(), broken).toBe(401);
        if (broken !== 'dangling') expect(await readyz(), broken).toBe(503);
      }
      await unlink(store);
      await copyFile(current, store);
      await eventually(async () => (await readyz()) === 200, 3_000, 'ready again');
      expect(await a()).toBe(200);
      expect(await b()).toBe(401);
      for (const r of lab.u.requests) expect(r.headers['plaid-secret']).toBe(CANARY);
      await lab.g0();
    } finally {
      await lab.close();
    }
  }, 60_000);

  it('FLT-12b rollback protection survives a damaged record: a revoked caller\'s record damaged, then restored from a copy made before the revoke, stays revoked', async () => {
    const lab = await startLab();
    const store = join(lab.dir, 'store.json');
    const b = async () => {
      const res = await fetch(`${lab.url}/plaid/institutions/x`, { headers: { 'x-egress-token': lab.tokens.b } });
      lab.seen(await res.text());
      return res.status;
    };
    // Replace the store file whole, as an editor or a restore would (write aside, rename).
    const replace = async (text: string) => {
      await writeFile(`${store}.edit`, text);
      await rename(`${store}.edit`, store);
    };
    try {
      expect(await b()).toBe(200);
      const old = await readFile(store, 'utf8');
      expect((await runCli(['callers', 'revoke', 'b'], envFor(lab.dir))).code).toBe(0);
      await eventually(async () => (await b()) === 401, 3_000, 'b revoked');
      // A hand edit breaks b's record (it fails closed: still 401) ...
      const doc = JSON.parse(await readFile(store, 'utf8')) as { callers: Record<string, Record<string, unknown>> };
      doc.callers.b = { ...doc.callers.b, tokens: 'oops' };
      await replace(JSON.stringify(doc));
      await eventually(() => /store record is damaged/.test(lab.serve.output()), 3_000, 'the damage logged');
      expect(await b()).toBe(401);
      // ... and the fix is the backup from before the revoke: b's old, unrevoked revision.
      await replace(old);
      await new Promise((r) => setTimeout(r, 1_500));
      expect(await b()).toBe(401);
      await eventually(() => lab.serve.output().includes('store_rollback'), 3_000, 'store_rollback alert');
      await lab.g0();
    } finally {
      await lab.close();
    }
  }, 30_000);

  it('FLT-13b master-key rotate run by six processes at once, four times: one rotation at a time (the others wait, or exit 3), and every data key stays unwrappable', async () => {
    const lab = await startLab();
    try {
      const env = envFor(lab.dir);
      for (let i = 0; i < 10; i++) expect((await runCli(['keys', 'put', `k${i}`, '--from-stdin'], env, JSON.stringify({ secret: `sk_flt13b_${i}` }))).code).toBe(0);
      for (let round = 0; round < 4; round++) {
        const runs = await Promise.all(Array.from({ length: 6 }, () => runCli(['master-key', 'rotate'], env)));
        for (const r of runs) expect([0, 3], r.stderr).toContain(r.code);
        // Every version with ciphertext opens with the keyring now on disk: no data key was wrapped by a key that was then lost.
        const lost = await unopenable(`file:${join(lab.dir, 'store.json')}`, join(lab.dir, 'master.key'));
        expect(lost, `round ${round}`).toEqual([]);
      }
      // And the proxy, which re-reads the keyring, still sends the credential.
      await eventually(async () => (await fetch(`${lab.url}/plaid/accounts/get`, { method: 'POST', headers: asA(lab), body: '{}' })).status === 200, 3_000, 'the credential served');
      expect(lab.u.requests.at(-1)!.headers['plaid-secret']).toBe(CANARY);
      await lab.g0();
    } finally {
      await lab.close();
    }
  }, 120_000);

  it('FLT-15 the store on a full disk, then on a read-only one: a rotation fails cleanly (exit 1, the reason), the file is unchanged and still read, nothing left behind', async () => {
    if (process.getuid?.() !== 0) throw new Error('this test needs root: it mounts a small tmpfs in a mount namespace of its own');
    const dir = await makeTempDir('egress-flt15s-');
    await seedDataDir(dir, { routes: {}, credentials: { c: { secret: CANARY } }, callers: ['a'] });
    const disk = join(dir, 'disk');
    await mkdir(disk);
    const fresh = 'sk_flt15_NEW_7e7e7e';
    // In a mount namespace of its own: a 256 KiB tmpfs with the store on it, filled up, then remounted read-only.
    const script = [
      'mount -t tmpfs -o size=256k tmpfs "$DISK" || exit 90',
      'cp "$DATA/store.json" "$DISK/store.json"',
      'dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null',
      'before=$(sha256sum < "$DISK/store.json")',
      'printf %s "$FRESH" | "$NODE" "$BIN" keys rotate c --from-stdin; echo "full-exit=$?"',
      '[ "$(sha256sum < "$DISK/store.json")" = "$before" ] && echo full-unchanged',
      '"$NODE" "$BIN" keys list && echo full-readable',
      'rm "$DISK/filler" && mount -o remount,ro "$DISK"',
      'printf %s "$FRESH" | "$NODE" "$BIN" keys rotate c --from-stdin; echo "ro-exit=$?"',
      '[ "$(sha256sum < "$DISK/store.json")" = "$before" ] && echo ro-unchanged',
      'echo "left: $(ls -A "$DISK" | tr "\\n" " ")"',
    ].join('\n');
    const env = { ...envFor(dir, { EGRESS_STORE: `file:${join(disk, 'store.json')}` }), PATH: process.env.PATH ?? '/usr/bin:/bin', DISK: disk, DATA: dir, FRESH: JSON.stringify({ secret: fresh }), NODE: process.execPath, BIN };
    const run = await collect(spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], { env, stdio: ['ignore', 'pipe', 'pipe'] }));
    const out = run.stdout + run.stderr;
    expect(run.code, out).toBe(0);
    const store = join(disk, 'store.json');
    expect(out).toContain(`egress: cannot write store ${store} (ENOSPC); it is unchanged`);
    expect(out).toContain('full-exit=1');
    expect(out).toContain('full-unchanged');
    expect(out).toContain('full-readable');
    expect(out).toContain(`egress: cannot write store ${store} (EROFS); it is unchanged`);
    expect(out).toContain('ro-exit=1');
    expect(out).toContain('ro-unchanged');
    // No lock file or temp file left on the disk; only the store.
    expect(out).toContain('left: store.json \n');
    expect(out).not.toContain('unexpected error');
    for (const f of [...forms(CANARY), fresh]) expect(out).not.toContain(f);
  }, 30_000);

  it('FLT-15c master-key rotate with the keyring on a full disk, then a read-only one: exit 1 with the reason, the keyring unchanged, no lock or temp file left', async () => {
    if (process.getuid?.() !== 0) throw new Error('this test needs root: it mounts a small tmpfs in a mount namespace of its own');
    const dir = await makeTempDir('egress-flt15c-');
    await seedDataDir(dir, { routes: {}, credentials: { c: { secret: CANARY } } });
    const disk = join(dir, 'disk');
    await mkdir(disk);
    const script = [
      'mount -t tmpfs -o size=256k tmpfs "$DISK" || exit 90',
      'cp -p "$DATA/master.key" "$DISK/master.key"',
      'dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null',
      'before=$(sha256sum < "$DISK/master.key")',
      '"$NODE" "$BIN" master-key rotate; echo "full-exit=$?"',
      '[ "$(sha256sum < "$DISK/master.key")" = "$before" ] && echo full-unchanged',
      'rm "$DISK/filler" && mount -o remount,ro "$DISK"',
      '"$NODE" "$BIN" master-key rotate; echo "ro-exit=$?"',
      '[ "$(sha256sum < "$DISK/master.key")" = "$before" ] && echo ro-unchanged',
      'echo "left: $(ls -A "$DISK" | tr "\\n" " ")"',
    ].join('\n');
    const env = { ...envFor(dir, { EGRESS_MASTER_KEY_FILE: join(disk, 'master.key') }), PATH: process.env.PATH ?? '/usr/bin:/bin', DISK: disk, DATA: dir, NODE: process.execPath, BIN };
    const run = await collect(spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], { env, stdio: ['ignore', 'pipe', 'pipe'] }));
    const out = run.stdout + run.stderr;
    expect(run.code, out).toBe(0);
    expect(out).toContain('full-exit=1');
    expect(out).toContain('full-unchanged');
    expect(out).toContain('ro-exit=1');
    expect(out).toContain(`egress: cannot lock master key file ${join(disk, 'master.key')} (EROFS); it is unchanged`);
    expect(out).toContain('ro-unchanged');
    expect(out).toContain('left: master.key \n');
    expect(out).not.toContain('unexpected error');
  }, 30_000);

  it('FLT-15d master-key init on a full disk: exit 1 with the reason, no master key file left behind, and init works once there is room', async () => {
    if (process.getuid?.() !== 0) throw new Error('this test needs root: it mounts a small tmpfs in a mount namespace of its own');
    const dir = await makeTempDir('egress-flt15d-');
    const disk = join(dir, 'disk');
    await mkdir(disk);
    const script = [
      'mount -t tmpfs -o size=64k tmpfs "$DISK" || exit 90',
      'dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null',
      '"$NODE" "$BIN" master-key init; echo "full-exit=$?"',
      'echo "left: $(ls -A "$DISK" | tr "\\n" " ")"',
      'rm "$DISK/filler"',
      '"$NODE" "$BIN" master-key init; echo "room-exit=$?"',
      '"$NODE" "$BIN" master-key status; echo "status-exit=$?"',
      'echo "then: $(ls -A "$DISK" | tr "\\n" " ")"',
    ].join('\n');
    const keyPath = join(disk, 'master.key');
    const env = { ...envFor(dir, { EGRESS_MASTER_KEY_FILE: keyPath }), PATH: process.env.PATH ?? '/usr/bin:/bin', DISK: disk, NODE: process.execPath, BIN };
    const run = await collect(spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], { env, stdio: ['ignore', 'pipe', 'pipe'] }));
    const out = run.stdout + run.stderr;
    expect(run.code, out).toBe(0);
    expect(out).toContain(`egress: cannot create master key file ${keyPath} (ENOSPC); nothing was created`);
    expect(out).toContain('full-exit=1');
    // An empty master.key left here made every later init refuse ("already exists") and serve fail.
    expect(out).toContain('left: filler \n');
    expect(out).toContain('room-exit=0');
    expect(out).toContain('status-exit=0');
    expect(out).toContain('then: master.key \n');
    expect(out).not.toContain('unexpected error');
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

  it('FLT-16 Redis out of memory (maxmemory 1, noeviction) mid-traffic: no 500, the limit still applies, a rotation fails cleanly, recovery by itself', async () => {
    const redis = await TestRedis.create();
    const dir = await makeTempDir('egress-flt16-');
    const { tokens } = await seedDataDir(dir, { routes: { r: route('    rate: { rate: 1/h, burst: 3 }\n') }, credentials: { c: { secret: CANARY } }, callers: ['a'], store: redis.url });
    const serve = await startServe(envFor(dir, { EGRESS_STORE: redis.url }));
    const c = redis.client();
    const fresh = 'sk_flt16_NEW_5a5a';
    try {
      expect((await call(serve, tokens.a!)).status).toBe(200);
      await c.config('SET', 'maxmemory-policy', 'noeviction');
      await c.config('SET', 'maxmemory', '1');
      const during: number[] = [];
      for (let i = 0; i < 6; i++) during.push((await call(serve, tokens.a!)).status);
      for (const s of during) expect([200, 429, 503], String(during)).toContain(s);
      // Per-instance fallback buckets (README: documented): bounded by the rule's burst, never off.
      expect(during.filter((s) => s === 200).length, String(during)).toBeLessThanOrEqual(3);
      expect(during.at(-1)).toBe(429);
      const rotate = await runCli(['keys', 'rotate', 'c', '--from-stdin'], envFor(dir, { EGRESS_STORE: redis.url }), JSON.stringify({ secret: fresh }));
      expect(rotate.code, rotate.stderr).toBe(1);
      expect(rotate.stdout + rotate.stderr).not.toContain(fresh);
      // A plain message, not Redis's ReplyError.
      expect(rotate.stderr).toContain('is out of memory (Redis maxmemory reached, OOM): nothing was written');
      expect(rotate.stderr).not.toContain('unexpected error');
      await c.config('SET', 'maxmemory', '0');
      // Recovery is noticed by traffic: a request now and then until the limiter says it is shared again.
      await eventually(async () => {
        expect([200, 429]).toContain((await call(serve, tokens.a!)).status);
        return serve.output().includes('rate limits are shared through Redis again');
      }, 15_000, 'shared limits again');
      // Shared again: the bucket in Redis (one request spent before the fault) still bounds the caller.
      const after = [await call(serve, tokens.a!), await call(serve, tokens.a!), await call(serve, tokens.a!)].map((r) => r.status);
      expect(after.filter((s) => s === 200).length, String(after)).toBeLessThanOrEqual(2);
      expect(after.at(-1)).toBe(429);
      await alive(serve);
      expect(serve.output()).not.toContain(fresh);
    } finally {
      c.disconnect();
      await serve.stop();
      await redis.destroy();
    }
  }, 60_000);

  it('FLT-18 a grace too long for a date (or over a year) is a usage error in the CLI (exit 2) and a 400 in the admin API; nothing changes, and a year is still accepted', async () => {
    const lab = await startLab();
    try {
      const env = envFor(lab.dir);
      const created = await runCli(['admin-token', 'create', 'ops', '--json'], env);
      const admin = (JSON.parse(created.stdout) as { token: string }).token;
      await eventually(async () => (await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'admin token known');
      const storeBefore = await readFile(join(lab.dir, 'store.json'), 'utf8');
      for (const grace of ['99999999999d', '367d']) {
        for (const args of [['callers', 'rotate', 'b', '--grace', grace], ['keys', 'rotate', 'plaid', '--from-stdin', '--grace', grace], ['keys', 'promote', 'plaid', '--grace', grace]]) {
          const r = await runCli(args, env, JSON.stringify({ client_id: 'x', secret: 'sk_flt18_NEW' }));
          expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
          expect(r.stderr).toContain('--grace');
          expect(r.stderr).not.toContain('unexpected error');
        }
        for (const path of ['/v1/callers/b/rotate', '/v1/credentials/plaid/versions', '/v1/credentials/plaid/promote']) {
          const res = await fetch(`${lab.admin}${path}`, { method: 'POST', headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' }, body: JSON.stringify({ grace, fields: { client_id: 'x', secret: 'sk_flt18_NEW' } }) });
          const text = await res.text();
          expect(res.status, `${path} ${grace}: ${text}`).toBe(400);
          expect(text).toContain('grace');
        }
      }
      expect(await readFile(join(lab.dir, 'store.json'), 'utf8')).toBe(storeBefore);
      const year = await runCli(['callers', 'rotate', 'b', '--grace', '365d'], env);
      expect(year.code, year.stderr).toBe(0);
      await lab.g0();
    } finally {
      await lab.close();
    }
  }, 60_000);

  it('FLT-19 the Redis store\'s change counter edited by hand (not a number, then another type): a revoke still succeeds as one write and reaches the proxy within a second; the store stays readable', async () => {
    const redis = await TestRedis.create();
    const dir = await makeTempDir('egress-flt19-');
    const { tokens } = await seedDataDir(dir, { routes: { r: route() }, credentials: { c: { secret: CANARY } }, callers: ['a', 'b'], store: redis.url });
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const serve = await startServe(env);
    const c = redis.client();
    const counter = 'egress:{egress}:version';
    try {
      expect((await call(serve, tokens.a!)).status).toBe(200);
      await c.set(counter, 'abc');
      await new Promise((r) => setTimeout(r, 1_000));
      const revoke = await runCli(['callers', 'revoke', 'a'], env);
      expect(revoke.code, revoke.stderr).toBe(0);
      expect(revoke.stderr).not.toContain('unexpected error');
      const ms = await eventually(async () => (await call(serve, tokens.a!)).status === 401, 3_000, 'the revocation at the proxy');
      expect(ms).toBeLessThan(1_500);
      // A counter of another type: the store is still read (ready), and a change still reaches the proxy.
      await c.del(counter);
      await c.hset(counter, 'x', '1');
      await new Promise((r) => setTimeout(r, 1_200));
      expect((await fetch(`${serve.admin}/readyz`)).status).toBe(200);
      expect((await call(serve, tokens.b!)).status).toBe(403);
      const revokeB = await runCli(['callers', 'revoke', 'b'], env);
      expect(revokeB.code, revokeB.stderr).toBe(0);
      await eventually(async () => (await call(serve, tokens.b!)).status === 401, 1_500, 'the second revocation at the proxy');
      expect((await fetch(`${serve.admin}/readyz`)).status).toBe(200);
      await alive(serve);
    } finally {
      c.disconnect();
      await serve.stop();
      await redis.destroy();
    }
  }, 60_000);

  it('FLT-17 a route file that is not a regular file (a FIFO that never finishes reading) is refused at reload, and a later good change still applies', async () => {
    const lab = await startLab();
    try {
      const routes = join(lab.dir, 'routes');
      execFileSync('mkfifo', [join(routes, 'zz.yaml')]);
      lab.serve.child.kill('SIGHUP');
      await eventually(async () => lab.serve.output().includes('not a regular file'), 5_000, 'the FIFO refused');
      await rm(join(routes, 'zz.yaml'));
      const file = join(routes, 'plaid.yaml');
      await writeFile(file, (await readFile(file, 'utf8')).replace('paths: [/institutions/*]', 'paths: [/institutions/*, /categories/get]'));
      lab.serve.child.kill('SIGHUP');
      await eventually(async () => (await fetch(`${lab.url}/plaid/categories/get`, { headers: { 'x-egress-token': lab.tokens.b } })).status === 200, 5_000, 'the good change to apply');
    } finally {
      await lab.close();
    }
  }, 30_000);
});

