import { createServer } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { oauth2Route } from '../helpers/routes.ts';
import { makeTestPki } from '../helpers/tls.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * OAuth2 client credentials against a local authorization server that checks the client with its
 * own code and hands out tokens it then requires on the API.
 */
let upstream: Upstream;
let redis: TestRedis;
const issued = new Set<string>();
const mints: { path: string; client: string }[] = [];
let tokenLife = 3600;
let tokenServerDown = false;
/** The token endpoint answers 429 with this Retry-After (seconds) when set. */
let tokenRetryAfter: string | undefined;
/** Bytes of padding in the token endpoint's answer. */
let tokenPadding = 0;
let secretsAccepted = new Set(['cs_CANARY_good_1']);
let counter = 0;
const proxies: TestProxy[] = [];
/** A port nothing listens on: a token endpoint that refuses connections. */
let closedPort = 0;

beforeAll(async () => {
  redis = await TestRedis.create();
  const probe = createServer().listen(0, '127.0.0.1');
  await new Promise((r) => probe.once('listening', r));
  closedPort = (probe.address() as { port: number }).port;
  await new Promise((r) => probe.close(r));
  upstream = await startUpstream((req, res, body) => {
    const url = req.url ?? '';
    const json = (status: number, doc: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(doc));
    };
    if (url === '/connect/token') {
      // RFC 6749 §2.3.1 Basic client authentication, form-encoded grant.
      const [user, pass] = Buffer.from(String(req.headers.authorization ?? '').replace(/^Basic /, ''), 'base64').toString().split(':').map(decodeURIComponent);
      const form = new URLSearchParams(body.toString());
      if (tokenServerDown) return json(500, { error: 'temporarily_unavailable' });
      if (tokenRetryAfter !== undefined) {
        res.writeHead(429, { 'content-type': 'application/json', 'retry-after': tokenRetryAfter });
        return res.end(JSON.stringify({ error: 'rate_limited' }));
      }
      // RFC 6749 §5.2: a scope the server does not know is the request's fault, not the client's.
      if (form.get('scope') === 'no-such-scope') return json(400, { error: 'invalid_scope', error_description: 'unknown scope' });
      if (form.get('grant_type') !== 'client_credentials' || user !== 'client-1' || !secretsAccepted.has(pass ?? '')) return json(401, { error: 'invalid_client' });
      mints.push({ path: url, client: pass! });
      const token = `at_CANARY_${++counter}`;
      issued.add(token);
      return json(200, { access_token: token, token_type: 'Bearer', expires_in: tokenLife, scope: form.get('scope'), ...(tokenPadding ? { padding: 'x'.repeat(tokenPadding) } : {}) });
    }
    if (url === '/api/v2/token/new/') {
      const doc = JSON.parse(body.toString()) as { secret_id?: string; secret_key?: string };
      if (doc.secret_id !== 'gc-id' || doc.secret_key !== 'gc_CANARY_key') return json(401, { summary: 'Authentication failed' });
      mints.push({ path: url, client: 'gc' });
      const token = `gc_access_${++counter}`;
      issued.add(token);
      return json(200, { access: token, access_expires: 1, refresh: `gc_refresh_${counter}`, refresh_expires: 600 });
    }
    if (url === '/api/v2/token/refresh/') {
      const doc = JSON.parse(body.toString()) as { refresh?: string };
      if (!doc.refresh?.startsWith('gc_refresh_')) return json(401, { summary: 'bad refresh' });
      mints.push({ path: url, client: 'gc' });
      const token = `gc_access_${++counter}`;
      issued.add(token);
      return json(200, { access: token, access_expires: 1 });
    }
    const bearer = String(req.headers.authorization ?? '').replace(/^Bearer /, '');
    if (url === '/revoke-current') {
      issued.delete(bearer);
      return json(200, { revoked: true });
    }
    return json(issued.has(bearer) ? 200 : 401, { ok: issued.has(bearer) });
  });
});

afterAll(async () => {
  for (const p of proxies) await p.close();
  await upstream?.close();
  await redis?.destroy();
});

afterEach(() => {
  tokenLife = 3600;
  tokenServerDown = false;
  tokenRetryAfter = undefined;
  tokenPadding = 0;
  secretsAccepted = new Set(['cs_CANARY_good_1']);
});

const ROUTES = () => ({
  bank: oauth2Route(upstream.url, '  scope: payments\n'),
  scoped: oauth2Route(upstream.url, '  scope: no-such-scope\n').replace('name: bank\nprefix: /bank', 'name: scoped\nprefix: /scoped'),
  dead: oauth2Route(upstream.url).replace('name: bank\nprefix: /bank', 'name: dead\nprefix: /dead').replace(`token_url: ${upstream.url}/connect/token`, `token_url: http://127.0.0.1:${closedPort}/connect/token`),
  gc: `name: gc
preset: gocardless
upstream: ${upstream.url}
allow_private_addresses: true
credential: gc
inject:
  scheme: oauth2_client_credentials
  token_url: ${upstream.url}/api/v2/token/new/
  refresh_url: ${upstream.url}/api/v2/token/refresh/
  client_auth: json
  client_id: "{secret_id}"
  client_secret: "{secret_key}"
  id_field: secret_id
  secret_field: secret_key
  token_field: access
  expires_field: access_expires
  refresh_field: refresh
  refresh_expires_field: refresh_expires
allow:
  - caller: svc
    methods: [GET]
    paths: [/accounts]
`,
});

async function start(store?: string, dir?: string): Promise<TestProxy> {
  const proxy = await startTestProxy(dir
    ? { routes: {}, dir, ...(store ? { store } : {}) }
    : { routes: ROUTES(), credentials: { bank: { client_id: 'client-1', client_secret: 'cs_CANARY_good_1' }, gc: { secret_id: 'gc-id', secret_key: 'gc_CANARY_key' } }, callers: ['svc'], ...(store ? { store } : {}) });
  proxies.push(proxy);
  return proxy;
}

const get = (proxy: TestProxy, path: string, token?: string) => fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': token ?? proxy.tokens.svc! } });

describe('oauth2_client_credentials', () => {
  it('mints a token with Basic client auth and a scope, caches it, and attaches it as a Bearer', async () => {
    const proxy = await start();
    const before = mints.length;
    for (let i = 0; i < 5; i++) expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    expect(mints.length - before).toBe(1);
    expect(upstream.requests.filter((r) => r.url === '/accounts').every((r) => String(r.headers.authorization).startsWith('Bearer at_CANARY_'))).toBe(true);
    const logs = proxy.logs();
    for (const t of issued) expect(logs).not.toContain(t);
    expect(logs).not.toContain('cs_CANARY_good_1');
  });

  it('a token the upstream refuses before its expiry is dropped: the next request mints a new one', async () => {
    const proxy = await start();
    expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    // The provider revokes the token early (the route's auth_failure is the default 401).
    await fetch(`${upstream.url}/revoke-current`, { headers: { authorization: String(upstream.requests.at(-1)!.headers.authorization) } });
    const before = mints.length;
    expect((await get(proxy, '/bank/accounts')).status).toBe(401);
    expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    expect(mints.length - before).toBe(1);
  });

  it('100 concurrent requests at token expiry cause exactly one token request', async () => {
    tokenLife = 2;
    const proxy = await start();
    expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    await new Promise((r) => setTimeout(r, 2_200));
    const before = mints.length;
    const statuses = await Promise.all(Array.from({ length: 100 }, () => get(proxy, '/bank/accounts').then((r) => r.status)));
    expect(statuses.every((s) => s === 200)).toBe(true);
    expect(mints.length - before).toBe(1);
  });

  it('a failed refresh does not drop a token that is still valid', async () => {
    tokenLife = 6;
    const proxy = await start();
    expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    tokenServerDown = true;
    // Refresh falls due at 70-80% of the 6 s life; the token expires at 6 s.
    await new Promise((r) => setTimeout(r, 5_000));
    // Past the refresh point, before expiry: refreshes fail in the background, requests still work.
    for (let i = 0; i < 5; i++) expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    await eventually(() => proxy.logs().includes('token refresh failed'), 2_000, 'the failed refresh to be logged');
  });

  it('mints with the previous version when the token endpoint rejects the current one', async () => {
    const proxy = await start();
    const env = envFor(proxy.dir);
    expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'client-1', client_secret: 'cs_CANARY_not_yet_active' }))).code).toBe(0);
    const before = mints.length;
    await eventually(async () => {
      const res = await get(proxy, '/bank/accounts');
      return res.status === 200 && mints.length > before;
    }, 2_000, 'a token minted for version 2');
    expect(mints.at(-1)!.client).toBe('cs_CANARY_good_1');
  });

  it('CRED-15 a token minted with the previous version is dropped once that version is revoked: the next request mints afresh, and the old token never reaches the API again', async () => {
    const proxy = await start();
    const env = envFor(proxy.dir);
    expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'client-1', client_secret: 'cs_CANARY_new_2' }))).code).toBe(0);
    const before = mints.length;
    await eventually(async () => {
      const res = await get(proxy, '/bank/accounts');
      return res.status === 200 && mints.length > before;
    }, 2_000, 'a token minted with version 1 for version 2');
    expect(mints.at(-1)!.client).toBe('cs_CANARY_good_1');
    const fromV1 = String(upstream.requests.at(-1)!.headers.authorization);
    // Version 1 is compromised: revoked at once. The provider has meanwhile activated version 2.
    secretsAccepted = new Set(['cs_CANARY_good_1', 'cs_CANARY_new_2']);
    expect((await runCli(['keys', 'revoke', 'bank', '--version', '1'], env)).code).toBe(0);
    await new Promise((r) => setTimeout(r, 1_200));
    const mark = upstream.requests.length;
    expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    expect(mints.at(-1)!.client).toBe('cs_CANARY_new_2');
    const after = upstream.requests.slice(mark).filter((r) => r.url === '/accounts');
    expect(after.length).toBeGreaterThan(0);
    for (const r of after) expect(String(r.headers.authorization)).not.toBe(fromV1);
  });

  it('a token answer over 256 KiB is refused (503 credential_unavailable), not held; a normal answer then works, once the hold-off after the failure is over', async () => {
    const proxy = await start();
    tokenPadding = 300 * 1024;
    const before = mints.length;
    const forwarded = upstream.requests.filter((r) => r.url === '/accounts').length;
    const refused = await get(proxy, '/bank/accounts');
    expect(refused.status).toBe(503);
    expect(((await refused.json()) as { error: { code: string; message: string } }).error).toMatchObject({ code: 'credential_unavailable', message: expect.stringContaining('over 256 KiB') });
    expect(mints.length - before).toBe(1);
    expect(upstream.requests.filter((r) => r.url === '/accounts').length).toBe(forwarded);
    tokenPadding = 200 * 1024;
    const held = await get(proxy, '/bank/accounts');
    expect([held.status, held.headers.get('retry-after')]).toEqual([503, '1']);
    expect(mints.length - before).toBe(1);
    await new Promise((r) => setTimeout(r, 1_100));
    expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    for (const t of issued) expect(proxy.logs()).not.toContain(t);
  });

  it('a 400 invalid_scope from the token endpoint is the route\'s request at fault: 503 naming it, no mint with the previous version, no rejected-credential alert', async () => {
    const proxy = await start();
    const env = envFor(proxy.dir);
    expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'client-1', client_secret: 'cs_CANARY_good_2' }))).code).toBe(0);
    await eventually(async () => (await get(proxy, '/bank/accounts')).status === 200 && mints.at(-1)!.client === 'cs_CANARY_good_1', 2_000, 'version 2 in use');
    const tokenCalls = () => upstream.requests.filter((r) => r.url === '/connect/token').length;
    const before = tokenCalls();
    const res = await get(proxy, '/scoped/accounts');
    expect(res.status).toBe(503);
    const { error } = (await res.json()) as { error: { code: string; message: string } };
    expect(error.code).toBe('credential_unavailable');
    expect(error.message).toContain('invalid_scope');
    expect(error.message).not.toContain('rejected the client credentials');
    expect(tokenCalls() - before).toBe(1);
    expect(proxy.logs()).not.toContain('upstream_rejected_credential');
  });

  it('GoCardless style: JSON token request, then the refresh token when the access token expires', async () => {
    const proxy = await start();
    const before = mints.length;
    expect((await get(proxy, '/gc/accounts')).status).toBe(200);
    await new Promise((r) => setTimeout(r, 1_200));
    expect((await get(proxy, '/gc/accounts')).status).toBe(200);
    expect(mints.slice(before).map((m) => m.path)).toEqual(['/api/v2/token/new/', '/api/v2/token/refresh/']);
  });

  it('GoCardless style: a refresh answer without a refresh token keeps the one in hand (RFC 6749 §6): each later expiry refreshes again, the secret is not sent again', async () => {
    const proxy = await start();
    const before = mints.length;
    expect((await get(proxy, '/gc/accounts')).status).toBe(200);
    for (let i = 0; i < 2; i++) {
      await new Promise((r) => setTimeout(r, 1_200));
      expect((await get(proxy, '/gc/accounts')).status).toBe(200);
    }
    expect(mints.slice(before).map((m) => m.path)).toEqual(['/api/v2/token/new/', '/api/v2/token/refresh/', '/api/v2/token/refresh/']);
  });

  it('MITM a token endpoint whose certificate is not trusted gets no client secret; the 503 says why (the TLS error code), as an upstream\'s 502 does', async () => {
    const foreign = makeTestPki({ commonName: 'untrusted token CA' });
    const tokenServer = await startUpstream(undefined, { key: foreign.serverKey, cert: foreign.serverCert });
    const proxy = await startTestProxy({
      routes: { bank: oauth2Route(upstream.url).replace(`token_url: ${upstream.url}/connect/token`, `token_url: ${tokenServer.url}/connect/token`) },
      credentials: { bank: { client_id: 'client-1', client_secret: 'cs_CANARY_good_1' } },
      callers: ['svc'],
    });
    proxies.push(proxy);
    try {
      const res = await get(proxy, '/bank/accounts');
      expect(res.status).toBe(503);
      const { error } = (await res.json()) as { error: { code: string; message: string } };
      expect(error.code).toBe('credential_unavailable');
      expect(error.message).toMatch(/could not be reached \((SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\)/);
      expect(tokenServer.requests.length).toBe(0);
      expect(proxy.logs()).not.toContain('cs_CANARY_good_1');
    } finally {
      await tokenServer.close();
    }
  });

  it('DOS a token endpoint\'s 429 with Retry-After is honoured: no token request until then (503 with the Retry-After left), not one per request', async () => {
    const proxy = await start();
    tokenRetryAfter = '30';
    const tokenCalls = () => upstream.requests.filter((r) => r.url === '/connect/token').length;
    const before = tokenCalls();
    for (let i = 0; i < 10; i++) {
      const res = await get(proxy, '/bank/accounts');
      expect(res.status).toBe(503);
      expect(((await res.json()) as { error: { message: string } }).error.message).toContain('429');
      const wait = Number(res.headers.get('retry-after'));
      expect(wait).toBeGreaterThan(25);
      expect(wait).toBeLessThanOrEqual(30);
    }
    expect(tokenCalls() - before).toBe(1);
  });

  it('two instances share one token through Redis', async () => {
    const dir = await makeTempDir('egress-oauth-two-');
    const store = `${redis.url}/5`;
    const { tokens } = await seedDataDir(dir, { routes: ROUTES(), credentials: { bank: { client_id: 'client-1', client_secret: 'cs_CANARY_good_1' }, gc: { secret_id: 'gc-id', secret_key: 'gc_CANARY_key' } }, callers: ['svc'], store });
    const a = await start(store, dir);
    const b = await start(store, dir);
    const before = mints.length;
    expect((await get(a, '/bank/accounts', tokens.svc)).status).toBe(200);
    expect((await get(b, '/bank/accounts', tokens.svc)).status).toBe(200);
    const both = await Promise.all(Array.from({ length: 20 }, (_, i) => get(i % 2 ? a : b, '/bank/accounts', tokens.svc).then((r) => r.status)));
    expect(both.every((s) => s === 200)).toBe(true);
    expect(mints.length - before).toBe(1);
    // In Redis the token is sealed, never in plaintext.
    const c = redis.client({ db: 5 });
    const keys = await c.keys('egress:oauth:*');
    const values = await Promise.all(keys.filter((k) => !k.endsWith(':lock')).map((k) => c.get(k)));
    c.disconnect();
    expect(values.length).toBe(1);
    for (const t of issued) expect(values[0]).not.toContain(t);
  });
});

describe('oauth2_client_credentials: a failing token endpoint is held off', () => {
  const tokenCalls = () => upstream.requests.filter((r) => r.url === '/connect/token').length;
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  const refusal = async (res: Response) => ({ status: res.status, retryAfter: res.headers.get('retry-after'), ...((await res.json()) as { error: { code: string; message: string } }).error });

  it('DOS a token endpoint answering 500 is asked once, not once per request: 20 concurrent and then 10 back-to-back requests make one token request, the later ones 503 at once with the Retry-After left', async () => {
    const proxy = await start();
    tokenServerDown = true;
    const before = tokenCalls();
    const concurrent = await Promise.all(Array.from({ length: 20 }, () => get(proxy, '/bank/accounts').then(refusal)));
    for (const r of concurrent) expect(r).toMatchObject({ status: 503, code: 'credential_unavailable', message: expect.stringContaining('answered 500') });
    for (let i = 0; i < 10; i++) {
      const started = performance.now();
      const r = await refusal(await get(proxy, '/bank/accounts'));
      expect(r).toMatchObject({ status: 503, code: 'credential_unavailable', message: expect.stringContaining('answered 500'), retryAfter: '1' });
      expect(performance.now() - started).toBeLessThan(500);
    }
    expect(tokenCalls() - before).toBe(1);
  });

  it('DOS a token endpoint that refuses connections (ECONNREFUSED) is held off: the next request gets the same 503 at once, with Retry-After', async () => {
    const proxy = await start();
    const first = await refusal(await get(proxy, '/dead/accounts'));
    expect(first).toMatchObject({ status: 503, code: 'credential_unavailable', message: expect.stringContaining('ECONNREFUSED') });
    for (let i = 0; i < 5; i++) {
      const r = await refusal(await get(proxy, '/dead/accounts'));
      expect(r).toMatchObject({ status: 503, code: 'credential_unavailable', message: expect.stringContaining('ECONNREFUSED'), retryAfter: '1' });
    }
  });

  it('a rejection of the route\'s options (invalid_scope) and an invalid_client with no previous version to fall back to are held off too', async () => {
    const proxy = await start();
    const before = tokenCalls();
    expect((await refusal(await get(proxy, '/scoped/accounts'))).message).toContain('invalid_scope');
    const scoped = await refusal(await get(proxy, '/scoped/accounts'));
    expect(scoped).toMatchObject({ status: 503, message: expect.stringContaining('invalid_scope'), retryAfter: '1' });
    secretsAccepted = new Set();
    expect((await refusal(await get(proxy, '/bank/accounts'))).message).toContain('rejected the client credentials');
    const rejected = await refusal(await get(proxy, '/bank/accounts'));
    expect(rejected).toMatchObject({ status: 503, message: expect.stringContaining('rejected the client credentials'), retryAfter: '1' });
    expect(tokenCalls() - before).toBe(2);
  });

  it('the hold-off doubles with each failure in a row (1 s, 2 s, 4 s), ends, and a successful mint resets it to 1 s', async () => {
    tokenLife = 1;
    const proxy = await start();
    tokenServerDown = true;
    const before = tokenCalls();
    expect((await get(proxy, '/bank/accounts')).status).toBe(503);
    for (const seconds of [1, 2, 4]) {
      const held = await refusal(await get(proxy, '/bank/accounts'));
      expect(held).toMatchObject({ status: 503, retryAfter: String(seconds) });
      await sleep(seconds * 1000 + 100);
      // The hold-off has run out: this request asks the token endpoint again, which fails again.
      if (seconds < 4) expect((await get(proxy, '/bank/accounts')).status).toBe(503);
    }
    expect(tokenCalls() - before).toBe(3);
    // Recovered: the request after the 4 s hold-off mints.
    tokenServerDown = false;
    expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    expect(tokenCalls() - before).toBe(4);
    // The token expires after 1 s; the endpoint fails again: a fresh run of failures starts at 1 s, not 8.
    tokenServerDown = true;
    await sleep(1_100);
    expect((await get(proxy, '/bank/accounts')).status).toBe(503);
    expect(await refusal(await get(proxy, '/bank/accounts'))).toMatchObject({ status: 503, retryAfter: '1' });
    expect(tokenCalls() - before).toBe(5);
  });

  it('a token endpoint\'s 429 Retry-After shorter than the hold-off does not shorten it: the larger wins', async () => {
    const proxy = await start();
    tokenServerDown = true;
    expect((await get(proxy, '/bank/accounts')).status).toBe(503);
    await sleep(1_100);
    tokenServerDown = false;
    tokenRetryAfter = '1';
    expect((await refusal(await get(proxy, '/bank/accounts'))).message).toContain('429');
    expect(await refusal(await get(proxy, '/bank/accounts'))).toMatchObject({ status: 503, message: expect.stringContaining('429'), retryAfter: '2' });
  });

  it('DOS a still-valid token keeps serving while its refresh fails, and the refresh is tried once per hold-off, not once per request', async () => {
    tokenLife = 6;
    const proxy = await start();
    expect((await get(proxy, '/bank/accounts')).status).toBe(200);
    tokenServerDown = true;
    // Past the refresh point (70-80% of 6 s), before expiry.
    await sleep(4_900);
    const before = tokenCalls();
    for (let i = 0; i < 10; i++) {
      expect((await get(proxy, '/bank/accounts')).status).toBe(200);
      await sleep(50);
    }
    expect(tokenCalls() - before).toBe(1);
  });
});
