import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * The rotation promise: a load of about 200 req/s for 20 s while a rotation script runs the whole
 * procedure a provider like Plaid allows (make a second key, move to it, drop the first), and not
 * one request fails.
 */
const OLD = 'plaid_live_OLD_9e1c';
const NEW = 'plaid_live_NEW_44d0';
let upstream: Upstream;
let proxy: TestProxy;
let accepted = new Set([OLD]);
const acceptedLog: { at: number; key: string; ok: boolean }[] = [];

beforeAll(async () => {
  upstream = await startUpstream((req, res) => {
    const key = String(req.headers['plaid-secret']);
    const ok = accepted.has(key);
    acceptedLog.push({ at: Date.now(), key, ok });
    res.writeHead(ok ? 200 : 400, { 'content-type': 'application/json' });
    res.end(ok ? '{"accounts":[]}' : '{"error_code":"INVALID_API_KEYS"}');
  });
  proxy = await startTestProxy({
    routes: {
      plaid: `name: plaid
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
  - caller: sync-worker
    methods: [GET, POST]
    paths: [/accounts/get, /transactions/sync]
`,
    },
    credentials: { plaid: { secret: OLD } },
    callers: ['sync-worker'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

describe('rotation under load', () => {
  it('~200 req/s for 20 s while the key is rotated: zero failed requests, then only the new key, the old one retired', async () => {
    const env = envFor(proxy.dir);
    const started = Date.now();
    const end = started + 20_000;
    const statuses = new Map<number, number>();
    let sent = 0;
    // 4 workers x one request every 20 ms = 200 req/s, a mix of replay-safe and not.
    const worker = async (n: number) => {
      let next = Date.now();
      while (Date.now() < end) {
        const path = (sent + n) % 2 === 0 ? '/accounts/get' : '/transactions/sync';
        sent++;
        const res = await fetch(`${proxy.url}/plaid${path}`, { method: 'POST', headers: { 'x-egress-token': proxy.tokens['sync-worker']!, 'content-type': 'application/json' }, body: '{"cursor":"abc"}' });
        await res.arrayBuffer();
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        next += 20;
        const wait = next - Date.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      }
    };
    const script = async () => {
      await new Promise((r) => setTimeout(r, 3_000));
      accepted = new Set([OLD, NEW]); // the provider issues a second key; both work
      const staged = await runCli(['keys', 'rotate', 'plaid', '--stage', '--from-stdin'], env, JSON.stringify({ secret: NEW }));
      expect(staged.code).toBe(0);
      const promoted = await runCli(['keys', 'promote', 'plaid', '--grace', '6s'], env);
      expect(promoted.code).toBe(0);
      const promotedAt = Date.now();
      await new Promise((r) => setTimeout(r, 13_000 - (Date.now() - started)));
      accepted = new Set([NEW]); // the provider deletes the old key
      return promotedAt;
    };
    const [promotedAt] = await Promise.all([script(), ...[0, 1, 2, 3].map(worker)]);

    const total = [...statuses.values()].reduce((a, b) => a + b, 0);
    expect(total).toBeGreaterThan(3_000);
    expect(Object.fromEntries(statuses)).toEqual({ 200: total });
    // The upstream never rejected a key in use (a fallback would show as a rejected NEW).
    expect(acceptedLog.filter((e) => !e.ok)).toEqual([]);
    // The old key stopped being used within a second of the promotion; the new one after.
    expect(acceptedLog.filter((e) => e.key === OLD && e.at > promotedAt! + 1_000)).toEqual([]);
    expect(acceptedLog.filter((e) => e.key === NEW).length).toBeGreaterThan(1_000);

    const record = (JSON.parse(await readFile(proxy.storePath, 'utf8')) as { credentials: { plaid: { versions: { state: string; data?: unknown; dek?: unknown }[] } } }).credentials.plaid;
    expect(record.versions.map((v) => v.state)).toEqual(['retired', 'current']);
    expect(record.versions[0]!.data).toBeUndefined();
    expect(record.versions[0]!.dek).toBeUndefined();
    expect(await readFile(proxy.storePath, 'utf8')).not.toContain(OLD);
  }, 40_000);
});
