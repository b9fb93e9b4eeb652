import { readFile } from 'node:fs/promises';
import { request } from 'node:http';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { KEYS } from '../../src/store/redis-store.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

const OLD = 'plaid_secret_OLD_1111';
const NEW = 'plaid_secret_NEW_2222';
let upstream: Upstream;
let accepted = new Set<string>();
/** While set, the upstream holds its answer to a request carrying this key until `release` is called. */
let held: { key: string; release: Promise<void> } | undefined;
let proxy: TestProxy | undefined;
let redis: TestRedis;

beforeAll(async () => {
  redis = await TestRedis.create();
  // A Plaid-like upstream: every call is a POST, a bad key is 400 INVALID_API_KEYS (it echoes the key).
  upstream = await startUpstream(async (req, res) => {
    const key = String(req.headers['plaid-secret']);
    if (held?.key === key) await held.release;
    if (req.url === '/broken-gzip') {
      // Labelled gzip, and not: the rejection text cannot be found without decoding it.
      res.writeHead(400, { 'content-type': 'application/json', 'content-encoding': 'gzip' });
      res.end(`{"error_code":"INVALID_API_KEYS","key":"${key}"}`);
      return;
    }
    if (accepted.has(key)) {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ok: true, key_tail: key.slice(-4) }));
    } else {
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error_code: 'INVALID_API_KEYS', error_message: `invalid key ${key}` }));
    }
  });
});
afterAll(async () => {
  await upstream?.close();
  await redis?.destroy();
});
afterEach(async () => {
  await proxy?.close();
  proxy = undefined;
});

const ROUTE = () => `name: plaid
prefix: /plaid
upstream: ${upstream.url}
allow_private_addresses: true
credential: plaid
inject:
  scheme: headers
  headers:
    PLAID-SECRET: "{secret}"
auth_failure: { status: [400], body_contains: INVALID_API_KEYS }
replay_safe: [POST /accounts/get]
allow:
  - caller: svc
    methods: [GET, POST]
    paths: [/accounts/get, /transfer/create, /status, /broken-gzip]
`;

async function start(store?: string): Promise<{ env: Record<string, string> }> {
  proxy = await startTestProxy({ routes: { plaid: ROUTE() }, credentials: { plaid: { secret: OLD } }, callers: ['svc'], ...(store ? { store } : {}) });
  return { env: envFor(proxy.dir, store ? { EGRESS_STORE: store } : {}) };
}

const call = (method: string, path: string) =>
  fetch(`${proxy!.url}/plaid${path}`, { method, headers: { 'x-egress-token': proxy!.tokens.svc!, 'content-type': 'application/json' }, ...(method === 'POST' ? { body: '{"count":1}' } : {}) });

describe('fallback to the previous version', () => {
  it('when the upstream rejects the new key: replay-safe requests succeed through the previous key, others get the rejection, an alert is raised', async () => {
    accepted = new Set([OLD]);
    const { env } = await start();
    const rotated = await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ secret: NEW }));
    expect(rotated.code).toBe(0);
    await eventually(async () => (await call('GET', '/status')).status === 200 && upstream.requests.at(-2)?.headers['plaid-secret'] === NEW, 2_000, 'the proxy to use the new key');

    for (let i = 0; i < 3; i++) {
      const before = upstream.requests.length;
      const res = await call('POST', '/accounts/get');
      expect(res.status).toBe(200);
      expect(((await res.json()) as { key_tail: string }).key_tail).toBe('1111');
      const sent = upstream.requests.slice(before);
      expect(sent.map((r) => r.headers['plaid-secret'])).toEqual([NEW, OLD]);
      expect(sent[1]!.body.toString()).toBe('{"count":1}');
    }
    const before = upstream.requests.length;
    const refused = await call('POST', '/transfer/create');
    expect(refused.status).toBe(400);
    const text = await refused.text();
    expect(text).toContain('INVALID_API_KEYS');
    expect(text).not.toContain(NEW);
    expect(upstream.requests.length - before).toBe(1);

    const metrics = await (await fetch(`${proxy!.admin}/metrics`)).text();
    expect(metrics).toMatch(/egress_rotation_fallbacks_total\{credential="plaid",version="1"\} [4-9]/);
    expect(proxy!.logs()).toContain('"alert":"current_key_rejected"');
    const audit = await proxy!.auditText();
    expect(audit).toContain('"reason":"fallback_previous_version"');
    expect(audit).toMatch(/"path":"\/plaid\/accounts\/get".*"credential_version":1/);
    // The CLI change itself is audited by the running proxy, with its actor.
    expect(audit).toMatch(/"kind":"admin","actor":"cli:[^"]+","action":"credential.rotate"/);
  });

  it('form bodies, read whole to be checked for a _method field, replay as before: a replay-safe one is sent again byte for byte with the previous key, another is sent once', async () => {
    accepted = new Set([OLD]);
    const { env } = await start();
    expect((await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ secret: NEW }))).code).toBe(0);
    await eventually(async () => (await call('GET', '/status')).status === 200 && upstream.requests.at(-2)?.headers['plaid-secret'] === NEW, 2_000, 'the proxy to use the new key');
    // Over SMALL_BODY and chunked, so that only the form check reads it whole on a route that is not replay-safe.
    const form = `amount=2000&metadata[order_id]=1&note=${'n'.repeat(80 * 1024)}`;
    const post = (path: string) => fetch(`${proxy!.url}/plaid${path}`, {
      method: 'POST',
      headers: { 'x-egress-token': proxy!.tokens.svc!, 'content-type': 'application/x-www-form-urlencoded' },
      body: new Blob([form]).stream(),
      duplex: 'half',
    } as RequestInit);
    let before = upstream.requests.length;
    const replayed = await post('/accounts/get');
    expect(replayed.status).toBe(200);
    expect(((await replayed.json()) as { key_tail: string }).key_tail).toBe('1111');
    let sent = upstream.requests.slice(before);
    expect(sent.map((r) => r.headers['plaid-secret'])).toEqual([NEW, OLD]);
    for (const r of sent) expect(r.body.toString()).toBe(form);
    before = upstream.requests.length;
    const once = await post('/transfer/create');
    expect(once.status).toBe(400);
    await once.text();
    sent = upstream.requests.slice(before);
    expect(sent.map((r) => r.headers['plaid-secret'])).toEqual([NEW]);
    expect(sent[0]!.body.toString()).toBe(form);
  });

  it('an auth_failure status whose body does not decode is not a rejection: no replay, no alert, 502 without the body', async () => {
    accepted = new Set([OLD]);
    const { env } = await start();
    expect((await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ secret: NEW }))).code).toBe(0);
    await eventually(async () => (await call('GET', '/status')).status === 200 && upstream.requests.at(-2)?.headers['plaid-secret'] === NEW, 2_000, 'the proxy to use the new key');
    const fallbacks = proxy!.logs().split('"alert":"current_key_rejected"').length;
    const before = upstream.requests.length;
    const res = await call('GET', '/broken-gzip');
    expect(res.status).toBe(502);
    const text = await res.text();
    expect(text).not.toContain(NEW);
    expect(text).not.toContain('INVALID_API_KEYS');
    expect(upstream.requests.slice(before).map((r) => r.headers['plaid-secret'])).toEqual([NEW]);
    expect(proxy!.logs().split('"alert":"current_key_rejected"').length).toBe(fallbacks);
  });

  it('no fallback without a previous version in grace (cutover): the rejection passes through', async () => {
    accepted = new Set([OLD]);
    const { env } = await start();
    expect((await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '0'], env, JSON.stringify({ secret: NEW }))).code).toBe(0);
    await eventually(async () => (await call('POST', '/accounts/get')).status === 400, 2_000, 'the cutover');
    const before = upstream.requests.length;
    expect((await call('POST', '/accounts/get')).status).toBe(400);
    expect(upstream.requests.length - before).toBe(1);
    const store = await readFile(proxy!.storePath, 'utf8');
    const versions = (JSON.parse(store) as { credentials: { plaid: { versions: { state: string; data?: unknown }[] } } }).credentials.plaid.versions;
    expect(versions.map((v) => v.state)).toEqual(['retired', 'current']);
    expect(versions[0]!.data).toBeUndefined();
  });
});

describe('a rejection that comes back after the previous version stopped being usable', () => {
  // The upstream may take the route's whole response timeout to reject the new key: a revoke (the
  // compromise path) or a grace end in the meantime must stop the fallback, not be overtaken by it.
  it.each([
    ['revoked', ['--grace', '1h'], (env: Record<string, string>) => runCli(['keys', 'revoke', 'plaid', '--version', '1'], env).then((r) => expect(r.code, r.stderr).toBe(0))],
    ['retired', ['--grace', '3s'], async () => {}],
  ] as const)('the previous version %s while the first attempt was out: no replay with it, the rejection is relayed', async (state, grace, change) => {
    accepted = new Set([OLD]);
    const { env } = await start();
    expect((await runCli(['keys', 'rotate', 'plaid', '--from-stdin', ...grace], env, JSON.stringify({ secret: NEW }))).code).toBe(0);
    await eventually(() => proxy!.services().store.credential('plaid')?.versions[1]?.state === 'current', 2_000, 'the proxy to see the rotation');
    let release!: () => void;
    held = { key: NEW, release: new Promise<void>((r) => (release = r)) };
    try {
      const before = upstream.requests.length;
      const answer = call('POST', '/accounts/get');
      await eventually(() => upstream.requests.length > before, 2_000, 'the first attempt to reach the upstream');
      await change(env);
      await eventually(() => proxy!.services().store.credential('plaid')?.versions[0]?.state === state, 6_000, `version 1 ${state} in the proxy's view`);
      release();
      const res = await answer;
      expect(res.status).toBe(400);
      expect(await res.text()).toContain('INVALID_API_KEYS');
      expect(upstream.requests.slice(before).map((r) => r.headers['plaid-secret'])).toEqual([NEW]);
      const audit = await proxy!.auditText();
      expect(audit).not.toContain('"reason":"fallback_previous_version"');
      expect(await (await fetch(`${proxy!.admin}/metrics`)).text()).not.toMatch(/egress_rotation_fallbacks_total\{credential="plaid"/);
    } finally {
      release();
      held = undefined;
    }
  });
});

describe('a version revoked or retired while the request was still arriving', () => {
  // The credential is resolved when the request's head arrives; a slow body (up to the listener's
  // request timeout) can keep it from going upstream for a long while after a revoke or a cutover.
  it.each([
    ['revoked, nothing current: 503, nothing sent', ['keys', 'revoke', 'plaid'], 503, []],
    ['retired by a cutover: sent with the new current version', ['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '0'], 200, [NEW]],
  ] as const)('the current version %s', async (_what, command, status, sent) => {
    accepted = new Set([OLD, NEW]);
    const { env } = await start();
    const before = upstream.requests.length;
    const body = '{"count":1}';
    const answer = new Promise<{ status: number; text: string }>((resolve, reject) => {
      const req = request(`${proxy!.url}/plaid/transfer/create`, { method: 'POST', headers: { 'x-egress-token': proxy!.tokens.svc!, 'content-type': 'application/json', 'content-length': String(body.length) } }, (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode!, text }));
      });
      req.on('error', reject);
      req.write(body.slice(0, 4));
      void (async () => {
        await new Promise((r) => setTimeout(r, 300));
        const changed = await runCli(command, env, JSON.stringify({ secret: NEW }));
        if (changed.code !== 0) return reject(new Error(changed.stderr));
        await eventually(() => proxy!.services().store.credential('plaid')?.versions[0]?.state !== 'current', 2_000, 'the proxy to see the change');
        req.end(body.slice(4));
      })().catch(reject);
    });
    const res = await answer;
    expect(res.status).toBe(status);
    if (status === 503) expect(res.text).toContain('credential_unavailable');
    expect(upstream.requests.slice(before).map((r) => r.headers['plaid-secret'])).toEqual(sent);
  });
});

describe('grace expiry, with no traffic at all', () => {
  it.each(['file', 'redis'])('retires the previous version on time and destroys its ciphertext (%s store)', async (kind) => {
    accepted = new Set([OLD, NEW]);
    const store = kind === 'redis' ? `${redis.url}/${Math.floor(Math.random() * 14) + 1}` : undefined;
    if (store) {
      const c = redis.client({ db: Number(store.split('/').at(-1)) });
      await c.flushdb();
      c.disconnect();
    }
    const { env } = await start(store);
    expect((await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '2s'], env, JSON.stringify({ secret: NEW }))).code).toBe(0);
    const readRecord = async () => {
      if (!store) return (JSON.parse(await readFile(proxy!.storePath, 'utf8')) as { credentials: { plaid: unknown } }).credentials.plaid as { versions: { state: string; dek?: unknown; data?: unknown }[] };
      const c = redis.client({ db: Number(store.split('/').at(-1)) });
      const raw = await c.get(KEYS.record('credential', 'plaid'));
      c.disconnect();
      return JSON.parse(raw!) as { versions: { state: string; dek?: unknown; data?: unknown }[] };
    };
    expect((await readRecord()).versions.map((v) => v.state)).toEqual(['previous', 'current']);
    const waited = await eventually(async () => (await readRecord()).versions[0]!.state === 'retired', 6_000, 'the grace sweep');
    expect(waited).toBeLessThan(4_000);
    const record = await readRecord();
    expect(record.versions[0]!.dek).toBeUndefined();
    expect(record.versions[0]!.data).toBeUndefined();
    expect(record.versions[1]!.state).toBe('current');
    const show = JSON.parse((await runCli(['keys', 'show', 'plaid', '--json'], env)).stdout) as { versions: { state: string; retired_at?: string; has_ciphertext: boolean }[]; history: { action: string; actor: string }[] };
    expect(show.versions[0]).toMatchObject({ state: 'retired', has_ciphertext: false });
    expect(show.history.filter((h) => h.action === 'retire')).toHaveLength(1);
    expect(show.history.at(-1)!.actor).toMatch(/^proxy:/);
  });
});

describe('caller token rotation', () => {
  it('the old token works until the grace ends, then stops; revoke is immediate', async () => {
    accepted = new Set([OLD]);
    const { env } = await start();
    const old = proxy!.tokens.svc!;
    const rotated = await runCli(['callers', 'rotate', 'svc', '--grace', '2s', '--json'], env);
    expect(rotated.code).toBe(0);
    const fresh = (JSON.parse(rotated.stdout) as { token: string }).token;
    const status = (token: string) => fetch(`${proxy!.url}/plaid/status`, { headers: { 'x-egress-token': token } }).then((r) => r.status);
    await eventually(async () => (await status(fresh)) === 200, 1_000, 'the new token');
    expect(await status(old)).toBe(200);
    await eventually(async () => (await status(old)) === 401, 4_000, 'the old token to expire');
    expect(await status(fresh)).toBe(200);
    expect((await runCli(['callers', 'revoke', 'svc'], env)).code).toBe(0);
    await eventually(async () => (await status(fresh)) === 401, 1_000, 'the revocation');
  });
});
