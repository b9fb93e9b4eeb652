import { chmod, cp, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, runCli, startServe } from '../helpers/cli.ts';
import { envFor, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { bearerRoute } from '../helpers/routes.ts';

let upstream: Upstream;
beforeAll(async () => {
  upstream = await startUpstream((_req, res) => {
    setTimeout(() => {
      res.writeHead(200);
      res.end('slow ok');
    }, 700);
  });
});
afterAll(async () => {
  await upstream?.close();
});

const route = () => bearerRoute({ upstream: upstream.url, paths: ['/slow'] });

async function seeded(): Promise<{ dir: string; env: Record<string, string>; tokens: Record<string, string> }> {
  const dir = await makeTempDir('egress-start-');
  const { tokens } = await seedDataDir(dir, { routes: { api: route() }, credentials: { key: { token: 'tok_abcdef123' } }, callers: ['svc'] });
  return { dir, env: envFor(dir), tokens };
}

describe('start-up refuses what it must', () => {
  it('a master key file readable by group or others', async () => {
    const { dir, env } = await seeded();
    await chmod(join(dir, 'master.key'), 0o640);
    const res = await runCli(['serve'], env);
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('chmod 600');
    const key = (JSON.parse(await readFile(join(dir, 'master.key'), 'utf8')) as { keys: { key: string }[] }).keys[0]!.key;
    expect(res.stderr + res.stdout).not.toContain(key);
  });

  it('a malformed master key file (short key, all zeros, not JSON)', async () => {
    const { dir, env } = await seeded();
    for (const body of [
      JSON.stringify({ format: 'egress-keyring/1', active: 1, keys: [{ version: 1, key: Buffer.alloc(31, 1).toString('base64') }] }),
      JSON.stringify({ format: 'egress-keyring/1', active: 1, keys: [{ version: 1, key: Buffer.alloc(32).toString('base64') }] }),
      'not json',
      '',
    ]) {
      await writeFile(join(dir, 'master.key'), body, { mode: 0o600 });
      const res = await runCli(['serve'], env);
      expect(res.code, body).toBe(1);
      expect(res.stderr).toContain('not a valid keyring');
    }
  });

  it('the wrong master key: the credential fails closed with 503, nothing sent', async () => {
    const { dir, env, tokens } = await seeded();
    await writeFile(join(dir, 'master.key'), JSON.stringify({ format: 'egress-keyring/1', active: 1, keys: [{ version: 1, key: Buffer.alloc(32, 7).toString('base64') }] }), { mode: 0o600 });
    const serve = await startServe(env);
    try {
      const before = upstream.requests.length;
      const res = await fetch(`${serve.url}/api/slow`, { headers: { 'x-egress-token': tokens.svc! } });
      expect(res.status).toBe(503);
      expect(upstream.requests.length).toBe(before);
    } finally {
      await serve.stop();
    }
  });

  it('a missing master key outside a first run (non-default paths): no new key is made', async () => {
    const { dir, env } = await seeded();
    await (await import('node:fs/promises')).rm(join(dir, 'master.key'));
    const res = await runCli(['serve'], env);
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('egress master-key init');
    await expect(stat(join(dir, 'master.key'))).rejects.toThrow();
  });

  it('an invalid route folder at start (nothing good to fall back to), with file:line:col', async () => {
    const { dir, env } = await seeded();
    await writeFile(join(dir, 'routes', 'api.yaml'), `${route()}extra: true\n`);
    const res = await runCli(['serve'], env);
    expect(res.code).toBe(1);
    expect(res.stderr).toMatch(/api\.yaml:\d+:1: unknown key "extra"/);
  });

  it('an audit log it cannot write (its folder is a file; a read-only place): no start, and the reason', async () => {
    const { dir, env } = await seeded();
    await writeFile(join(dir, 'not-a-folder'), '');
    const res = await runCli(['serve'], { ...env, EGRESS_AUDIT_LOG: join(dir, 'not-a-folder', 'audit.log') });
    expect(res.code).toBe(1);
    expect(res.stderr).toContain(`EGRESS_AUDIT_LOG ${join(dir, 'not-a-folder', 'audit.log')} cannot be written (EEXIST)`);
    expect(res.stderr).not.toContain('unexpected error');
    // /proc takes no new files, whoever asks (root included).
    const proc = await runCli(['serve'], { ...env, EGRESS_AUDIT_LOG: '/proc/egress-audit.log' });
    expect(proc.code).toBe(1);
    expect(proc.stderr).toMatch(/EGRESS_AUDIT_LOG \/proc\/egress-audit\.log cannot be written \(E[A-Z]+\)/);
  });

  it('a store URL it does not support, and a bad listen address', async () => {
    const { env } = await seeded();
    // A malformed setting is a usage error (2), like every other EGRESS_* value: a script can tell
    // "fix the configuration" from a failure worth retrying (1).
    const other = await runCli(['serve'], { ...env, EGRESS_STORE: 'memcached://127.0.0.1:1' });
    expect(other.code).toBe(2);
    expect(other.stderr).toContain('EGRESS_STORE must be file:PATH, redis://');
    for (const store of ['file:', 'redis://', 'redis://127.0.0.1:6379/x']) {
      const bad = await runCli(['keys', 'list'], { ...env, EGRESS_STORE: store });
      expect(bad.code, store).toBe(2);
      expect(bad.stderr, store).toContain('EGRESS_STORE');
    }
    for (const [name, value] of [['EGRESS_CALLER_MAX_IN_FLIGHT', '0x10'], ['EGRESS_AUDIT_KEEP', '1e2'], ['EGRESS_AUDIT_KEEP', ' 5'], ['EGRESS_MAX_CONNECTIONS', '0'], ['EGRESS_MAX_CONNECTIONS', '100001'], ['EGRESS_CALLER_CONNECT_RATE', 'fast'], ['EGRESS_CALLER_CONNECT_RATE', '0/s'], ['EGRESS_CALLER_CONNECT_RATE', '20']] as const) {
      const count = await runCli(['serve'], { ...env, [name]: value });
      expect(count.code, `${name}=${value}`).toBe(2);
      expect(count.stderr).toContain(name);
    }
    const stale = await runCli(['serve'], { ...env, EGRESS_STORE_MAX_STALE: 'forever' });
    expect(stale.code).toBe(2);
    const listen = await runCli(['serve'], { ...env, EGRESS_LISTEN: 'nonsense' });
    expect(listen.code).toBe(2);
    expect(listen.stderr).toContain('EGRESS_LISTEN');
    // Eighteen CLI runs one after another: on a loaded 2-core machine each start takes a second or two.
  }, 90_000);
});

describe('first run on a fresh clone', () => {
  it('with the default paths and no store, creates data/master.key (0600) and serves', async () => {
    const cwd = await makeTempDir('egress-fresh-');
    await cp(join(ROOT, 'routes'), join(cwd, 'routes'), { recursive: true });
    const serve = await startServe({ EGRESS_LISTEN: '127.0.0.1:0', EGRESS_ADMIN_LISTEN: '127.0.0.1:0' }, cwd);
    try {
      expect((await stat(join(cwd, 'data', 'master.key'))).mode & 0o777).toBe(0o600);
      expect((await fetch(`${serve.admin}/healthz`)).status).toBe(200);
      expect((await fetch(`${serve.admin}/readyz`)).status).toBe(200);
      const res = await fetch(`${serve.url}/plaid/accounts/get`, { method: 'POST' });
      expect(res.status).toBe(401);
    } finally {
      await serve.stop();
    }
    // The second run reads the key it made; it does not make another.
    const before = await readFile(join(cwd, 'data', 'master.key'), 'utf8');
    await mkdir(join(cwd, 'data'), { recursive: true });
    const again = await startServe({ EGRESS_LISTEN: '127.0.0.1:0', EGRESS_ADMIN_LISTEN: '127.0.0.1:0' }, cwd);
    await again.stop();
    expect(await readFile(join(cwd, 'data', 'master.key'), 'utf8')).toBe(before);
  });
});

describe('shutdown', () => {
  it('SIGTERM lets an in-flight request finish, then exits 0', async () => {
    const { env, tokens } = await seeded();
    const serve = await startServe(env);
    const inflight = fetch(`${serve.url}/api/slow`, { headers: { 'x-egress-token': tokens.svc! } });
    await new Promise((r) => setTimeout(r, 200));
    const exited = serve.stop('SIGTERM');
    const res = await inflight;
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('slow ok');
    expect(await exited).toBe(0);
  });
});
