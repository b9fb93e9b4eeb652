import { createHmac, timingSafeEqual } from 'node:crypto';
import { createServer, request, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { rawRequest } from '../helpers/raw.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { bearerRoute } from '../helpers/routes.ts';

/** Every default alert rule fires when provoked, and none fires on normal traffic. */
const SECRET = 'sk_alert_CANARY_5150';
const WEBHOOK_SECRET = 'whsec_test_0123456789abcdef';
let upstream: Upstream;
let receiver: Server;
let receiverUrl: string;
const received: { body: string; signature: string; ok: boolean; authorization: string | undefined }[] = [];
let failNext = 0;
let proxy: TestProxy | undefined;

beforeAll(async () => {
  upstream = await startUpstream((req, res) => {
    res.writeHead(req.url === '/reject' ? 401 : 200, { 'content-type': 'application/json' });
    res.end('{}');
  });
  // The receiver checks the signature with its own code: HMAC-SHA256 over "<t>.<body>", fresh t.
  receiver = createServer((req, res) => {
    let body = '';
    req.on('data', (d: Buffer) => (body += d.toString()));
    req.on('end', () => {
      const header = String(req.headers['x-egress-signature'] ?? '');
      const t = /t=(\d+)/.exec(header)?.[1] ?? '';
      const v1 = /v1=([0-9a-f]+)/.exec(header)?.[1] ?? '';
      const expected = createHmac('sha256', WEBHOOK_SECRET).update(`${t}.${body}`).digest();
      const ok = v1.length === 64 && timingSafeEqual(Buffer.from(v1, 'hex'), expected) && Math.abs(Date.now() / 1000 - Number(t)) < 300;
      received.push({ body, signature: header, ok, authorization: req.headers.authorization });
      if (failNext > 0) {
        failNext--;
        res.writeHead(500);
      } else {
        res.writeHead(ok ? 204 : 401);
      }
      res.end();
    });
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
  receiverUrl = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hook`;
});

afterAll(async () => {
  await upstream?.close();
  await new Promise<void>((r) => receiver.close(() => r()));
});

afterEach(async () => {
  await proxy?.close();
  proxy = undefined;
});

const ROUTE = () => bearerRoute({ upstream: upstream.url, paths: ['/ok', '/reject'], methods: ['GET', 'POST'] });

async function start(options: { alerts?: string; webhook?: boolean; credentialAgeDays?: number } = {}): Promise<{ env: Record<string, string>; dir: string }> {
  const dir = await makeTempDir('egress-alerts-');
  await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
  if (options.credentialAgeDays) {
    const path = join(dir, 'store.json');
    const doc = JSON.parse(await readFile(path, 'utf8')) as { credentials: { key: { versions: { created_at: string; activated_at?: string }[] } } };
    const old = new Date(Date.now() - options.credentialAgeDays * 86_400_000).toISOString();
    doc.credentials.key.versions[0]!.created_at = old;
    doc.credentials.key.versions[0]!.activated_at = old;
    await writeFile(path, JSON.stringify(doc), { mode: 0o600 });
  }
  const env: Record<string, string> = {};
  if (options.alerts) {
    await writeFile(join(dir, 'alerts.yaml'), options.alerts);
    env.EGRESS_ALERTS = join(dir, 'alerts.yaml');
  }
  if (options.webhook) {
    await writeFile(join(dir, 'webhook.secret'), WEBHOOK_SECRET, { mode: 0o600 });
    env.EGRESS_ALERT_WEBHOOK = receiverUrl;
    env.EGRESS_ALERT_WEBHOOK_SECRET_FILE = join(dir, 'webhook.secret');
  }
  proxy = await startTestProxy({ routes: {}, dir, env });
  return { env: envFor(dir, env), dir };
}

const tokens = async (dir: string) => (JSON.parse(await readFile(join(dir, 'store.json'), 'utf8')) as { callers: Record<string, unknown> }).callers;
const alertIds = () => proxy!.services().rules.alerts.recent().map((a) => a.id);
const get = (path: string, token: string | null) => fetch(`${proxy!.url}${path}`, { headers: token ? { 'x-egress-token': token } : {} }).then((r) => r.status);

describe('alert rules', () => {
  it('normal traffic raises nothing', async () => {
    await start();
    const token = (await runCli(['callers', 'rotate', 'svc', '--grace', '1h', '--json'], envFor(proxy!.dir))).stdout;
    const fresh = (JSON.parse(token) as { token: string }).token;
    await eventually(async () => (await get('/api/ok', fresh)) === 200, 1_000, 'the rotated token');
    for (let i = 0; i < 150; i++) expect(await get('/api/ok', fresh)).toBe(200);
    for (let i = 0; i < 5; i++) expect(await get('/api/nope', fresh)).toBe(403);
    expect(alertIds()).toEqual([]);
    expect(await (await fetch(`${proxy!.admin}/metrics`)).text()).not.toContain('egress_alerts_total{');
  });

  it('denied_spike: a caller refused 20 times within a minute', async () => {
    const { dir } = await start();
    void dir;
    const token = proxy!.tokens.svc ?? (await newToken());
    for (let i = 0; i < 20; i++) expect(await get('/api/forbidden', token)).toBe(403);
    expect(alertIds()).toContain('denied_spike');
  });

  it('unknown_token: 10 unknown tokens from one address within a minute', async () => {
    await start();
    for (let i = 0; i < 10; i++) expect(await get('/api/ok', `egt_${'x'.repeat(42)}${i % 10}`)).toBe(401);
    expect(alertIds()).toEqual(['unknown_token']);
    const alert = proxy!.services().rules.alerts.recent()[0]!;
    expect(alert.subject).toBe('127.0.0.1');
  });

  it('unknown_token over all addresses: unknown tokens from several addresses, each under its own count', async () => {
    await start({ alerts: 'unknown_token: { count: 10, total: 5, window: 1m }\n' });
    const fromAddress = (localAddress: string) => new Promise<number>((resolve, reject) => {
      const url = new URL(`${proxy!.url}/api/ok`);
      request({ host: url.hostname, port: url.port, path: url.pathname, localAddress, agent: false, headers: { 'x-egress-token': `egt_${'y'.repeat(43)}` } }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      }).on('error', reject).end();
    });
    for (const last of [2, 3, 4, 5]) expect(await fromAddress(`127.0.0.${last}`)).toBe(401);
    expect(alertIds()).toEqual([]);
    expect(await fromAddress('127.0.0.6')).toBe(401);
    expect(proxy!.services().rules.alerts.recent().map((a) => [a.id, a.subject, a.facts.attempts])).toEqual([['unknown_token', 'all addresses', 5]]);
  });

  it('unknown_token over all addresses: an EGRESS_ALERTS file that raised the per-address count, and sets no total, gets no alert from one address under its count', async () => {
    // Written before there was a total: one address (a NAT, a service on an old token) may send up to 500 a minute.
    await start({ alerts: 'unknown_token: { count: 500, window: 1m }\n' });
    for (let i = 0; i < 150; i++) expect(await get('/api/ok', `egt_${'z'.repeat(43)}`)).toBe(401);
    expect(alertIds()).toEqual([]);
  });

  it('retired_credential_used: a token that was rotated out or revoked is still presented', async () => {
    await start();
    const old = await newToken();
    await runCli(['callers', 'rotate', 'svc', '--grace', '0'], envFor(proxy!.dir));
    await eventually(async () => (await get('/api/ok', old)) === 401, 1_000, 'the old token to stop');
    expect(alertIds()).toContain('retired_credential_used');
  });

  it('retired_credential_used: a token revoked with its caller is still recognised once the name is added again', async () => {
    const { env } = await start();
    const old = await newToken();
    expect((await runCli(['callers', 'revoke', 'svc'], env)).code).toBe(0);
    // Not presented in between: the alert would be raised then, and not again within its cooldown.
    await eventually(() => proxy!.services().store.snapshot()?.callers.get('svc')?.revoked_at !== undefined, 1_000, 'the revocation');
    const added = await runCli(['callers', 'add', 'svc', '--json'], env);
    expect(added.code, added.stderr).toBe(0);
    const fresh = (JSON.parse(added.stdout) as { token: string }).token;
    await eventually(async () => (await get('/api/ok', fresh)) === 200, 1_000, 'the caller added again');
    expect(await get('/api/ok', old)).toBe(401);
    expect(proxy!.services().rules.alerts.recent().map((a) => [a.id, a.subject])).toContainEqual(['retired_credential_used', 'svc']);
  });

  it('upstream_rejected_credential: the upstream rejects the key and nothing can be fallen back to', async () => {
    await start();
    expect(await get('/api/reject', await newToken())).toBe(401);
    expect(alertIds()).toContain('upstream_rejected_credential');
  });

  it('upstream_rejected_credential says why nothing was re-sent: a previous version is in grace, but a POST is not replay-safe', async () => {
    const { env } = await start();
    const token = await newToken();
    const rotated = await runCli(['keys', 'rotate', 'key', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ token: 'tok_alerts_second_9f2' }));
    expect(rotated.code, rotated.stderr).toBe(0);
    await eventually(() => proxy!.services().store.credential('key')?.versions.some((v) => v.state === 'previous') === true, 2_000, 'the rotation');
    expect(await fetch(`${proxy!.url}/api/reject`, { method: 'POST', headers: { 'x-egress-token': token } }).then((r) => r.status)).toBe(401);
    const alert = proxy!.services().rules.alerts.recent().find((a) => a.id === 'upstream_rejected_credential')!;
    expect(alert.message).not.toContain('no previous version is in grace');
    expect(alert.message).toContain('not replay-safe');
    expect(alert.facts).toMatchObject({ credential: 'key', version: 2, previous_version: 1 });
  });

  it('credential_max_age: a current version older than its maximum age (checked at start and every minute)', async () => {
    await start({ credentialAgeDays: 100 });
    expect(alertIds()).toContain('credential_max_age');
    const alert = proxy!.services().rules.alerts.recent().find((a) => a.id === 'credential_max_age')!;
    expect(alert.facts).toMatchObject({ credential: 'key', age_days: 100, max_age_days: 90 });
  });

  it('credential_max_age for a credential named like an Object property ("constructor"): the proxy starts, and its own maximum age applies', async () => {
    const dir = await makeTempDir('egress-alerts-');
    await seedDataDir(dir, { routes: {}, credentials: { constructor: { token: SECRET }, key: { token: SECRET } }, callers: ['svc'] });
    await writeFile(join(dir, 'alerts.yaml'), 'credential_max_age: { credentials: { key: 1ms } }\n');
    // Read as the alerts file's entry for it, the inherited Object.prototype.constructor made the
    // check throw: at start, and from then on every minute.
    proxy = await startTestProxy({ routes: {}, dir, env: { EGRESS_ALERTS: join(dir, 'alerts.yaml') } });
    const subjects = proxy.services().rules.alerts.recent().filter((a) => a.id === 'credential_max_age').map((a) => a.subject);
    expect(subjects).toEqual(['key']);
  });

  it('reload_rejected: a route folder that turns invalid', async () => {
    const { dir } = await start();
    await writeFile(join(dir, 'routes', 'bad.yaml'), 'nonsense: true\n');
    await eventually(() => alertIds().includes('reload_rejected'), 3_000, 'the reload alert');
  });

  it('reload_rejected (subject keyring): a master key file that changes and cannot be used reaches the webhook and egress_alerts_total, once in the cool-down', async () => {
    received.length = 0;
    const { dir } = await start({ webhook: true });
    const keyAlerts = () => received.map((r) => JSON.parse(r.body) as { id: string; subject: string; severity: string; facts: Record<string, unknown> }).filter((a) => a.id === 'reload_rejected' && a.subject === 'keyring');
    await writeFile(join(dir, 'master.key'), 'not a keyring_CANARY\n', { mode: 0o600 });
    await eventually(() => keyAlerts().length === 1, 5_000, 'the keyring alert at the webhook');
    expect(keyAlerts()[0]).toMatchObject({ severity: 'critical', facts: { master_key_file: join(dir, 'master.key') } });
    expect(String(keyAlerts()[0]!.facts.reason)).toContain('not a valid keyring');
    // A second bad change inside the cool-down is counted, not sent again.
    await writeFile(join(dir, 'master.key'), '{"format": "other_CANARY"}\n', { mode: 0o600 });
    await new Promise((r) => setTimeout(r, 1_500));
    expect(keyAlerts()).toHaveLength(1);
    const metrics = await (await fetch(`${proxy!.admin}/metrics`)).text();
    expect(metrics).toMatch(/egress_alerts_total\{alert="reload_rejected",severity="critical"\} 1/);
    expect(received.map((r) => r.body).join('') + proxy!.logs()).not.toContain('CANARY');
    // The keyring loaded before is still in use.
    expect(await get('/api/ok', await newToken())).toBe(200);
  });

  it('unusual_usage: far above the caller\'s own baseline (thresholds from the alerts file)', async () => {
    await start({ alerts: 'unusual_usage:\n  bucket: 500ms\n  warmup: 2s\n  half_life: 2s\n  factor: 4\n  min_count: 15\n' });
    const token = await newToken();
    const until = Date.now() + 2_600;
    while (Date.now() < until) {
      expect(await get('/api/ok', token)).toBe(200);
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(alertIds()).not.toContain('unusual_usage');
    for (let i = 0; i < 40; i++) await get('/api/ok', token);
    expect(alertIds()).toContain('unusual_usage');
  });

  it('an incident is one alert: repeats inside the cool-down are counted, not re-sent', async () => {
    await start();
    for (let i = 0; i < 35; i++) await get('/api/ok', `egt_${'y'.repeat(42)}${i % 10}`);
    expect(alertIds()).toEqual(['unknown_token']);
    const metrics = await (await fetch(`${proxy!.admin}/metrics`)).text();
    expect(metrics).toMatch(/egress_alerts_total\{alert="unknown_token",severity="warning"\} 1/);
  });

  it('the alerts file is validated with positions', async () => {
    const dir = await makeTempDir('egress-alerts-bad-');
    await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    await writeFile(join(dir, 'alerts.yaml'), 'cooldown: 5m\ndenied_spike:\n  count: many\n');
    const res = await runCli(['serve'], envFor(dir, { EGRESS_ALERTS: join(dir, 'alerts.yaml') }));
    expect(res.code).toBe(1);
    expect(res.stderr).toMatch(/alerts\.yaml:3:\d+: denied_spike\.count/);
  });

  async function newToken(): Promise<string> {
    const added = await runCli(['callers', 'rotate', 'svc', '--grace', '1h', '--json'], envFor(proxy!.dir));
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    await eventually(async () => (await get('/api/ok', token)) === 200, 1_000, 'a fresh token');
    void tokens;
    return token;
  }
});

describe('alerts in the operational log', () => {
  it('are logged at EGRESS_LOG_LEVEL=error too: a warning alert is not filtered out with the other warnings', async () => {
    await start();
    await proxy!.close();
    proxy = await startTestProxy({ routes: {}, dir: proxy!.dir, env: { EGRESS_LOG_LEVEL: 'error' } });
    for (let i = 0; i < 10; i++) expect(await get('/api/ok', `egt_${'q'.repeat(42)}${i}`)).toBe(401);
    expect(alertIds()).toEqual(['unknown_token']);
    const line = proxy.logs().split('\n').find((l) => l.includes('"alert":"unknown_token"'));
    expect(line, proxy.logs()).toBeDefined();
    expect(JSON.parse(line!)).toMatchObject({ severity: 'warning', subject: '127.0.0.1', attempts: 10 });
    // Everything else stays at the level asked for.
    expect(proxy.logs()).not.toContain('egress-proxy listening');
  });
});

describe('the webhook', () => {
  it('receives alerts as signed JSON, retried after a failure; no secret in them', async () => {
    received.length = 0;
    failNext = 1;
    await start({ webhook: true });
    for (let i = 0; i < 10; i++) await get('/api/ok', `egt_${'z'.repeat(42)}${i}`);
    await eventually(() => received.length >= 2, 5_000, 'the retried delivery');
    expect(received[0]!.ok).toBe(true);
    expect(received[1]!.ok).toBe(true);
    expect(received[1]!.body).toBe(received[0]!.body);
    const payload = JSON.parse(received[1]!.body) as { id: string; severity: string; subject: string; facts: Record<string, unknown> };
    expect(payload).toMatchObject({ id: 'unknown_token', severity: 'warning', subject: '127.0.0.1' });
    expect(received.map((r) => r.body).join('')).not.toContain(SECRET);
    expect(received.map((r) => r.body).join('')).not.toContain(WEBHOOK_SECRET);
  });

  it('a user name and password in the webhook URL are sent as Basic credentials, and logged nowhere', async () => {
    received.length = 0;
    const dir = await makeTempDir('egress-hook-auth-');
    await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    await writeFile(join(dir, 'webhook.secret'), WEBHOOK_SECRET, { mode: 0o600 });
    const password = 'pw_CANARY_hook/+:%';
    const url = new URL(receiverUrl);
    url.username = 'alerts';
    // The URL setter leaves "%" as it is; a "%" of the password itself is written %25.
    url.password = encodeURIComponent(password);
    const serve = await startServe(envFor(dir, { EGRESS_ALERT_WEBHOOK: url.href, EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'webhook.secret'), EGRESS_LOG_LEVEL: 'trace' }));
    try {
      for (let i = 0; i < 10; i++) await fetch(`${serve.url}/api/ok`, { headers: { 'x-egress-token': `egt_${'y'.repeat(42)}${i}` } });
      await eventually(() => received.length >= 1, 5_000, 'the delivery');
      expect(received[0]!.ok).toBe(true);
      expect(received[0]!.authorization).toBe(`Basic ${Buffer.from(`alerts:${password}`).toString('base64')}`);
      expect(serve.output()).toContain('unknown_token');
      expect(serve.output()).not.toContain('CANARY');
      expect(received[0]!.body).not.toContain('CANARY');
    } finally {
      await serve.stop();
    }
  });

  it('a malformed %-escape in the webhook URL\'s password is refused at start (exit 2), without quoting it', async () => {
    const dir = await makeTempDir('egress-hook-escape-');
    await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    await writeFile(join(dir, 'webhook.secret'), WEBHOOK_SECRET, { mode: 0o600 });
    const hook = receiverUrl.replace('http://', 'http://alerts:pw_CANARY_%zz@');
    const result = await runCli(['serve'], envFor(dir, { EGRESS_ALERT_WEBHOOK: hook, EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'webhook.secret') }));
    expect(result.code).toBe(2);
    expect(result.stderr).toContain('EGRESS_ALERT_WEBHOOK has a malformed %-escape in its user name or password (write "%" as %25)');
    expect(result.stdout + result.stderr).not.toContain('CANARY');
  });

  it('a receiver that never answers holds one delivery at a time and at most 200 alerts waiting: the rest are dropped, and said so', async () => {
    let connections = 0;
    let requests = 0;
    const silent = createServer(() => {
      requests++;
    });
    silent.on('connection', () => connections++);
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const dir = await makeTempDir('egress-hook-silent-');
    await seedDataDir(dir, { routes: {}, callers: [] });
    await writeFile(join(dir, 'webhook.secret'), WEBHOOK_SECRET, { mode: 0o600 });
    proxy = await startTestProxy({ routes: {}, dir, env: { EGRESS_ALERT_WEBHOOK: `http://127.0.0.1:${(silent.address() as AddressInfo).port}/hook`, EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'webhook.secret') } });
    try {
      const alerts = proxy.services().rules.alerts;
      for (let i = 0; i < 1_000; i++) alerts.raise('unknown_token', 'warning', `10.1.${i >> 8}.${i & 255}`, 'unknown caller tokens from one address');
      await eventually(() => requests === 1, 2_000, 'the first delivery');
      await new Promise((r) => setTimeout(r, 300));
      // The first is out; 200 wait behind it; the other 799 went, each with a line in the log.
      expect({ connections, requests }).toEqual({ connections: 1, requests: 1 });
      expect(proxy.logs().split('alert webhook queue is full; dropping the oldest of the least severe alerts').length - 1).toBe(799);
      // Every alert is in the log whatever became of its delivery.
      expect(proxy.logs().split('"alert":"unknown_token"').length - 1).toBe(1_000);
    } finally {
      await proxy.close();
      proxy = undefined;
      silent.closeAllConnections();
      await new Promise<void>((r) => silent.close(() => r()));
    }
  });

  it('a full queue gives up the least severe alerts first: a flood of warnings behind a dead receiver does not push out a critical alert', async () => {
    const held: ServerResponse[] = [];
    let answering = false;
    const bodies: string[] = [];
    const receiver = createServer((req, res) => {
      let body = '';
      req.on('data', (chunk: Buffer) => (body += chunk.toString()));
      req.on('end', () => {
        bodies.push(body);
        if (answering) res.end();
        else held.push(res);
      });
    });
    await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
    const dir = await makeTempDir('egress-hook-rank-');
    await seedDataDir(dir, { routes: {}, callers: [] });
    await writeFile(join(dir, 'webhook.secret'), WEBHOOK_SECRET, { mode: 0o600 });
    proxy = await startTestProxy({ routes: {}, dir, env: { EGRESS_ALERT_WEBHOOK: `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hook`, EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'webhook.secret') } });
    try {
      const alerts = proxy.services().rules.alerts;
      alerts.raise('unknown_token', 'warning', '10.2.0.1', 'the first, held by the receiver');
      await eventually(() => held.length === 1, 2_000, 'the first delivery');
      alerts.raise('store_unreachable', 'critical', 'store', 'the critical one');
      for (let i = 0; i < 400; i++) alerts.raise('unknown_token', 'warning', `10.3.${i >> 8}.${i & 255}`, 'a flood');
      answering = true;
      for (const res of held) res.end();
      await eventually(() => bodies.length === 201, 10_000, 'the queue delivered');
      expect(bodies.filter((b) => b.includes('"severity":"critical"'))).toHaveLength(1);
      expect(proxy.logs().split('dropping the oldest of the least severe alerts').length - 1).toBe(201);
    } finally {
      await proxy.close();
      proxy = undefined;
      receiver.closeAllConnections();
      await new Promise<void>((r) => receiver.close(() => r()));
    }
  });

  it('a webhook without a 0600 secret file refuses to start', async () => {
    const dir = await makeTempDir('egress-hook-');
    await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    expect((await runCli(['serve'], envFor(dir, { EGRESS_ALERT_WEBHOOK: receiverUrl }))).stderr).toContain('EGRESS_ALERT_WEBHOOK_SECRET_FILE');
    await writeFile(join(dir, 'hook.secret'), WEBHOOK_SECRET, { mode: 0o644 });
    const loose = await runCli(['serve'], envFor(dir, { EGRESS_ALERT_WEBHOOK: receiverUrl, EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'hook.secret') }));
    expect(loose.code).toBe(1);
    expect(loose.stderr).toContain('chmod 600');
  });
});

describe('audit log rotation', () => {
  it('rotates by size, keeps N files, and the chain verifies across them; an edit in a rotated file is found', async () => {
    const dir = await makeTempDir('egress-audit-');
    await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    proxy = await startTestProxy({ routes: {}, dir, env: { EGRESS_AUDIT_MAX_SIZE: '2kb', EGRESS_AUDIT_KEEP: '3' } });
    const token = JSON.parse((await runCli(['callers', 'rotate', 'svc', '--grace', '1h', '--json'], envFor(dir))).stdout).token as string;
    await eventually(async () => (await get('/api/ok', token)) === 200, 1_000, 'token');
    for (let i = 0; i < 40; i++) await get('/api/ok', token);
    await proxy.close();
    proxy = undefined;
    const { readdir } = await import('node:fs/promises');
    const files = (await readdir(dir)).filter((f) => f.startsWith('audit.log')).sort();
    expect(files).toEqual(['audit.log', 'audit.log.1', 'audit.log.2', 'audit.log.3']);
    const env = envFor(dir);
    // The oldest files were removed by retention, so the chain starts mid-way: a partial check.
    const ok = await runCli(['audit', 'verify', '--partial'], env);
    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(/audit chain intact: \d+ lines/);
    const rotated = join(dir, 'audit.log.2');
    const lines = (await readFile(rotated, 'utf8')).split('\n');
    lines[1] = lines[1]!.replace('"decision":"allow"', '"decision":"deny"');
    await writeFile(rotated, lines.join('\n'));
    const bad = await runCli(['audit', 'verify', '--partial'], env);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toContain('audit.log.2:3');
  });

  it('a restarted proxy counts the lines already in audit.log toward the size limit', async () => {
    const dir = await makeTempDir('egress-audit-restart-');
    const { tokens: t } = await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    const env = { EGRESS_AUDIT_MAX_SIZE: '4kb', EGRESS_AUDIT_KEEP: '3' };
    proxy = await startTestProxy({ routes: {}, dir, env });
    for (let i = 0; i < 6; i++) expect(await get('/api/ok', t.svc!)).toBe(200);
    await proxy.close();
    const { readdir, stat } = await import('node:fs/promises');
    const before = (await stat(join(dir, 'audit.log'))).size;
    // More than half the limit already: the second proxy's share alone stays under it.
    expect(before).toBeGreaterThan(2048);
    expect(before).toBeLessThan(4096);
    proxy = await startTestProxy({ routes: {}, dir, env });
    for (let i = 0; i < 6; i++) expect(await get('/api/ok', t.svc!)).toBe(200);
    await proxy.close();
    proxy = undefined;
    expect((await readdir(dir)).filter((f) => f.startsWith('audit.log')).sort()).toEqual(['audit.log', 'audit.log.1']);
    expect((await runCli(['audit', 'verify'], envFor(dir))).code).toBe(0);
  });

  it('a full disk is reported, not crashed on: requests keep being served', async () => {
    const dir = await makeTempDir('egress-audit-full-');
    const { tokens: t } = await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    // /dev/full accepts the open and fails every write with ENOSPC.
    proxy = await startTestProxy({ routes: {}, dir, env: { EGRESS_AUDIT_LOG: '/dev/full' } });
    for (let i = 0; i < 20; i++) expect(await get('/api/ok', t.svc!)).toBe(200);
    await eventually(() => proxy!.logs().includes('audit log write failed'), 2_000, 'the write failure to be reported');
    expect(proxy!.logs()).toContain('"code":"ENOSPC"');
    expect((await fetch(`${proxy!.admin}/healthz`)).status).toBe(200);
    expect(await get('/api/ok', t.svc!)).toBe(200);
  });

  it('EGRESS_AUDIT_STDOUT also writes every audit line to stdout', async () => {
    const dir = await makeTempDir('egress-audit-stdout-');
    const { tokens: t } = await seedDataDir(dir, { routes: { api: ROUTE() }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    const { startServe } = await import('../helpers/cli.ts');
    const serve = await startServe(envFor(dir, { EGRESS_AUDIT_STDOUT: 'true' }));
    try {
      await fetch(`${serve.url}/api/ok`, { headers: { 'x-egress-token': t.svc! } });
      await eventually(() => serve.output().includes('"kind":"request"'), 2_000, 'the audit line on stdout');
      expect(serve.output()).toMatch(/"kind":"request".*"route":"api".*"prev":"[0-9a-f]{64}"/);
    } finally {
      await serve.stop();
    }
  });
});

describe('metrics', () => {
  it('credential age and version in use, rate limiting, store cache age', async () => {
    await start({ credentialAgeDays: 3 });
    const metrics = await (await fetch(`${proxy!.admin}/metrics`)).text();
    expect(metrics).toMatch(/egress_credential_age_seconds\{credential="key"\} (25[0-9]{4}|26[0-9]{4})/);
    expect(metrics).toMatch(/egress_credential_current_version\{credential="key"\} 1/);
    expect(metrics).toMatch(/egress_store_cache_age_seconds \d/);
    expect(metrics).toContain('egress_rate_limited_total');
    expect(metrics).not.toContain(SECRET);
    void rawRequest;
  });
});
