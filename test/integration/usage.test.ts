import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe } from '../helpers/cli.ts';
import { envFor, makeTempDir, seedDataDir, startTestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { bearerRoute, oauth2Route } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** `keys show` tells when each version was last used, and by whom. */
let upstream: Upstream;
let redis: TestRedis;

beforeAll(async () => {
  upstream = await startUpstream();
  redis = await TestRedis.create();
});
afterAll(async () => {
  await upstream?.close();
  await redis?.destroy();
});

describe('last use of each version', () => {
  it.each(['file', 'redis'])('is recorded per version and caller (%s store)', async (kind) => {
    const store = kind === 'redis' ? `${redis.url}/3` : undefined;
    const proxy = await startTestProxy({
      routes: { api: bearerRoute({ upstream: upstream.url, paths: ['/x'], callers: ['worker', 'web'] }) },
      credentials: { key: { token: 'tok_usage_1234' } },
      callers: ['worker', 'web'],
      ...(store ? { store } : {}),
    });
    const env = envFor(proxy.dir, store ? { EGRESS_STORE: store } : {});
    try {
      const before = Date.now();
      for (const caller of ['worker', 'web', 'worker']) {
        expect((await fetch(`${proxy.url}/api/x`, { headers: { 'x-egress-token': proxy.tokens[caller]! } })).status).toBe(200);
      }
      // Denied requests use no credential and are not counted as use.
      expect((await fetch(`${proxy.url}/api/other`, { headers: { 'x-egress-token': proxy.tokens.web! } })).status).toBe(403);
      await proxy.services().usage.flush();
      const show = await runCli(['keys', 'show', 'key', '--json'], env);
      expect(show.code).toBe(0);
      const v1 = (JSON.parse(show.stdout) as { versions: { version: number; last_used: { caller: string; at: string }[] }[] }).versions[0]!;
      expect(v1.last_used.map((u) => u.caller).sort()).toEqual(['web', 'worker']);
      for (const u of v1.last_used) expect(Date.parse(u.at)).toBeGreaterThanOrEqual(before - 1000);
      const text = await runCli(['keys', 'show', 'key'], env);
      expect(text.stdout).toMatch(/LAST USED[\s\S]*by (worker, web|web, worker)/);
    } finally {
      await proxy.close();
    }
  });
});

describe('last use at shutdown', () => {
  it.each(['file', 'redis'])('a use noted just before SIGTERM is written before `egress serve` exits (%s store)', async (kind) => {
    const store = kind === 'redis' ? `${redis.url}/5` : undefined;
    const dir = await makeTempDir('egress-usage-stop-');
    const { tokens } = await seedDataDir(dir, { routes: { api: bearerRoute({ upstream: upstream.url, paths: ['/x'] }) }, credentials: { key: { token: 'tok_usage_stop' } }, callers: ['svc'], ...(store ? { store } : {}) });
    const env = envFor(dir, store ? { EGRESS_STORE: store } : {});
    const serve = await startServe(env);
    try {
      // Long before the 30 s flush: only the flush at shutdown can write it.
      expect((await fetch(`${serve.url}/api/x`, { headers: { 'x-egress-token': tokens.svc! } })).status).toBe(200);
    } finally {
      expect(await serve.stop('SIGTERM')).toBe(0);
    }
    const show = await runCli(['keys', 'show', 'key', '--json'], env);
    const v1 = (JSON.parse(show.stdout) as { versions: { last_used: { caller: string }[] }[] }).versions[0]!;
    expect(v1.last_used.map((u) => u.caller)).toEqual(['svc']);
  });
});

describe('last use of an OAuth2 credential', () => {
  it('is noted for the version that minted the access token: after a rotation the token endpoint refuses, the previous version shows as in use', async () => {
    let mints = 0;
    const api = await startUpstream((req, res, body) => {
      if (req.url === '/connect/token') {
        // The provider has not activated the new client secret yet: only the old one mints.
        const ok = new URLSearchParams(body.toString()).get('client_secret') === 'cs_usage_old' || String(req.headers.authorization).includes(Buffer.from('client-1:cs_usage_old').toString('base64'));
        if (ok) mints++;
        res.writeHead(ok ? 200 : 401, { 'content-type': 'application/json' });
        res.end(JSON.stringify(ok ? { access_token: `at_usage_${mints}`, token_type: 'Bearer', expires_in: 3600 } : { error: 'invalid_client' }));
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{}');
    });
    const proxy = await startTestProxy({ routes: { bank: oauth2Route(api.url) }, credentials: { bank: { client_id: 'client-1', client_secret: 'cs_usage_old' } }, callers: ['svc'] });
    const env = envFor(proxy.dir);
    try {
      expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'client-1', client_secret: 'cs_usage_new' }))).code).toBe(0);
      await proxy.services().store.refresh();
      // The first request mints with version 1 (a fallback); the next ones carry that same token.
      for (let i = 0; i < 3; i++) expect((await fetch(`${proxy.url}/bank/accounts`, { headers: { 'x-egress-token': proxy.tokens.svc! } })).status).toBe(200);
      expect(mints).toBe(1);
      await proxy.services().usage.flush();
      const show = await runCli(['keys', 'show', 'bank', '--json'], env);
      const versions = (JSON.parse(show.stdout) as { versions: { version: number; last_used: { caller: string }[] }[] }).versions;
      expect(versions.find((v) => v.version === 1)!.last_used.map((u) => u.caller)).toEqual(['svc']);
    } finally {
      await proxy.close();
      await api.close();
    }
  });
});
