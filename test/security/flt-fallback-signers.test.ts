import { createHash, createHmac } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * FLT-07c: the one fallback to the previous key, for a signer, with the kraken preset (Kraken
 * answers an unknown key with HTTP 200 and "EAPI:Invalid key"). The replay is signed afresh with the
 * previous key over the caller's original body, with a nonce above the first attempt's; nothing of
 * the rejected attempt (its nonce, its signature) is re-used.
 */
const V1 = { api_key: 'key-v1', api_secret: Buffer.from('secret-v1-CANARY').toString('base64') };
const V2 = { api_key: 'key-v2', api_secret: Buffer.from('secret-v2-CANARY').toString('base64') };
let upstream: Upstream;
let proxy: TestProxy;
const seen: { key: string; nonce: bigint; sign: string; valid: boolean; body: string }[] = [];

beforeAll(async () => {
  upstream = await startUpstream((req, res, body) => {
    const key = String(req.headers['api-key']);
    const secret = key === V1.api_key ? V1.api_secret : key === V2.api_key ? V2.api_secret : '';
    const form = new URLSearchParams(body.toString('latin1'));
    const nonce = form.get('nonce') ?? '';
    const digest = createHash('sha256').update(nonce + body.toString('latin1')).digest();
    const expected = createHmac('sha512', Buffer.from(secret, 'base64')).update(Buffer.concat([Buffer.from(new URL(req.url!, 'http://x').pathname), digest])).digest('base64');
    const valid = secret !== '' && expected === req.headers['api-sign'];
    seen.push({ key, nonce: BigInt(nonce || '0'), sign: String(req.headers['api-sign']), valid, body: body.toString('latin1') });
    // The exchange still knows only the old key: the new one is "Invalid key". A key it knows with a
    // signature that does not match (the secret pasted wrong) is "Invalid signature".
    const ok = valid && key === V1.api_key;
    if (ok && req.url!.endsWith('/Ledgers')) {
      // A long answer is an answer: it streams on whole, whatever it mentions.
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: [], result: { note: 'EAPI:Invalid key', pad: 'x'.repeat(300_000) } }));
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(ok ? { error: [], result: { ZUSD: '1.0' } } : { error: [key === V1.api_key && !valid ? 'EAPI:Invalid signature' : 'EAPI:Invalid key'] }));
  });
  proxy = await startTestProxy({
    routes: {
      kraken: `name: kraken
prefix: /kraken
allow_private_addresses: true
credential: kraken
preset: kraken
upstream: ${upstream.url}
allow:
  - caller: svc
    methods: [POST]
    paths: [/0/private/*]
`,
      'kraken-sig': `name: kraken-sig
allow_private_addresses: true
credential: kraken-sig
preset: kraken
upstream: ${upstream.url}
allow:
  - caller: svc
    methods: [POST]
    paths: [/0/private/*]
`,
    },
    credentials: { kraken: V1, 'kraken-sig': V1 },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

const post = (path: string, route = 'kraken') => fetch(`${proxy.url}/${route}${path}`, { method: 'POST', headers: { 'x-egress-token': proxy.tokens.svc!, 'content-type': 'application/x-www-form-urlencoded' }, body: 'asset=ZUSD&nonce=1' });

describe('FLT-07c fallback for a signed request', () => {
  it('a 2xx auth_failure needs body_contains; a redirect status is refused', async () => {
    const { parseRouteText } = await import('../../src/config/load-routes.ts');
    const base = `name: k\nprefix: /k\nupstream: https://api.kraken.com\ncredential: k\ninject:\n  scheme: bearer\n`;
    const bad = await parseRouteText(`${base}auth_failure:\n  status: [200]\n`, 'k.yaml', async () => '');
    expect('problems' in bad && bad.problems.map((p) => p.message).join(' ')).toContain('body_contains');
    const redirect = await parseRouteText(`${base}auth_failure:\n  status: [302]\n  body_contains: x\n`, 'k.yaml', async () => '');
    expect('problems' in redirect).toBe(true);
    const good = await parseRouteText(`${base}auth_failure:\n  status: [200]\n  body_contains: "EAPI:Invalid key"\n`, 'k.yaml', async () => '');
    expect('route' in good).toBe(true);
  });

  it('kraken: the replay goes with the previous key, a fresh higher nonce, a valid signature over the caller body; a non-replay-safe call is not re-sent', async () => {
    expect((await post('/0/private/Balance')).status).toBe(200);
    const env = envFor(proxy.dir);
    expect((await runCli(['keys', 'rotate', 'kraken', '--from-stdin', '--grace', '1h'], env, JSON.stringify(V2))).code).toBe(0);
    await eventually(async () => {
      const n = seen.length;
      await post('/0/private/Balance');
      return seen.slice(n).some((s) => s.key === V2.api_key);
    }, 3_000, 'the new key to be tried');
    const n = seen.length;
    const res = await post('/0/private/Balance');
    expect(res.status).toBe(200);
    expect((await res.json() as { error: string[] }).error).toEqual([]);
    const [first, replay] = seen.slice(n);
    expect(seen.length - n).toBe(2);
    expect(first!.key).toBe(V2.api_key);
    expect(first!.valid).toBe(true);
    expect(replay!.key).toBe(V1.api_key);
    expect(replay!.valid).toBe(true);
    expect(replay!.nonce > first!.nonce).toBe(true);
    expect(replay!.sign).not.toBe(first!.sign);
    expect(replay!.body.startsWith('asset=ZUSD&nonce=')).toBe(true);
    const l = seen.length;
    const ledgers = await post('/0/private/Ledgers');
    expect(ledgers.status).toBe(200);
    expect(((await ledgers.json()) as { result: { pad: string } }).result.pad.length).toBe(300_000);
    expect(seen.length - l).toBe(2);
    // AddOrder is not replay-safe: one attempt, the rejection passes through.
    const m = seen.length;
    const order = await post('/0/private/AddOrder');
    expect(seen.length - m).toBe(1);
    expect(await order.text()).toContain('EAPI:Invalid key');
  });

  it('kraken: a new version whose secret does not match its key ("EAPI:Invalid signature": a secret pasted wrong) falls back as an unknown key does', async () => {
    expect((await post('/0/private/Balance', 'kraken-sig')).status).toBe(200);
    const env = envFor(proxy.dir);
    const wrongSecret = { api_key: V1.api_key, api_secret: Buffer.from('pasted-wrong-CANARY').toString('base64') };
    expect((await runCli(['keys', 'rotate', 'kraken-sig', '--from-stdin', '--grace', '1h'], env, JSON.stringify(wrongSecret))).code).toBe(0);
    await eventually(async () => {
      const n = seen.length;
      await post('/0/private/Balance', 'kraken-sig');
      return seen.slice(n).some((s) => !s.valid);
    }, 3_000, 'the new version to be tried');
    const n = seen.length;
    const res = await post('/0/private/Balance', 'kraken-sig');
    expect(res.status).toBe(200);
    expect((await res.json() as { error: string[] }).error).toEqual([]);
    const [first, replay] = seen.slice(n);
    expect(seen.length - n).toBe(2);
    expect(first!.valid).toBe(false);
    expect(replay!.valid).toBe(true);
  });
});
