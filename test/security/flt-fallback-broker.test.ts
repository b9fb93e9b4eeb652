import { request } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { oauth2Route } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * FLT-07d: on a token-broker route (oauth2_client_credentials) the fallback happens when minting
 * (providers.md §3.2: "fall back at token-minting time, not on the business call"). An API that
 * refuses an access token (revoked early, say) while a previous version is in grace gets one
 * replay with a token freshly minted from the current version, not a token of the previous one.
 */
let upstream: Upstream;
let proxy: TestProxy;
const issued = new Map<string, string>();
const mints: string[] = [];
let counter = 0;
/** While set, the API holds its answer until this settles. */
let holdApi: Promise<void> | undefined;
/** While set, the token endpoint holds its answer to a mint with version 1's secret until this settles. */
let holdMint: Promise<void> | undefined;
/** While set, the token endpoint holds its answer to any mint until this settles. */
let holdEveryMint: Promise<void> | undefined;

beforeAll(async () => {
  upstream = await startUpstream(async (req, res, body) => {
    const json = (status: number, doc: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(doc));
    };
    if (req.url === '/connect/token') {
      const form = new URLSearchParams(body.toString());
      const secret = form.get('client_secret') ?? '';
      if (!['cs_CANARY_v1', 'cs_CANARY_v2'].includes(secret)) return json(401, { error: 'invalid_client' });
      if (holdMint && secret === 'cs_CANARY_v1') await holdMint;
      if (holdEveryMint) await holdEveryMint;
      mints.push(secret);
      const token = `at_${++counter}`;
      issued.set(token, secret);
      return json(200, { access_token: token, expires_in: 3600 });
    }
    const bearer = String(req.headers.authorization ?? '').replace(/^Bearer /, '');
    if (req.url === '/revoke') {
      issued.delete(bearer);
      return json(200, {});
    }
    if (holdApi) await holdApi;
    return json(issued.has(bearer) ? 200 : 401, { minted_by: issued.get(bearer) ?? null });
  });
  proxy = await startTestProxy({
    routes: {
      bank: oauth2Route(upstream.url, '  client_auth: body\n'),
    },
    credentials: { bank: { client_id: 'c', client_secret: 'cs_CANARY_v1' } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

const get = () => fetch(`${proxy.url}/bank/accounts`, { headers: { 'x-egress-token': proxy.tokens.svc! } });

describe('FLT-07d token-broker routes fall back when minting, not on the API call', () => {
  it('a token the API refuses during grace is replaced by one minted from the current version; no fallback is counted', async () => {
    const env = envFor(proxy.dir);
    expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'c', client_secret: 'cs_CANARY_v2' }))).code).toBe(0);
    await eventually(async () => ((await (await get()).json()) as { minted_by: string }).minted_by === 'cs_CANARY_v2', 3_000, 'a token from version 2');
    // The provider revokes that token early.
    await fetch(`${upstream.url}/revoke`, { headers: { authorization: String(upstream.requests.at(-1)!.headers.authorization) } });
    const before = mints.length;
    const res = await get();
    expect(res.status).toBe(200);
    expect(((await res.json()) as { minted_by: string }).minted_by).toBe('cs_CANARY_v2');
    expect(mints.slice(before)).toEqual(['cs_CANARY_v2']);
    expect(proxy.logs()).not.toContain('current_key_rejected');
    const audit = await proxy.auditText();
    expect(audit).not.toContain('fallback_previous_version');
  });

  it('a previous version revoked while the request was still arriving is not used to mint: the token endpoint never sees its secret again', async () => {
    const route = oauth2Route(upstream.url, '  client_auth: body\n').replace('methods: [GET]', 'methods: [GET, POST]');
    const own = await startTestProxy({ routes: { bank: route }, credentials: { bank: { client_id: 'c', client_secret: 'cs_CANARY_v1' } }, callers: ['svc'] });
    try {
      const env = envFor(own.dir);
      // Version 2's secret is one the token endpoint refuses: minting falls back to version 1.
      expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'c', client_secret: 'cs_REFUSED_v2' }))).code).toBe(0);
      await eventually(() => own.services().store.credential('bank')?.versions[1]?.state === 'current', 2_000, 'the proxy to see the rotation');
      const before = mints.length;
      const answer = new Promise<number>((resolve, reject) => {
        const req = request(`${own.url}/bank/accounts`, { method: 'POST', headers: { 'x-egress-token': own.tokens.svc!, 'content-type': 'application/json', 'content-length': '4' } }, (res) => {
          res.resume();
          res.on('end', () => resolve(res.statusCode!));
        });
        req.on('error', reject);
        req.write('{}');
        void (async () => {
          await new Promise((r) => setTimeout(r, 300));
          const revoked = await runCli(['keys', 'revoke', 'bank', '--version', '1'], env);
          if (revoked.code !== 0) return reject(new Error(revoked.stderr));
          await eventually(() => own.services().store.credential('bank')?.versions[0]?.state === 'revoked', 2_000, 'the proxy to see the revoke');
          req.end('  ');
        })().catch(reject);
      });
      expect(await answer).toBe(503);
      expect(mints.slice(before)).toEqual([]);
    } finally {
      await own.close();
    }
  });

  it('the current version revoked while the first attempt was out: the refused token is not replaced by one minted with it; the rejection is relayed', async () => {
    const own = await startTestProxy({ routes: { bank: oauth2Route(upstream.url, '  client_auth: body\n') }, credentials: { bank: { client_id: 'c', client_secret: 'cs_CANARY_v1' } }, callers: ['svc'] });
    let release!: () => void;
    try {
      const env = envFor(own.dir);
      expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'c', client_secret: 'cs_CANARY_v2' }))).code).toBe(0);
      await eventually(() => own.services().store.credential('bank')?.versions[1]?.state === 'current', 2_000, 'the proxy to see the rotation');
      const call = () => fetch(`${own.url}/bank/accounts`, { headers: { 'x-egress-token': own.tokens.svc! } });
      expect(((await (await call()).json()) as { minted_by: string }).minted_by).toBe('cs_CANARY_v2');
      // The provider revokes that token early; the API takes its time to say so.
      await fetch(`${upstream.url}/revoke`, { headers: { authorization: String(upstream.requests.at(-1)!.headers.authorization) } });
      holdApi = new Promise<void>((r) => (release = r));
      const before = upstream.requests.length;
      const answer = call();
      await eventually(() => upstream.requests.length > before, 2_000, 'the first attempt to reach the API');
      // Meanwhile version 2 is revoked (the compromise path): its secret must not be sent again.
      const revoked = await runCli(['keys', 'revoke', 'bank'], env);
      expect(revoked.code, revoked.stderr).toBe(0);
      await eventually(() => own.services().store.credential('bank')?.versions[1]?.state === 'revoked', 2_000, 'the proxy to see the revoke');
      const mintsBefore = mints.length;
      holdApi = undefined;
      release();
      const res = await answer;
      expect(mints.slice(mintsBefore), 'nothing minted with the revoked version').toEqual([]);
      expect(res.status).toBe(401);
      expect(upstream.requests.slice(before).map((r) => r.url)).toEqual(['/accounts']);
    } finally {
      holdApi = undefined;
      release?.();
      await own.close();
    }
  });

  it('a previous version revoked while the token endpoint was minting with it: the token it answers is not sent, nor kept', async () => {
    const own = await startTestProxy({ routes: { bank: oauth2Route(upstream.url, '  client_auth: body\n') }, credentials: { bank: { client_id: 'c', client_secret: 'cs_CANARY_v1' } }, callers: ['svc'] });
    let release!: () => void;
    try {
      const env = envFor(own.dir);
      // Version 2's secret is one the token endpoint refuses: minting falls back to version 1.
      expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'c', client_secret: 'cs_REFUSED_v2' }))).code).toBe(0);
      await eventually(() => own.services().store.credential('bank')?.versions[1]?.state === 'current', 2_000, 'the proxy to see the rotation');
      holdMint = new Promise<void>((r) => (release = r));
      const before = upstream.requests.length;
      const call = () => fetch(`${own.url}/bank/accounts`, { headers: { 'x-egress-token': own.tokens.svc! } });
      const answer = call();
      await eventually(() => upstream.requests.slice(before).some((r) => r.url === '/connect/token' && r.body.toString().includes('cs_CANARY_v1')), 2_000, 'the mint with version 1');
      // Version 1 is revoked (the compromise path) while the token endpoint answers.
      const revoked = await runCli(['keys', 'revoke', 'bank', '--version', '1'], env);
      expect(revoked.code, revoked.stderr).toBe(0);
      await eventually(() => own.services().store.credential('bank')?.versions[0]?.state === 'revoked', 2_000, 'the proxy to see the revoke');
      holdMint = undefined;
      release();
      const res = await answer;
      expect(upstream.requests.slice(before).filter((r) => r.url === '/accounts'), 'no API call with the token minted by the revoked version').toEqual([]);
      expect(res.status).toBe(503);
      // Nor on the next request: only version 2 is left, and the token endpoint refuses it.
      const next = upstream.requests.length;
      expect((await call()).status).toBe(503);
      expect(upstream.requests.slice(next).map((r) => r.url)).toEqual(['/connect/token']);
    } finally {
      holdMint = undefined;
      release?.();
      await own.close();
    }
  });

  it('a mint with the previous version (the token endpoint refuses the current one) is a fallback: counted and audited', async () => {
    const own = await startTestProxy({ routes: { bank: oauth2Route(upstream.url, '  client_auth: body\n') }, credentials: { bank: { client_id: 'c', client_secret: 'cs_CANARY_v1' } }, callers: ['svc'] });
    try {
      const env = envFor(own.dir);
      // Version 2's secret was pasted wrong: the token endpoint refuses it.
      expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'c', client_secret: 'cs_REFUSED_v2' }))).code).toBe(0);
      await eventually(() => own.services().store.credential('bank')?.versions[1]?.state === 'current', 2_000, 'the proxy to see the rotation');
      const before = mints.length;
      const res = await fetch(`${own.url}/bank/accounts`, { headers: { 'x-egress-token': own.tokens.svc! } });
      expect(res.status).toBe(200);
      expect(((await res.json()) as { minted_by: string }).minted_by).toBe('cs_CANARY_v1');
      expect(mints.slice(before)).toEqual(['cs_CANARY_v1']);
      expect(await (await fetch(`${own.admin}/metrics`)).text()).toMatch(/egress_rotation_fallbacks_total\{credential="bank",version="1"\} 1\b/);
      expect(await own.auditText()).toContain('"reason":"fallback_previous_version"');
    } finally {
      await own.close();
    }
  });
  // The replay's token is minted after the first attempt was refused; a caller that hung up
  // meanwhile had its replay sent all the same (forward() checked for a gone caller only on entry).
  it('a caller that hangs up while the replay\'s token is minted: the replay is not sent, and the request is recorded as aborted', async () => {
    const own = await startTestProxy({ routes: { bank: oauth2Route(upstream.url, '  client_auth: body\n') }, credentials: { bank: { client_id: 'c', client_secret: 'cs_CANARY_v1' } }, callers: ['svc'] });
    let release = () => {};
    try {
      const env = envFor(own.dir);
      expect((await runCli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ client_id: 'c', client_secret: 'cs_CANARY_v2' }))).code).toBe(0);
      await eventually(async () => ((await (await fetch(`${own.url}/bank/accounts`, { headers: { 'x-egress-token': own.tokens.svc! } })).json()) as { minted_by: string }).minted_by === 'cs_CANARY_v2', 3_000, 'a token from version 2');
      // The provider revokes that token early; the next mint is slow.
      await fetch(`${upstream.url}/revoke`, { headers: { authorization: String(upstream.requests.at(-1)!.headers.authorization) } });
      holdEveryMint = new Promise<void>((r) => (release = r));
      const calls = () => upstream.requests.filter((r) => r.url?.startsWith('/accounts')).length;
      const before = calls();
      const ac = new AbortController();
      const res = fetch(`${own.url}/bank/accounts?hang=up`, { headers: { 'x-egress-token': own.tokens.svc! }, signal: ac.signal });
      await eventually(() => calls() === before + 1, 3_000, 'the first attempt');
      await new Promise((r) => setTimeout(r, 200));
      ac.abort();
      await expect(res).rejects.toThrow();
      await new Promise((r) => setTimeout(r, 100));
      holdEveryMint = undefined;
      release();
      await eventually(async () => (await own.auditText()).includes('"path":"/bank/accounts"') && /"decision":"aborted"/.test(await own.auditText()), 3_000, 'the audit line');
      await new Promise((r) => setTimeout(r, 300));
      expect(calls() - before, 'API calls: the first attempt only').toBe(1);
      const line = (await own.auditText()).trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.path === '/bank/accounts').at(-1)!;
      expect(line).toMatchObject({ decision: 'aborted', reason: 'caller_closed' });
    } finally {
      holdEveryMint = undefined;
      release();
      await own.close();
    }
  });
});
