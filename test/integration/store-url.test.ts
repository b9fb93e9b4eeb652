import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe } from '../helpers/cli.ts';
import { envFor, makeTempDir } from '../helpers/proxy.ts';
import { freePort, TestRedis } from '../helpers/redis.ts';
import { openStore } from '../../src/store/open-store.ts';
import { parseRedisUrl } from '../../src/store/redis-client.ts';

// A Redis password as generated ones look: base64 with "/" and "+", and an "@" typed unencoded.
// Every piece between those characters is marked, so a piece that leaks is found.
const PASSWORD = 'pwA_CANARY/pwB_CANARY+pwC_CANARY@pwD_CANARY';

let redis: TestRedis;
let dir: string;

beforeAll(async () => {
  redis = await TestRedis.create();
  const admin = redis.client();
  await admin.config('SET', 'requirepass', PASSWORD);
  admin.disconnect();
  dir = await makeTempDir('egress-store-url-');
  await mkdir(join(dir, 'routes'));
  const init = await runCli(['master-key', 'init'], envFor(dir));
  expect(init.code).toBe(0);
});

afterAll(async () => {
  await redis?.destroy();
});

describe('a Redis password in EGRESS_STORE', () => {
  it('with "/", "+" and "@" in it, authenticates and appears nowhere in the output', async () => {
    for (const store of [`redis://:${PASSWORD}@127.0.0.1:${redis.port}/0`, `redis://:${encodeURIComponent(PASSWORD)}@127.0.0.1:${redis.port}/0`]) {
      const list = await runCli(['keys', 'list', '--json'], envFor(dir, { EGRESS_STORE: store }));
      expect(list.stdout + list.stderr).not.toContain('CANARY');
      expect(list.code, list.stderr).toBe(0);
    }
  });

  it('is masked whole in the message when the store is unreachable', async () => {
    const port = await freePort();
    const failed = await runCli(['keys', 'list'], envFor(dir, { EGRESS_STORE: `redis://:${PASSWORD}@127.0.0.1:${port}/0` }));
    expect(failed.code).toBe(1);
    expect(failed.stderr).toContain(`redis://:***@127.0.0.1:${port}/0`);
    expect(failed.stdout + failed.stderr).not.toContain('CANARY');
  });

  it('is not quoted by the message for a URL that does not parse', async () => {
    for (const store of [`redis://:${PASSWORD}@127.0.0.1:${redis.port},:x/0`, `redis://:pw%E0_CANARY@127.0.0.1:${redis.port}/0`]) {
      const bad = await runCli(['keys', 'list'], envFor(dir, { EGRESS_STORE: store }));
      expect(bad.code).toBe(2);
      expect(bad.stderr).toContain('EGRESS_STORE');
      expect(bad.stdout + bad.stderr).not.toContain('CANARY');
    }
  });
});

describe('EGRESS_STORE parameters', () => {
  it('a parameter the scheme does not take, or tls that is not true or false, is a usage error naming it (exit 2) and nothing is read or written in the clear', async () => {
    const base = `redis://:${encodeURIComponent(PASSWORD)}@127.0.0.1:${redis.port}`;
    const runs = [
      // A TLS intent that was ignored: the connection went in the clear, password and all.
      [`${base}/0?tls=1`, 'tls'],
      [`${base}/0?tls=yes_CANARY`, 'tls'],
      [`${base}/0?ssl=true`, 'ssl'],
      // A database given where this scheme does not read it: the store went to database 0.
      [`${base}?db=5`, 'db'],
      // A misspelt password_file: the password was silently not read.
      [`redis://127.0.0.1:${redis.port}/0?passwordfile=/nonexistent`, 'passwordfile'],
      [`redis-cluster://127.0.0.1:${redis.port}/3`, 'database'],
    ] as const;
    for (const [store, named] of runs) {
      const res = await runCli(['callers', 'add', 'param-probe', '--json'], envFor(dir, { EGRESS_STORE: store }));
      expect(res.code, store).toBe(2);
      expect(res.stderr, store).toContain('EGRESS_STORE');
      expect(res.stderr, store).toContain(named);
      expect(res.stdout + res.stderr, store).not.toContain('CANARY');
    }
    const c = redis.client({ password: PASSWORD });
    expect(await c.get('egress:{egress}:caller:param-probe')).toBeNull();
    c.disconnect();
  });

  it('a value that is no store URL is refused naming its scheme at most, never a piece of what follows it', async () => {
    for (const [store, scheme] of [['tcp://:pw_CANARY@127.0.0.1:6379', '"tcp"'], ['ssl://u:pw_CANARY@h', '"ssl"'], ['pw_CANARY@127.0.0.1:6379', undefined], [':pw_CANARY', undefined]] as const) {
      const res = await runCli(['keys', 'list'], envFor(dir, { EGRESS_STORE: store }));
      expect(res.code, store).toBe(2);
      expect(res.stderr, store).toContain('EGRESS_STORE must be file:PATH');
      if (scheme) expect(res.stderr, store).toContain(scheme);
      expect(res.stdout + res.stderr, store).not.toMatch(/pw|CANARY/);
    }
  });

  it('a port out of range, or a database number that is not plain digits, is a usage error (exit 2), not a proxy that starts and never connects', async () => {
    for (const store of [`redis://127.0.0.1:99999/0`, `redis://127.0.0.1:0/0`, `redis-sentinel://127.0.0.1:70000/main`, `redis://127.0.0.1:${redis.port}/1e1`, `redis://127.0.0.1:${redis.port}/0x1`, `redis-sentinel://127.0.0.1:26379/main?db=1.0`]) {
      const res = await runCli(['keys', 'list'], envFor(dir, { EGRESS_STORE: store }));
      expect(res.code, `${store}: ${res.stderr}`).toBe(2);
      expect(res.stderr, store).toMatch(/EGRESS_STORE (has a bad host|database number)/);
    }
  });

  it('?password_file= reads the password (a trailing newline is not part of it); an empty file is said to be empty, not taken for no password', async () => {
    const file = join(dir, 'redis-password');
    await writeFile(file, `${PASSWORD}\n`, { mode: 0o600 });
    const good = await runCli(['keys', 'list'], envFor(dir, { EGRESS_STORE: `redis://127.0.0.1:${redis.port}/0?password_file=${file}` }));
    expect(good.code, good.stderr).toBe(0);
    expect(good.stdout + good.stderr).not.toContain('CANARY');
    // A secret mounted empty: before, the store connected without a password and said NOAUTH.
    await writeFile(file, '\n');
    const empty = await runCli(['keys', 'list'], envFor(dir, { EGRESS_STORE: `redis://127.0.0.1:${redis.port}/0?password_file=${file}` }));
    expect(empty.code).toBe(1);
    expect(empty.stderr).toBe(`egress: EGRESS_STORE password_file ${file} is empty\n`);
  });

  it('a database number the server does not have is an error on every read and write, never database 0 in its place', async () => {
    const url = `redis://:${encodeURIComponent(PASSWORD)}@127.0.0.1:${redis.port}/99`;
    const res = await runCli(['callers', 'add', 'db-probe', '--json'], envFor(dir, { EGRESS_STORE: url }));
    expect(res.code, res.stdout).toBe(1);
    expect(res.stdout + res.stderr).not.toContain('CANARY');
    // A running proxy reads the store again and again: after the first refusal it went on in
    // database 0, another store's (ioredis carries on after a failed SELECT).
    const store = openStore(url);
    try {
      for (let i = 0; i < 3; i++) {
        const read = await store.load().then(() => 'read database 0', (err: Error) => err.message);
        expect(read, `read ${i}`).toBe(`the store redis://:***@127.0.0.1:${redis.port}/99 is unreachable (ERR DB index is out of range): nothing was read or written`);
        await new Promise((r) => setTimeout(r, 600));
      }
      const at = new Date().toISOString();
      const written = await store.put('caller', { name: 'db-probe', revision: 1, created_at: at, updated_at: at, tokens: [] }, 0).then(() => 'written', (err: Error) => err.message);
      expect(written).toContain('is unreachable (ERR DB index is out of range)');
    } finally {
      await store.close();
    }
    const c = redis.client({ password: PASSWORD });
    expect(await c.get('egress:{egress}:caller:db-probe')).toBeNull();
    c.disconnect();
  });

  it('every connection made from EGRESS_STORE, not only the store\'s own (the subscribers to the store\'s changes and to the rate limiter\'s pauses), refuses a database number the server does not have, never database 0 in its place', async () => {
    const c = redis.client({ password: PASSWORD });
    await c.set('egress:db-probe:marker', 'database 0');
    const connection = parseRedisUrl(`redis://:${encodeURIComponent(PASSWORD)}@127.0.0.1:${redis.port}/99`).connect();
    const errors: string[] = [];
    connection.on('error', (err: Error) => errors.push(err.message));
    try {
      const answers: string[] = [];
      for (let i = 0; i < 12; i++) {
        answers.push(await connection.get('egress:db-probe:marker').then((v) => `read ${v}`, () => 'refused'));
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(answers).toEqual(Array(12).fill('refused'));
      expect(errors.some((m) => m.startsWith('ERR DB index is out of range'))).toBe(true);
      expect(connection.status).not.toBe('ready');
    } finally {
      connection.disconnect();
      await c.del('egress:db-probe:marker');
      c.disconnect();
    }
  });
});

describe('a password on the command line', () => {
  it('is refused in --store and --alert-webhook (argv is readable by every user), without quoting it', async () => {
    const runs = [
      await runCli(['keys', 'list', '--store', `redis://:${PASSWORD}@127.0.0.1:${redis.port}/0`], envFor(dir)),
      await runCli(['serve', '--store', `redis-sentinel://app:pw_CANARY@127.0.0.1:1/mymaster`], envFor(dir)),
      await runCli(['serve', '--alert-webhook', 'https://alerts:pw_CANARY@hooks.example/egress'], envFor(dir)),
    ];
    for (const run of runs) {
      expect(run.code).toBe(2);
      expect(run.stderr).toMatch(/EGRESS_STORE|EGRESS_ALERT_WEBHOOK/);
      expect(run.stdout + run.stderr).not.toContain('CANARY');
    }
    // Without a password a flag is fine; with one, the environment variable is the way.
    expect((await runCli(['keys', 'list', '--store', `redis://127.0.0.1:${redis.port}/0`], envFor(dir))).stderr).not.toContain('command line');
    expect((await runCli(['keys', 'list'], envFor(dir, { EGRESS_STORE: `redis://:${PASSWORD}@127.0.0.1:${redis.port}/0` }))).code).toBe(0);
  });
});

describe('the admin API while the store cannot be read', () => {
  it('answers 503 store_unavailable to a presented token, on the API and the status page, not 401 as if the token were wrong', async () => {
    const store = `redis://:${encodeURIComponent(PASSWORD)}@127.0.0.1:${redis.port}/0`;
    const created = await runCli(['admin-token', 'create', 'rotator', '--json'], envFor(dir, { EGRESS_STORE: store }));
    expect(created.code, created.stderr).toBe(0);
    const token = (JSON.parse(created.stdout) as { token: string }).token;
    await redis.stop();
    const serve = await startServe(envFor(dir, { EGRESS_STORE: store }));
    try {
      const res = await fetch(`${serve.admin}/v1/credentials`, { headers: { authorization: `Bearer ${token}` } });
      expect(res.status).toBe(503);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe('store_unavailable');
      const page = await fetch(`${serve.admin}/`, { headers: { authorization: `Basic ${Buffer.from(`ops:${token}`).toString('base64')}` } });
      expect(page.status).toBe(503);
      expect(page.headers.get('www-authenticate')).toBeNull();
      // Without a token it is still a 401: nothing about the store is told to an anonymous client.
      expect((await fetch(`${serve.admin}/v1/credentials`)).status).toBe(401);
      expect(serve.output()).not.toContain('CANARY');
    } finally {
      await serve.stop();
      await redis.start();
    }
  });
});
