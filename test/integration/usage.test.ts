import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, startTestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { bearerRoute } from '../helpers/routes.ts';
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
