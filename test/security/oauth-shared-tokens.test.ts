import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { aad, seal } from '../../src/store/crypto.ts';
import { readKeyring } from '../../src/store/keyring.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * OAuth2 tokens shared through Redis: what a caller who can provoke 401s, or whoever can write
 * Redis, can make of them. A token endpoint that counts its mints; an API that knows which scope
 * each token was minted for; two routes on one credential that differ only in scope.
 */
let upstream: Upstream;
let redis: TestRedis;
/** Scope of every token minted, by token. */
const scopeOf = new Map<string, string>();
const mints: string[] = [];
/** The client secret of the last mint. */
let lastSecret = '';
const revoked = new Set<string>();
let counter = 0;
let flakyCalls = 0;
/** While set, /connect/token-short answers 500; otherwise it mints tokens that live 2 s. */
let shortFailing = false;
const proxies: TestProxy[] = [];

beforeAll(async () => {
  redis = await TestRedis.create();
  upstream = await startUpstream((req, res, body) => {
    const json = (status: number, doc: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(doc));
    };
    const url = req.url ?? '';
    // The first mint here fails slowly, as a token endpoint in trouble does; the next ones succeed.
    if (url === '/connect/token-flaky' && ++flakyCalls === 1) {
      setTimeout(() => json(503, { error: 'temporarily_unavailable' }), 400);
      return;
    }
    if (url === '/connect/token-short' && shortFailing) return json(500, { error: 'server_error' });
    if (url === '/connect/token' || url === '/connect/token-flaky' || url === '/connect/token-short') {
      const form = new URLSearchParams(body.toString());
      const secret = form.get('client_secret') ?? '';
      if (secret !== 'cs_CANARY_oauth' && secret !== 'cs_CANARY_oauth_2') return json(401, { error: 'invalid_client' });
      const scope = form.get('scope') ?? '';
      mints.push(scope);
      lastSecret = secret;
      const token = `at_CANARY_${scope}_${++counter}`;
      scopeOf.set(token, scope);
      return json(200, { access_token: token, expires_in: url === '/connect/token-short' ? 2 : 3600 });
    }
    const bearer = String(req.headers.authorization ?? '').replace(/^Bearer /, '');
    // A path this API answers 401 whatever token comes with it.
    if (url.endsWith('/locked')) return json(401, { error: 'invalid_token' });
    // /<scope>/accounts takes only a live token of that scope.
    const scope = url.split('/')[1];
    return json(scopeOf.get(bearer) === scope && !revoked.has(bearer) ? 200 : 401, { scope: scopeOf.get(bearer) ?? null });
  });
});

afterAll(async () => {
  for (const p of proxies) await p.close();
  await upstream?.close();
  await redis?.destroy();
});

/** Route `name` on /name, to the API's /<scope>, with a token of that scope from credential bank. */
const route = (name: string, scope: string, tokenPath = '/connect/token') => `name: ${name}
prefix: /${name}
upstream: ${upstream.url}/${scope}
allow_private_addresses: true
credential: bank
inject:
  scheme: oauth2_client_credentials
  token_url: ${upstream.url}${tokenPath}
  client_auth: body
  scope: ${scope}
allow:
  - caller: svc
    methods: [GET]
    paths: [/accounts, /locked]
`;

/** A data folder on Redis database `db` (each test its own: no token, lock or window of another test). */
async function seed(db: number): Promise<{ dir: string; store: string; token: string }> {
  const dir = await makeTempDir('egress-oauth-shared-');
  const store = `${redis.url}/${db}`;
  const { tokens } = await seedDataDir(dir, {
    routes: { reader: route('reader', 'read'), writer: route('writer', 'write'), flaky: route('flaky', 'read', '/connect/token-flaky'), short: route('short', 'read', '/connect/token-short') },
    credentials: { bank: { client_id: 'c', client_secret: 'cs_CANARY_oauth' } },
    callers: ['svc'],
    store,
  });
  return { dir, store, token: tokens.svc! };
}

async function instance(dir: string, store: string): Promise<TestProxy> {
  const proxy = await startTestProxy({ routes: {}, dir, store });
  proxies.push(proxy);
  return proxy;
}

const get = (proxy: TestProxy, path: string, token: string) => fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': token } });

/** The bearer tokens that reached the API on its path `path` since request `mark`. */
const sentTo = (path: string, mark: number) => upstream.requests.slice(mark).filter((r) => r.url === path).map((r) => String(r.headers.authorization).replace(/^Bearer /, ''));

function expectNoTokenIn(text: string): void {
  for (const t of scopeOf.keys()) expect(text).not.toContain(t);
  expect(text).not.toContain('cs_CANARY_oauth');
}

describe('DOS: upstream 401s and the token endpoint', () => {
  it('DOS-16 50 requests to a path the API always answers 401, across two instances sharing Redis, cause one mint, not one per request', async () => {
    const { dir, store, token } = await seed(3);
    const a = await instance(dir, store);
    const b = await instance(dir, store);
    expect((await get(a, '/reader/accounts', token)).status).toBe(200);
    expect((await get(b, '/reader/accounts', token)).status).toBe(200);
    expect(mints).toContain('read');
    const before = mints.length;
    for (let i = 0; i < 50; i++) expect((await get(i % 2 ? b : a, '/reader/locked', token)).status).toBe(401);
    // The first 401 drops the token (it may be revoked) and one new one is minted; the other 49
    // within the minute keep the new one.
    expect(mints.length - before).toBe(1);
    // The token kept is good: the rest of the API works, with no further mint.
    expect((await get(a, '/reader/accounts', token)).status).toBe(200);
    expect((await get(b, '/reader/accounts', token)).status).toBe(200);
    expect(mints.length - before).toBe(1);
    expectNoTokenIn(a.logs() + b.logs());
  });

  it('DOS-16b an instance still holding a token another instance has replaced takes the replacement on its 401: the replacement is not dropped, nothing more is minted', async () => {
    const { dir, store, token } = await seed(4);
    const a = await instance(dir, store);
    const b = await instance(dir, store);
    const mark = upstream.requests.length;
    expect((await get(a, '/reader/accounts', token)).status).toBe(200);
    expect((await get(b, '/reader/accounts', token)).status).toBe(200);
    const [first] = sentTo('/read/accounts', mark);
    // The provider revokes the token early: a drops it on the first 401 and mints a replacement.
    revoked.add(first!);
    const before = mints.length;
    expect((await get(a, '/reader/accounts', token)).status).toBe(401);
    expect((await get(a, '/reader/accounts', token)).status).toBe(200);
    expect(mints.length - before).toBe(1);
    // b still holds the revoked token: one 401, then the replacement from Redis.
    expect((await get(b, '/reader/accounts', token)).status).toBe(401);
    expect((await get(b, '/reader/accounts', token)).status).toBe(200);
    expect((await get(a, '/reader/accounts', token)).status).toBe(200);
    expect(mints.length - before).toBe(1);
    expect(new Set(sentTo('/read/accounts', mark)).size).toBe(2);
  });

  it('DOS-16c one instance on the file store, in a rotation grace: the first 401 drops the token and replays once with a new one; the next 49 are relayed as they are, no replay, no mint', async () => {
    const proxy = await startTestProxy({ routes: { reader: route('reader', 'read') }, credentials: { bank: { client_id: 'c', client_secret: 'cs_CANARY_oauth' } }, callers: ['svc'] });
    proxies.push(proxy);
    const token = proxy.tokens.svc!;
    const rotate = await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], envFor(proxy.dir), JSON.stringify({ client_id: 'c', client_secret: 'cs_CANARY_oauth_2' }));
    expect(rotate.code, rotate.stderr).toBe(0);
    await eventually(async () => (await get(proxy, '/reader/accounts', token)).status === 200 && lastSecret === 'cs_CANARY_oauth_2', 3_000, 'a token from version 2');
    const before = mints.length;
    const mark = upstream.requests.length;
    for (let i = 0; i < 50; i++) expect((await get(proxy, '/reader/locked', token)).status).toBe(401);
    expect(mints.length - before).toBe(1);
    expect(sentTo('/read/locked', mark)).toHaveLength(51);
    expect((await get(proxy, '/reader/accounts', token)).status).toBe(200);
    expect(mints.length - before).toBe(1);
    expectNoTokenIn(proxy.logs());
  });
});

describe('FLT: one mint at a time across instances', () => {
  it('FLT-20 an instance waiting for another instance\'s mint mints itself as soon as that mint fails, instead of waiting out the lock', async () => {
    const { dir, store, token } = await seed(5);
    const a = await instance(dir, store);
    const b = await instance(dir, store);
    // a takes the lock and its mint fails after 400 ms; b asks while a's mint is out.
    const first = get(a, '/flaky/accounts', token);
    await new Promise((r) => setTimeout(r, 100));
    const started = performance.now();
    const second = await get(b, '/flaky/accounts', token);
    const ms = performance.now() - started;
    const failed = await first;
    expect(failed.status).toBe(503);
    expect(failed.headers.get('x-egress-error')).toBe('credential_unavailable');
    expect(second.status).toBe(200);
    expect(flakyCalls).toBe(2);
    // Bounded by a's mint and its own, not by the 10 s the lock may be held.
    expect(ms).toBeLessThan(3_000);
    expectNoTokenIn(a.logs() + b.logs() + (await second.text()));
  }, 20_000);
});

describe('FLT: a token endpoint failing for one instance', () => {
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

  it('FLT-20b an instance holding off its token requests after failed mints takes the token another instance minted meanwhile from Redis, instead of answering 503 until its hold-off ends', async () => {
    const { dir, store, token } = await seed(9);
    const a = await instance(dir, store);
    const b = await instance(dir, store);
    expect((await get(a, '/short/accounts', token)).status).toBe(200);
    // a's token (2 s) has expired; its next two mints fail: a holds off for 1 s, then 2 s.
    await sleep(2_200);
    shortFailing = true;
    expect((await get(a, '/short/accounts', token)).status).toBe(503);
    await sleep(1_100);
    const held = await get(a, '/short/accounts', token);
    expect(held.status).toBe(503);
    // The endpoint is back; b mints, and the token is in Redis for every instance.
    shortFailing = false;
    expect((await get(b, '/short/accounts', token)).status).toBe(200);
    const [fromB] = sentTo('/read/accounts', upstream.requests.length - 1);
    const mark = upstream.requests.length;
    const res = await get(a, '/short/accounts', token);
    expect(res.status).toBe(200);
    expect(sentTo('/read/accounts', mark)).toEqual([fromB]);
    expectNoTokenIn(a.logs() + b.logs());
  }, 20_000);
});

describe('FLT: OAuth2 tokens while Redis is frozen', () => {
  it('FLT-21 with Redis frozen (SIGSTOP), a token is minted here after one Redis timeout, not after one per step of the shared mint', async () => {
    const { dir, store, token } = await seed(6);
    const a = await instance(dir, store);
    redis.freeze();
    try {
      const started = performance.now();
      const res = await get(a, '/reader/accounts', token);
      const ms = performance.now() - started;
      expect(res.status).toBe(200);
      // One command timeout (500 ms) for the shared read, then the mint: not five of them (2.5 s).
      expect(ms).toBeLessThan(1_300);
    } finally {
      redis.thaw();
    }
    expectNoTokenIn(a.logs());
  }, 20_000);
});

describe('FLT-05: garbage in the mint lock', () => {
  it('FLT-22 a mint lock no instance made (no expiry, or one past any lock\'s life, another type) does not make every mint wait out the lock: it is cleared and the mint goes on', async () => {
    const { dir, store, token } = await seed(7);
    const a = await instance(dir, store);
    const c = redis.client({ db: 7 });
    try {
      expect((await get(a, '/reader/accounts', token)).status).toBe(200);
      const [docKey] = (await c.keys('egress:oauth:*')).filter((k) => !k.endsWith(':lock'));
      const lock = `${docKey!}:lock`;
      for (const plant of [() => c.set(lock, 'garbage'), () => c.set(lock, 'garbage', 'PX', 86_400_000), () => c.del(lock).then(() => c.hset(lock, 'x', '1'))]) {
        await c.del(docKey!);
        await plant();
        // An instance with nothing cached of its own: it must mint, and goes through the lock.
        const b = await instance(dir, store);
        const started = performance.now();
        const res = await get(b, '/reader/accounts', token);
        expect(res.status).toBe(200);
        expect(performance.now() - started).toBeLessThan(3_000);
      }
    } finally {
      c.disconnect();
    }
  }, 60_000);
});

describe('FLT-05: garbage in the refusal window', () => {
  it('FLT-23 a refusal-window key no refusal made (no expiry, or one past the minute) does not keep a revoked token in use: it is cleared, the token dropped, the next request gets a new one', async () => {
    const { dir, store, token } = await seed(8);
    const a = await instance(dir, store);
    const c = redis.client({ db: 8 });
    try {
      for (const plant of [(k: string) => c.set(k, 'garbage'), (k: string) => c.set(k, '1', 'PX', 86_400_000)]) {
        const mark = upstream.requests.length;
        expect((await get(a, '/reader/accounts', token)).status).toBe(200);
        const [docKey] = (await c.keys('egress:oauth:*')).filter((k) => !k.endsWith(':lock') && !k.endsWith(':refused'));
        await plant(`${docKey!}:refused`);
        // The provider revokes the token early.
        revoked.add(sentTo('/read/accounts', mark).at(-1)!);
        expect((await get(a, '/reader/accounts', token)).status).toBe(401);
        expect((await get(a, '/reader/accounts', token)).status).toBe(200);
        await c.del(`${docKey!}:refused`);
      }
    } finally {
      c.disconnect();
    }
  }, 30_000);
});

describe('CRED: OAuth2 tokens sealed in Redis', () => {
  it('CRED-16 two cache keys of one credential version with their Redis values swapped: neither token is used for the other scope; each is a cache miss and minted afresh', async () => {
    const { dir, store, token } = await seed(1);
    const a = await instance(dir, store);
    const c = redis.client({ db: 1 });
    try {
      expect((await get(a, '/reader/accounts', token)).status).toBe(200);
      const readKey = (await c.keys('egress:oauth:*')).filter((k) => !/:lock$/.test(k));
      expect(readKey).toHaveLength(1);
      expect((await get(a, '/writer/accounts', token)).status).toBe(200);
      const writeKey = (await c.keys('egress:oauth:*')).filter((k) => !/:lock$/.test(k) && k !== readKey[0]);
      expect(writeKey).toHaveLength(1);
      const [readDoc, writeDoc] = [await c.get(readKey[0]!), await c.get(writeKey[0]!)];
      await c.set(readKey[0]!, writeDoc!, 'KEEPTTL');
      await c.set(writeKey[0]!, readDoc!, 'KEEPTTL');
      // A second instance has nothing cached of its own: what it sends comes from Redis or a mint.
      const b = await instance(dir, store);
      const mark = upstream.requests.length;
      const before = mints.length;
      const reader = await get(b, '/reader/accounts', token);
      const writer = await get(b, '/writer/accounts', token);
      expect(sentTo('/read/accounts', mark).map((t) => scopeOf.get(t))).toEqual(['read']);
      expect(sentTo('/write/accounts', mark).map((t) => scopeOf.get(t))).toEqual(['write']);
      expect([reader.status, writer.status]).toEqual([200, 200]);
      expect(mints.slice(before).sort()).toEqual(['read', 'write']);
      // Logged as a miss, naming the credential and no value.
      expect(b.logs()).toContain('does not open');
      expectNoTokenIn(b.logs() + (await reader.text()) + (await writer.text()));
    } finally {
      c.disconnect();
    }
  });

  it('CRED-16b a token sealed in the earlier format (no cache id in its associated data) is a cache miss: minted afresh, never sent, no error', async () => {
    const { dir, store, token } = await seed(2);
    const a = await instance(dir, store);
    const c = redis.client({ db: 2 });
    try {
      expect((await get(a, '/reader/accounts', token)).status).toBe(200);
      const [key] = (await c.keys('egress:oauth:*')).filter((k) => !/:lock$/.test(k));
      const doc = JSON.parse((await c.get(key!))!) as { kek: number; sealed: unknown };
      // What the earlier release wrote: bound to credential and version only.
      const keyring = await readKeyring(join(dir, 'master.key'));
      const old = 'at_CANARY_read_old_format';
      scopeOf.set(old, 'read');
      doc.sealed = seal(keyring.get(doc.kek)!, Buffer.from(old), aad('fields', 'oauth:bank', 1, doc.kek));
      await c.set(key!, JSON.stringify(doc), 'KEEPTTL');
      const b = await instance(dir, store);
      const mark = upstream.requests.length;
      const before = mints.length;
      const res = await get(b, '/reader/accounts', token);
      expect(res.status).toBe(200);
      expect(sentTo('/read/accounts', mark)).not.toContain(old);
      expect(mints.length - before).toBe(1);
      expectNoTokenIn(b.logs() + (await res.text()));
    } finally {
      c.disconnect();
    }
  });
});
