import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * FLT-17: a rotation must not cause failed requests. A new version without a field a route sends
 * (a typo in the rotation file: "secert") used to become current anyway, and every request on the
 * route was refused with 503 from that moment. The real CLI and the admin API refuse the change.
 */
let upstream: Upstream;
let proxy: TestProxy;
let env: Record<string, string>;
let admin: string;

beforeAll(async () => {
  upstream = await startUpstream((req, res) => {
    const ok = req.headers['plaid-secret'] === 'sec_CANARY_1' || req.headers['plaid-secret'] === 'sec_CANARY_2';
    res.writeHead(ok ? 200 : 400, { 'content-type': 'application/json' });
    res.end(JSON.stringify(ok ? { ok } : { error_code: 'INVALID_API_KEYS' }));
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
    PLAID-CLIENT-ID: "{client_id}"
    PLAID-SECRET: "{secret}"
allow:
  - caller: svc
    methods: [GET]
    paths: [/accounts]
`,
    },
    credentials: { plaid: { client_id: 'cid', secret: 'sec_CANARY_1' } },
    callers: ['svc'],
  });
  env = envFor(proxy.dir);
  const created = await runCli(['admin-token', 'create', 'rotator', '--json'], env);
  admin = (JSON.parse(created.stdout) as { token: string }).token;
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

const get = () => fetch(`${proxy.url}/plaid/accounts`, { headers: { 'x-egress-token': proxy.tokens.svc! } }).then((r) => r.status);
const versions = async () => JSON.parse((await runCli(['keys', 'show', 'plaid', '--json'], env)).stdout) as { versions: { version: number; state: string }[] };

describe('FLT-17 a version missing a routed field never becomes current', () => {
  it('keys rotate with a misspelt field: refused (exit 1, names the route and field), nothing changes, requests keep working', async () => {
    expect(await get()).toBe(200);
    const res = await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'cid', secert: 'sec_CANARY_2' }));
    expect(res.code).toBe(1);
    expect(res.stderr + res.stdout).toContain('"secret"');
    expect(res.stderr + res.stdout).toContain('"plaid"');
    expect(res.stderr + res.stdout).not.toContain('CANARY');
    expect((await versions()).versions.map((v) => v.state)).toEqual(['current']);
    await new Promise((r) => setTimeout(r, 1_200));
    expect(await get()).toBe(200);
  });

  it('a staged version missing the field may be staged, but promote refuses it; the CLI and the admin API alike', async () => {
    expect((await runCli(['keys', 'rotate', 'plaid', '--stage', '--from-stdin'], env, JSON.stringify({ client_id: 'cid', secert: 'sec_CANARY_2' }))).code).toBe(0);
    const promote = await runCli(['keys', 'promote', 'plaid', '--grace', '1h'], env);
    expect(promote.code).toBe(1);
    await eventually(async () => (await fetch(`${proxy.admin}/v1/credentials`, { headers: { authorization: `Bearer ${admin}` } })).status === 200, 2_000, 'the admin token to load');
    const viaApi = await fetch(`${proxy.admin}/v1/credentials/plaid/promote`, { method: 'POST', headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' }, body: JSON.stringify({ grace: '1h' }) });
    expect(viaApi.status).toBeGreaterThanOrEqual(400);
    expect(viaApi.status).toBeLessThan(500);
    expect(await viaApi.text()).toContain('"secret\\"');
    expect((await versions()).versions.map((v) => v.state)).toEqual(['current', 'pending']);
    await new Promise((r) => setTimeout(r, 1_200));
    expect(await get()).toBe(200);
    // The fixed version goes through: revoke the bad one, rotate with the right field.
    expect((await runCli(['keys', 'revoke', 'plaid', '--version', '2'], env)).code).toBe(0);
    expect((await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'cid', secret: 'sec_CANARY_2' }))).code).toBe(0);
    await eventually(async () => (await versions()).versions.some((v) => v.version === 3 && v.state === 'current'), 2_000, 'version 3 current');
    expect(await get()).toBe(200);
  });
});

describe('FLT-18 revoke takes a version number as written', () => {
  it('"0x3", "3e0", "+3" and " 3" are usage errors (exit 2), nothing is revoked; "1" works', async () => {
    for (const text of ['0x3', '3e0', '+3', ' 3', '3.0', '03']) {
      const res = await runCli(['keys', 'revoke', 'plaid', '--version', text], env);
      expect(res.code).toBe(2);
    }
    expect((await versions()).versions.find((v) => v.version === 3)?.state).toBe('current');
    expect((await runCli(['keys', 'revoke', 'plaid', '--version', '1'], env)).code).toBe(0);
  });
});
