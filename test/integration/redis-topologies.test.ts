import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { afterAll, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/observe/log.ts';
import { RedisRateLimiter } from '../../src/pipeline/redis-rate-limiter.ts';
import { openStore } from '../../src/store/open-store.ts';
import type { RedisStore } from '../../src/store/redis-store.ts';
import type { CallerRecord } from '../../src/store/records.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir } from '../helpers/proxy.ts';
import { freePort } from '../helpers/redis.ts';
import { makeTestPki } from '../helpers/tls.ts';

/** Sentinel (with a real failover) and Cluster, each started here from redis-server. */
const children: ChildProcess[] = [];
const dirs: string[] = [];

afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

/** Whether a (lazily connecting) client connects and answers PING; it is disconnected after. */
async function answersPing(c: Redis): Promise<boolean> {
  c.on('error', () => {});
  try {
    await c.connect();
    return (await c.ping()) === 'PONG';
  } catch {
    return false;
  } finally {
    c.disconnect();
  }
}

async function redisProcess(args: string[]): Promise<{ port: number; child: ChildProcess }> {
  const port = await freePort();
  const dir = await mkdtemp(join(tmpdir(), 'egress-topo-'));
  dirs.push(dir);
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no', '--loglevel', 'warning', ...args], { stdio: 'ignore' });
  children.push(child);
  await eventually(() => answersPing(new Redis(port, '127.0.0.1', { lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 })), 10_000, 'redis-server to start');
  return { port, child };
}

/** A Sentinel watching the primary on `primaryPort` as "main"; `conf` adds lines (TLS). Resolves once it names the primary. */
async function sentinelProcess(primaryPort: number, conf: readonly string[] = [], ask?: (port: number) => Promise<unknown>): Promise<{ port: number; child: ChildProcess }> {
  const port = await freePort();
  const dir = await mkdtemp(join(tmpdir(), 'egress-sentinel-'));
  dirs.push(dir);
  const file = join(dir, 'sentinel.conf');
  const tls = conf.some((line) => line.startsWith('tls-'));
  await writeFile(file, [
    tls ? 'port 0' : `port ${port}`, ...(tls ? [`tls-port ${port}`] : []), 'bind 127.0.0.1', ...conf,
    `sentinel monitor main 127.0.0.1 ${primaryPort} 1`, 'sentinel down-after-milliseconds main 500', '',
  ].join('\n'));
  const child = spawn('redis-server', [file, '--sentinel'], { stdio: 'ignore' });
  children.push(child);
  await eventually(async () => {
    if (ask) return ask(port).then(() => true, () => false);
    const c = new Redis(port, '127.0.0.1', { lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 });
    c.on('error', () => {});
    try {
      await c.connect();
      return Array.isArray(await c.call('SENTINEL', 'get-master-addr-by-name', 'main'));
    } catch {
      return false;
    } finally {
      c.disconnect();
    }
  }, 10_000, 'the sentinel to name the primary');
  return { port, child };
}

function caller(name: string, revision: number): CallerRecord {
  const at = new Date().toISOString();
  return { name, revision, created_at: at, updated_at: at, tokens: [{ id: 'ab12cd34', hash: 'b'.repeat(64), created_at: at }] };
}

describe('Redis Sentinel', () => {
  it('connects through Sentinel, and keeps working after a failover to the replica', async () => {
    // Redis 7 waits repl-diskless-sync-delay (5 s) for more replicas before the first sync: not here.
    const primary = await redisProcess(['--repl-diskless-sync-delay', '0']);
    const replica = await redisProcess(['--replicaof', '127.0.0.1', String(primary.port)]);
    const sentinelPort = await freePort();
    const conf = join(await mkdtemp(join(tmpdir(), 'egress-sentinel-')), 'sentinel.conf');
    dirs.push(join(conf, '..'));
    await writeFile(conf, [
      `port ${sentinelPort}`, 'bind 127.0.0.1', `sentinel monitor main 127.0.0.1 ${primary.port} 1`,
      'sentinel down-after-milliseconds main 500', 'sentinel failover-timeout main 3000', '',
    ].join('\n'));
    const sentinel = spawn('redis-server', [conf, '--sentinel'], { stdio: 'ignore' });
    children.push(sentinel);
    await new Promise((r) => setTimeout(r, 500));

    const store = openStore(`redis-sentinel://127.0.0.1:${sentinelPort}/main`);
    try {
      await eventually(async () => store.put('caller', caller('svc', 1), 0).then(() => true, () => false), 5_000, 'a write through Sentinel');
      expect((await store.load()).callers.get('svc')!.revision).toBe(1);
      await eventually(async () => {
        const c = new Redis(replica.port, '127.0.0.1');
        const v = await c.get('egress:{egress}:version');
        c.disconnect();
        return v === '1';
      }, 10_000, 'replication');

      primary.child.kill('SIGKILL');
      await eventually(async () => store.put('caller', caller('svc', 2), 1).then(() => true, () => false), 15_000, 'a write after failover');
      expect((await store.load()).callers.get('svc')!.revision).toBe(2);
    } finally {
      await store.close();
    }
  }, 40_000);

  it('a sentinel that takes the connection and never answers (a hung host, SIGSTOP) does not hold the store: the next sentinel in the URL is asked', async () => {
    const primary = await redisProcess([]);
    const hung = await sentinelProcess(primary.port);
    const good = await sentinelProcess(primary.port);
    hung.child.kill('SIGSTOP');
    const store = openStore(`redis-sentinel://127.0.0.1:${hung.port},127.0.0.1:${good.port}/main`);
    try {
      const started = Date.now();
      await eventually(async () => store.put('caller', caller('svc', 1), 0).then(() => true, () => false), 10_000, 'a write through the second sentinel');
      expect(Date.now() - started).toBeLessThan(5_000);
      expect((await store.load()).callers.get('svc')!.revision).toBe(1);
    } finally {
      hung.child.kill('SIGCONT');
      await store.close();
    }
  }, 30_000);

  it('?sentinel_password_file= gives the sentinels their own password, apart from the primary\'s (password_file); neither is in any output', async () => {
    const PRIMARY_PASSWORD = 'primary_pw_CANARY_7a1';
    const SENTINEL_PASSWORD = 'sentinel_pw_CANARY_3c9';
    const primary = await redisProcess([]);
    const admin = new Redis(primary.port, '127.0.0.1');
    await admin.config('SET', 'requirepass', PRIMARY_PASSWORD);
    admin.disconnect();
    const sentinel = await sentinelProcess(primary.port, [`requirepass ${SENTINEL_PASSWORD}`, `sentinel auth-pass main ${PRIMARY_PASSWORD}`], async (port) => {
      const c = new Redis(port, '127.0.0.1', { password: SENTINEL_PASSWORD, lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 });
      c.on('error', () => {});
      try {
        await c.connect();
        if (!Array.isArray(await c.call('SENTINEL', 'get-master-addr-by-name', 'main'))) throw new Error('no primary yet');
      } finally {
        c.disconnect();
      }
    });
    const dir = await makeTempDir('egress-sentinel-auth-');
    dirs.push(dir);
    await mkdir(join(dir, 'routes'));
    expect((await runCli(['master-key', 'init'], envFor(dir))).code).toBe(0);
    const files = { primary: join(dir, 'primary.password'), sentinel: join(dir, 'sentinel.password'), empty: join(dir, 'empty.password') };
    await writeFile(files.primary, `${PRIMARY_PASSWORD}\n`, { mode: 0o600 });
    await writeFile(files.sentinel, `${SENTINEL_PASSWORD}\n`, { mode: 0o600 });
    await writeFile(files.empty, '\n', { mode: 0o600 });
    const url = (query: string) => `redis-sentinel://127.0.0.1:${sentinel.port}/main?password_file=${files.primary}${query}`;
    const outputs: string[] = [];
    const run = async (args: string[], query: string) => {
      const res = await runCli(args, envFor(dir, { EGRESS_STORE: url(query) }));
      outputs.push(res.stdout + res.stderr);
      return res;
    };

    // Without the sentinels' password the sentinels refuse (NOAUTH): the store is unreachable.
    const refused = await run(['callers', 'add', 'no-sentinel-pw'], '');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/is unreachable \(.*NOAUTH/);
    const added = await run(['callers', 'add', 'svc', '--json'], `&sentinel_password_file=${files.sentinel}`);
    expect(added.code, added.stderr).toBe(0);
    const empty = await run(['keys', 'list'], `&sentinel_password_file=${files.empty}`);
    expect(empty.code).toBe(1);
    expect(empty.stderr).toBe(`egress: EGRESS_STORE sentinel_password_file ${files.empty} is empty\n`);
    // Only Sentinel has sentinels: elsewhere the parameter is refused, not ignored.
    const plain = await runCli(['keys', 'list'], envFor(dir, { EGRESS_STORE: `redis://127.0.0.1:${primary.port}/0?sentinel_password_file=${files.sentinel}` }));
    expect(plain.code).toBe(2);
    expect(plain.stderr).toContain('"sentinel_password_file"');

    const c = new Redis(primary.port, '127.0.0.1', { password: PRIMARY_PASSWORD });
    try {
      expect(await c.get('egress:{egress}:caller:svc')).toContain('"name":"svc"');
      expect(await c.get('egress:{egress}:caller:no-sentinel-pw')).toBeNull();
    } finally {
      c.disconnect();
    }
    expect(outputs.join('')).not.toContain('CANARY');
  }, 40_000);

  it('?tls=true goes over TLS to the sentinels and to the primary they name, not in the clear', async () => {
    const pki = makeTestPki();
    const dir = await makeTempDir('egress-sentinel-tls-');
    dirs.push(dir);
    const files = { ca: join(dir, 'ca.pem'), cert: join(dir, 'server.pem'), key: join(dir, 'server.key') };
    await writeFile(files.ca, pki.caCert);
    await writeFile(files.cert, pki.serverCert);
    await writeFile(files.key, pki.serverKey);
    const tlsFiles = ['--tls-cert-file', files.cert, '--tls-key-file', files.key, '--tls-ca-cert-file', files.ca, '--tls-auth-clients', 'no'];
    // The primary takes TLS only: a connection in the clear gets nowhere.
    const primaryPort = await freePort();
    const primaryDir = await mkdtemp(join(tmpdir(), 'egress-topo-'));
    dirs.push(primaryDir);
    children.push(spawn('redis-server', ['--port', '0', '--tls-port', String(primaryPort), '--bind', '127.0.0.1', '--dir', primaryDir, '--save', '', '--appendonly', 'no', '--loglevel', 'warning', ...tlsFiles], { stdio: 'ignore' }));
    const tlsClient = (port: number) => new Redis(port, '127.0.0.1', { tls: { ca: pki.caCert }, lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 });
    await eventually(() => answersPing(tlsClient(primaryPort)), 10_000, 'the TLS primary to start');
    const conf = [`tls-cert-file ${files.cert}`, `tls-key-file ${files.key}`, `tls-ca-cert-file ${files.ca}`, 'tls-auth-clients no', 'tls-replication yes'];
    const sentinel = await sentinelProcess(primaryPort, conf, async (port) => {
      const c = tlsClient(port);
      c.on('error', () => {});
      try {
        await c.connect();
        if (!Array.isArray(await c.call('SENTINEL', 'get-master-addr-by-name', 'main'))) throw new Error('no primary yet');
      } finally {
        c.disconnect();
      }
    });

    await mkdir(join(dir, 'routes'));
    expect((await runCli(['master-key', 'init'], envFor(dir))).code).toBe(0);
    const env = envFor(dir, { EGRESS_STORE: `redis-sentinel://127.0.0.1:${sentinel.port}/main?tls=true`, NODE_EXTRA_CA_CERTS: files.ca });
    const added = await runCli(['callers', 'add', 'svc', '--json'], env);
    expect(added.code, added.stderr).toBe(0);
    const c = tlsClient(primaryPort);
    try {
      expect(await c.get('egress:{egress}:caller:svc')).toContain('"name":"svc"');
    } finally {
      c.disconnect();
    }
  }, 40_000);
});

describe('Redis Cluster', () => {
  it('stores records and runs the scripts across a three-node cluster', async () => {
    const nodes = await Promise.all([0, 1, 2].map(() => redisProcess(['--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${Math.random().toString(36).slice(2)}.conf`])));
    const create = spawnSync('redis-cli', ['--cluster', 'create', ...nodes.map((n) => `127.0.0.1:${n.port}`), '--cluster-replicas', '0', '--cluster-yes'], { encoding: 'utf8', timeout: 20_000 });
    expect(create.status, create.stdout + create.stderr).toBe(0);
    await eventually(async () => {
      const c = new Redis(nodes[0]!.port, '127.0.0.1');
      const info = await c.cluster('INFO');
      c.disconnect();
      return String(info).includes('cluster_state:ok');
    }, 10_000, 'the cluster to be ok');

    const store = openStore(`redis-cluster://${nodes.map((n) => `127.0.0.1:${n.port}`).join(',')}`);
    try {
      await eventually(async () => store.put('caller', caller('svc', 1), 0).then(() => true, () => false), 5_000, 'a write to the cluster');
      await store.put('caller', caller('other', 1), 0);
      const snapshot = await store.load();
      expect([...snapshot.callers.keys()].sort()).toEqual(['other', 'svc']);

      // Rate-limit buckets of different routes live in different slots; each check stays in one.
      const redisStore = store as RedisStore;
      const limiter = new RedisRateLimiter(redisStore.client, redisStore.connectAgain(), createLogger('silent'));
      const bucket = { key: ['upstream'], limit: { rate: { count: 2, periodMs: 60_000 } }, policy: 'upstream' as const };
      for (const route of ['plaid', 'alpaca', 'teller']) {
        const results = [];
        for (let i = 0; i < 3; i++) results.push((await limiter.check(route, [bucket])).allowed);
        expect(results, route).toEqual([true, true, false]);
      }
      // Checks on several routes in one turn: one script call per route, each within its own slot.
      const routes = ['plaid-2', 'alpaca-2', 'teller-2'];
      const together = await Promise.all(routes.flatMap((route) => [0, 1, 2].map(() => Promise.resolve(limiter.check(route, [bucket])).then((r) => [route, r.allowed] as const))));
      for (const route of routes) expect(together.filter(([r, ok]) => r === route && ok).length, route).toBe(2);
      await limiter.close();
    } finally {
      await store.close();
    }
  }, 40_000);
});
