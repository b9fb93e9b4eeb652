import { readFile, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { apiKeyRoute } from '../helpers/routes.ts';
import { freePort, TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * EGRESS_REUSE_PORT: several `egress serve` processes on one port (SO_REUSEPORT), one store,
 * each with its own admin listener and audit log; without the setting the second one cannot listen.
 */
const SECRET = 'reuse-port-secret-0123';
let upstream: Upstream;
let dir: string;
let token: string;
const running: ServeProcess[] = [];

beforeAll(async () => {
  upstream = await startUpstream((req, res) => {
    res.writeHead(req.headers['x-api-key'] === SECRET ? 200 : 401, { 'content-type': 'text/plain' });
    res.end('ok');
  });
  dir = await makeTempDir('egress-reuse-');
  ({ tokens: { svc: token } } = await seedDataDir(dir, {
    routes: {
      api: apiKeyRoute({ upstream: upstream.url }),
    },
    credentials: { key: { secret: SECRET } },
    callers: ['svc'],
  }) as { tokens: { svc: string } });
});

afterAll(async () => {
  await Promise.all(running.filter((s) => s.child.exitCode === null && s.child.signalCode === null).map((s) => s.stop('SIGKILL')));
  await upstream?.close();
});

async function serve(env: Record<string, string>, args: readonly string[] = []): Promise<ServeProcess> {
  const started = await startServe(env, undefined, args);
  running.push(started);
  return started;
}


/** One GET on a connection of its own (so the kernel picks a listener for each). */
function getOnFreshConnection(port: number, path: string): Promise<number> {
  return new Promise((resolveGet, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent: false, headers: { 'x-egress-token': token, connection: 'close' }, timeout: 10_000 }, (res) => {
      res.resume();
      res.on('end', () => resolveGet(res.statusCode ?? 0));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.end();
  });
}

async function auditLines(file: string): Promise<{ route: string; decision: string }[]> {
  const text = await readFile(file, 'utf8').catch(() => '');
  return text.split('\n').filter(Boolean).map((line) => JSON.parse(line) as { route: string; decision: string });
}

describe('EGRESS_REUSE_PORT', () => {
  it('two serve processes share one port: the kernel spreads connections, every request gets its credential', async () => {
    const port = await freePort();
    const auditA = join(dir, 'audit-a.log');
    const auditB = join(dir, 'audit-b.log');
    const a = await serve(envFor(dir, { EGRESS_LISTEN: `127.0.0.1:${port}`, EGRESS_REUSE_PORT: '1', EGRESS_AUDIT_LOG: auditA }));
    // The flag works like the variable.
    const b = await serve(envFor(dir, { EGRESS_LISTEN: `127.0.0.1:${port}`, EGRESS_AUDIT_LOG: auditB }), ['--reuse-port', 'true']);
    expect(a.url).toBe(`http://127.0.0.1:${port}`);
    expect(b.url).toBe(`http://127.0.0.1:${port}`);
    expect(a.admin).not.toBe(b.admin);

    const before = upstream.requests.length;
    const total = 200;
    const statuses: number[] = [];
    for (let sent = 0; sent < total; sent += 10) {
      statuses.push(...await Promise.all(Array.from({ length: 10 }, () => getOnFreshConnection(port, '/api/x'))));
    }
    expect(statuses.filter((s) => s !== 200)).toEqual([]);
    const seen = upstream.requests.slice(before);
    expect(seen).toHaveLength(total);
    for (const r of seen) {
      expect(r.headers['x-api-key']).toBe(SECRET);
      expect(r.headers['x-egress-token']).toBeUndefined();
    }

    // Each instance wrote its own audit log; together they hold one line per request.
    const count = async () => {
      const [la, lb] = await Promise.all([auditLines(auditA), auditLines(auditB)]);
      return { a: la.filter((l) => l.route === 'api' && l.decision === 'allow').length, b: lb.filter((l) => l.route === 'api' && l.decision === 'allow').length };
    };
    await eventually(async () => {
      const { a: na, b: nb } = await count();
      return na + nb === total;
    }, 5_000, 'audit lines for every request');
    const { a: na, b: nb } = await count();
    expect(na).toBeGreaterThan(0);
    expect(nb).toBeGreaterThan(0);

    // Both stop cleanly, each chain verifies, and each released its audit lock.
    expect(await a.stop('SIGTERM')).toBe(0);
    expect(await b.stop('SIGTERM')).toBe(0);
    for (const file of [auditA, auditB]) {
      const verify = await runCli(['audit', 'verify', file], envFor(dir));
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      await expect(readFile(`${file}.lock`)).rejects.toMatchObject({ code: 'ENOENT' });
    }
  }, 60_000);

  it('without it, a second instance on the same port fails to start with "address already in use"', async () => {
    const port = await freePort();
    const a = await serve(envFor(dir, { EGRESS_LISTEN: `127.0.0.1:${port}`, EGRESS_AUDIT_LOG: join(dir, 'plain-a.log') }));
    try {
      const b = await serve(envFor(dir, { EGRESS_LISTEN: `127.0.0.1:${port}`, EGRESS_AUDIT_LOG: join(dir, 'plain-b.log') })).catch((err: Error) => err);
      expect(b).toBeInstanceOf(Error);
      const message = (b as Error).message;
      expect(message).toMatch(/exited with 1/);
      expect(message).toContain(`EGRESS_LISTEN: cannot listen on 127.0.0.1:${port}: address already in use`);
      expect(message).toContain('EGRESS_REUSE_PORT=1');
      // The first one never noticed.
      expect(await getOnFreshConnection(port, '/api/x')).toBe(200);
    } finally {
      expect(await a.stop('SIGTERM')).toBe(0);
    }
  }, 30_000);

  it('a second instance given an audit log that a live instance writes refuses to start; a dead holder\'s lock is taken over', async () => {
    const audit = join(dir, 'shared.log');
    const a = await serve(envFor(dir, { EGRESS_REUSE_PORT: '1', EGRESS_AUDIT_LOG: audit }));
    const lock = await readFile(`${audit}.lock`, 'utf8');
    expect(lock.split(' ')[0]).toBe(String(a.child.pid));
    const b = await serve(envFor(dir, { EGRESS_REUSE_PORT: '1', EGRESS_AUDIT_LOG: audit })).catch((err: Error) => err);
    expect(b).toBeInstanceOf(Error);
    expect((b as Error).message).toContain(`the audit log ${audit} is in use by another running egress process (pid ${a.child.pid}`);
    expect((b as Error).message).toContain('every instance needs its own EGRESS_AUDIT_LOG');
    // With a Redis store the client is connected by then: the refused process still exits (startServe
    // would otherwise report that it did not start within 15 s).
    const redis = await TestRedis.create();
    try {
      const viaRedis = await serve(envFor(dir, { EGRESS_STORE: redis.url, EGRESS_AUDIT_LOG: audit })).catch((err: Error) => err);
      expect(viaRedis).toBeInstanceOf(Error);
      expect((viaRedis as Error).message).toMatch(/^serve exited with 1:/);
      expect((viaRedis as Error).message).toContain(`the audit log ${audit} is in use`);
    } finally {
      await redis.destroy();
    }

    // SIGKILL leaves the lock behind; the next start sees its holder is gone and takes it over.
    await a.stop('SIGKILL');
    expect(await readFile(`${audit}.lock`, 'utf8')).toBe(lock);
    const c = await serve(envFor(dir, { EGRESS_AUDIT_LOG: audit }));
    expect((await readFile(`${audit}.lock`, 'utf8')).split(' ')[0]).toBe(String(c.child.pid));
    expect(await c.stop('SIGTERM')).toBe(0);
    await expect(readFile(`${audit}.lock`)).rejects.toMatchObject({ code: 'ENOENT' });

    // A lock naming a live process that is not its writer (a pid reused since: another start time) is stale too.
    await writeFile(`${audit}.lock`, `${process.pid} 1\n`);
    const d = await serve(envFor(dir, { EGRESS_AUDIT_LOG: audit }));
    expect(await d.stop('SIGTERM')).toBe(0);
  }, 45_000);
});
