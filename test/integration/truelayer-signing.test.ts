import { generateKeyPairSync, verify, type KeyObject } from 'node:crypto';
import { request, type IncomingMessage } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatProblem, parseRouteText } from '../../src/config/load-routes.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * TrueLayer request signing (Tl-Signature) against an upstream that verifies it with its own code,
 * written from shared/reference/providers.md (TrueLayer, and truelayer-signing's verifier), not with
 * the proxy's: it parses the detached JWS, rebuilds the payload from what it received (method, path
 * without the query, the headers named in tl_headers, the body) and checks the ES512 signature with
 * the public key of the header's kid, trying the path with and without a trailing slash as
 * TrueLayer's verifier does.
 */

const p521 = () => generateKeyPairSync('ec', { namedCurve: 'P-521' });
const keyA = p521();
const keyB = p521();
const PEM_A = keyA.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
const PEM_B = keyB.privateKey.export({ type: 'sec1', format: 'pem' }) as string;
const PEM_RSA = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
const PEM_P256 = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
const PUBLIC_KEYS = new Map<string, KeyObject>([['kid-A', keyA.publicKey], ['kid-B', keyB.publicKey]]);

/** Each key as it must never be seen: the PEM, each of its base64 lines, and the key's DER in one base64 line. */
const KEY_FORMS = [PEM_A, PEM_B, PEM_RSA].flatMap((pem) => {
  const lines = pem.split('\n').filter((l) => l && !l.startsWith('-----'));
  return [pem, ...lines, lines.join('')];
});

const CREDS = {
  tl: { client_id: 'tl-client', client_secret: 'tl_CANARY_secret', kid: 'kid-A', private_key: PEM_A },
  tlf: { kid: 'kid-A', private_key: PEM_A },
  tli: { kid: 'kid-A', private_key: PEM_A },
  payi: { client_id: 'tl-client', client_secret: 'tl_CANARY_secret', kid: 'kid-A', private_key: PEM_A },
  'tl-rsa': { kid: 'kid-A', private_key: PEM_RSA },
  'tl-p256': { kid: 'kid-A', private_key: PEM_P256 },
};

interface Verdict {
  readonly ok: boolean;
  readonly why?: string;
  /** The JWS header as received, and the path variant whose signature held. */
  readonly header?: { alg: string; kid: string; tl_version: string; tl_headers: string };
  readonly matched?: 'as sent' | 'other slash';
  readonly bearer?: string;
}

const issued = new Set<string>();
/** Access tokens the API refuses on /payi/ (revoked early by the provider). */
const refusedTokens = new Set<string>();

function verifyTlSignature(req: IncomingMessage, body: Buffer): Verdict {
  const value = req.headers['tl-signature'];
  if (typeof value !== 'string') return { ok: false, why: 'no Tl-Signature' };
  const parts = value.split('.');
  if (parts.length !== 3 || parts[1] !== '') return { ok: false, why: 'not a detached JWS' };
  const [h64, , s64] = parts as [string, string, string];
  const header = JSON.parse(Buffer.from(h64, 'base64url').toString('utf8')) as NonNullable<Verdict['header']>;
  if (header.alg !== 'ES512' || header.tl_version !== '2') return { ok: false, why: 'alg or tl_version', header };
  const key = PUBLIC_KEYS.get(header.kid);
  if (!key) return { ok: false, why: 'unknown kid', header };
  const names = header.tl_headers.split(',').filter((n) => n !== '');
  const lines: string[] = [];
  for (const name of names) {
    const received = req.headers[name.toLowerCase()];
    if (typeof received !== 'string') return { ok: false, why: `signed header ${name} not received once`, header };
    lines.push(`${name}: ${received}\n`);
  }
  const signature = Buffer.from(s64, 'base64url');
  if (signature.length !== 132) return { ok: false, why: `signature is ${signature.length} bytes, not r||s`, header };
  const url = req.url ?? '/';
  const path = url.includes('?') ? url.slice(0, url.indexOf('?')) : url;
  const holds = (p: string) => {
    const payload = Buffer.concat([Buffer.from(`${req.method} ${p}\n${lines.join('')}`), body]);
    return verify('sha512', Buffer.from(`${h64}.${payload.toString('base64url')}`), { key, dsaEncoding: 'ieee-p1363' }, signature);
  };
  if (holds(path)) return { ok: true, header, matched: 'as sent' };
  if (holds(path.endsWith('/') ? path.slice(0, -1) : `${path}/`)) return { ok: true, header, matched: 'other slash' };
  return { ok: false, why: 'signature does not verify', header };
}

let upstream: Upstream;
let proxy: TestProxy;
let mints = 0;
/** What the caller saw: every response body and header, for the leak check. */
const seenByCaller: string[] = [];

const route = (name: string, inject: string, { credential = 'tl', upstreamPath = `/${name}`, methods = '[GET, POST, PUT, PATCH, DELETE]' } = {}) => `name: ${name}
prefix: /${name}
upstream: ${upstream.url}${upstreamPath}
allow_private_addresses: true
credential: ${credential}
inject:${inject}
allow:
  - caller: svc
    methods: ${methods}
    paths: [/**]
`;

beforeAll(async () => {
  upstream = await startUpstream((req, res, body) => {
    const json = (status: number, doc: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(doc));
    };
    if (req.url === '/connect/token') {
      // TrueLayer's token endpoint: client_id and client_secret in the form.
      const form = new URLSearchParams(body.toString());
      if (form.get('grant_type') !== 'client_credentials' || form.get('client_id') !== 'tl-client' || form.get('client_secret') !== 'tl_CANARY_secret') return json(401, { error: 'invalid_client' });
      const token = `tl_at_${++mints}`;
      issued.add(token);
      return json(200, { access_token: token, token_type: 'Bearer', expires_in: 3600 });
    }
    if (req.url?.endsWith('/echo')) {
      // An upstream that quotes what it got in its error (as some do): the caller must not see it.
      return json(400, { received: req.headers['tl-signature'] ?? null });
    }
    const verdict = verifyTlSignature(req, body);
    // /tlf, /tli: a new key whose public key was not uploaded yet; TrueLayer answers it 401.
    if ((req.url?.startsWith('/tlf/') || req.url?.startsWith('/tli/')) && verdict.header?.kid === 'kid-B') return json(401, { ok: false, why: 'kid-B is not in Console', header: verdict.header });
    const bearer = String(req.headers.authorization ?? '').replace(/^Bearer /, '');
    if (req.url?.startsWith('/payi/') && refusedTokens.has(bearer)) return json(401, { ok: false, why: 'access token refused' });
    json(verdict.ok ? 200 : 401, { ...verdict, ...(issued.has(bearer) ? { bearer: 'issued' } : {}) });
  });
  proxy = await startTestProxy({
    routes: {
      tl: route('tl', '\n  scheme: truelayer_signing'),
      // TrueLayer's layout: the upstream has a base path (/v3) the prefix replaces.
      tlb: route('tlb', '\n  scheme: truelayer_signing', { upstreamPath: '/base/v3' }),
      // More headers, and GET signed too, as a route may ask.
      tlh: route('tlh', '\n  scheme: truelayer_signing\n  signed_headers: [Idempotency-Key, X-Tl-Test, Content-Type]\n  methods: [GET, POST]'),
      // The TrueLayer Payments case: a Bearer token from the client-credentials grant, then the signature.
      pay: route('pay', `
  - scheme: oauth2_client_credentials
    token_url: ${upstream.url}/connect/token
    client_auth: body
    scope: payments
  - scheme: truelayer_signing`),
      tlf: route('tlf', '\n  scheme: truelayer_signing', { credential: 'tlf' }) + 'auth_failure: { status: [401] }\nreplay_safe: [POST /v3/payouts]\n',
      // The upstream honours Idempotency-Key: a request that carries one is replay-safe, whatever its path.
      tli: route('tli', '\n  scheme: truelayer_signing', { credential: 'tli' }) + 'auth_failure: { status: [401] }\nidempotency_key: Idempotency-Key\n',
      // As preset truelayer: the token first, then the signature, and Idempotency-Key honoured.
      payi: route('payi', `
  - scheme: oauth2_client_credentials
    token_url: ${upstream.url}/connect/token
    client_auth: body
    scope: payments
  - scheme: truelayer_signing`, { credential: 'payi' }) + 'auth_failure: { status: [401] }\nidempotency_key: Idempotency-Key\n',
      'tl-rsa': route('tl-rsa', '\n  scheme: truelayer_signing', { credential: 'tl-rsa' }),
      'tl-p256': route('tl-p256', '\n  scheme: truelayer_signing', { credential: 'tl-p256' }),
    },
    credentials: CREDS,
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

async function call(method: string, path: string, init: { headers?: Record<string, string>; body?: string } = {}): Promise<{ status: number; body: Verdict & { error?: { code: string; message: string }; received?: string } }> {
  const res = await fetch(`${proxy.url}${path}`, { method, headers: { 'x-egress-token': proxy.tokens.svc!, ...init.headers }, ...(init.body !== undefined ? { body: init.body } : {}) });
  const text = await res.text();
  seenByCaller.push(text, JSON.stringify([...res.headers]));
  return { status: res.status, body: JSON.parse(text) as Verdict & { error?: { code: string; message: string } } };
}

const IDEMPOTENCY = { 'idempotency-key': '619410b3-b00c-406e-bb1b-2982f97edb8b', 'content-type': 'application/json' };

describe('truelayer_signing: Tl-Signature verified by an independent ES512 verifier', () => {
  it('POST with Idempotency-Key and a JSON body: signed over method, path, Idempotency-Key and the body bytes', async () => {
    const res = await call('POST', '/tl/v3/payouts', { headers: { ...IDEMPOTENCY, 'tl-signature': 'forged..sig' }, body: '{"currency":"GBP","amount_in_minor":100}' });
    expect(res.body).toMatchObject({ ok: true, matched: 'as sent', header: { alg: 'ES512', kid: 'kid-A', tl_version: '2', tl_headers: 'Idempotency-Key' } });
    expect(Object.keys(res.body.header!).sort()).toEqual(['alg', 'kid', 'tl_headers', 'tl_version']);
    expect(upstream.requests.at(-1)!.rawHeaders.filter((h) => h.toLowerCase() === 'tl-signature')).toHaveLength(1);
  });

  it('DELETE without a body or an Idempotency-Key: signed with an empty tl_headers', async () => {
    const res = await call('DELETE', '/tl/v3/mandates/m-1');
    expect(res.body).toMatchObject({ ok: true, matched: 'as sent', header: { tl_headers: '' } });
    expect(upstream.requests.at(-1)!.body.length).toBe(0);
  });

  it('a query string is sent but not signed: the signed path is the path alone', async () => {
    const res = await call('POST', '/tl/v3/payments?expand=true&x=%2F', { headers: IDEMPOTENCY, body: '{}' });
    expect(res.body).toMatchObject({ ok: true, matched: 'as sent' });
    expect(upstream.requests.at(-1)!.url).toBe('/tl/v3/payments?expand=true&x=%2F');
  });

  it('the path is signed as sent, with or without its trailing slash', async () => {
    expect((await call('POST', '/tl/v3/payouts/', { headers: IDEMPOTENCY, body: '{}' })).body).toMatchObject({ ok: true, matched: 'as sent' });
    expect(upstream.requests.at(-1)!.url).toBe('/tl/v3/payouts/');
    expect((await call('POST', '/tl/v3/payouts', { headers: IDEMPOTENCY, body: '{}' })).body).toMatchObject({ ok: true, matched: 'as sent' });
  });

  it('a route whose upstream has a base path signs the path sent upstream, not the caller\'s', async () => {
    const res = await call('POST', '/tlb/payments', { headers: IDEMPOTENCY, body: '{"a":1}' });
    expect(res.body).toMatchObject({ ok: true, matched: 'as sent' });
    expect(upstream.requests.at(-1)!.url).toBe('/base/v3/payments');
  });

  it('GET and HEAD go unsigned by default (a caller\'s own Tl-Signature removed); a route that lists GET signs it', async () => {
    const res = await call('GET', '/tl/v3/payments/p-1', { headers: { 'tl-signature': 'forged..sig' } });
    expect(res.body).toMatchObject({ ok: false, why: 'no Tl-Signature' });
    expect(upstream.requests.at(-1)!.headers['tl-signature']).toBeUndefined();
    const signed = await call('GET', '/tlh/v3/payments/p-1');
    expect(signed.body).toMatchObject({ ok: true, header: { tl_headers: '' } });
  });

  it('signed_headers: each one the request carries, in the route\'s order and casing', async () => {
    const res = await call('POST', '/tlh/v3/payouts', { headers: { ...IDEMPOTENCY, 'x-tl-test': 'v 1' }, body: '{"b":2}' });
    expect(res.body).toMatchObject({ ok: true, header: { tl_headers: 'Idempotency-Key,X-Tl-Test,Content-Type' } });
    const without = await call('POST', '/tlh/v3/payouts', { headers: { 'content-type': 'application/json' }, body: '{}' });
    expect(without.body).toMatchObject({ ok: true, header: { tl_headers: 'Content-Type' } });
  });

  it('a signed header sent twice is refused with 400, nothing sent', async () => {
    const before = upstream.requests.length;
    // fetch folds repeats into one value: node:http sends the two lines as given.
    const status = await new Promise<number>((resolve, reject) => {
      const req = request(`${proxy.url}/tlh/v3/payouts`, { method: 'POST', headers: [['x-egress-token', proxy.tokens.svc!], ['x-tl-test', 'one'], ['x-tl-test', 'two'], ['content-length', '2']].flat() }, (res) => {
        res.resume();
        resolve(res.statusCode!);
      });
      req.on('error', reject);
      req.end('{}');
    });
    expect(status).toBe(400);
    expect(upstream.requests.length).toBe(before);
  });

  it('with oauth2_client_credentials first (TrueLayer Payments): Bearer token and signature on the same request', async () => {
    const res = await call('POST', '/pay/v3/payments', { headers: IDEMPOTENCY, body: '{"amount_in_minor":1}' });
    expect(res.body).toMatchObject({ ok: true, bearer: 'issued', header: { kid: 'kid-A' } });
    expect(mints).toBe(1);
    expect(new URLSearchParams(upstream.requests.find((r) => r.url === '/connect/token')!.body.toString()).get('scope')).toBe('payments');
  });

  it('a key that is not EC P-521 refuses the request with 503 naming the problem, nothing sent and no key material shown', async () => {
    const before = upstream.requests.length;
    for (const name of ['tl-rsa', 'tl-p256']) {
      const res = await call('POST', `/${name}/v3/payouts`, { headers: IDEMPOTENCY, body: '{}' });
      expect(res.status).toBe(503);
      expect(res.body.error).toMatchObject({ code: 'credential_unavailable', message: expect.stringContaining('not an EC P-521 key') });
    }
    expect(upstream.requests.length).toBe(before);
  });

  it('an upstream that echoes the Tl-Signature it got shows the caller [REDACTED]', async () => {
    const res = await call('POST', '/tl/v3/echo', { headers: IDEMPOTENCY, body: '{}' });
    const sent = upstream.requests.at(-1)!.headers['tl-signature'];
    expect(sent).toMatch(/^[\w-]+\.\.[\w-]+$/);
    expect(res.body.received).toBe('[REDACTED]');
  });

  it('rotation: keys rotate with a new kid and key signs the next request with them', async () => {
    const rotate = await runCli(['keys', 'rotate', 'tl', '--from-stdin'], envFor(proxy.dir), JSON.stringify({ ...CREDS.tl, kid: 'kid-B', private_key: PEM_B }));
    expect(rotate.code, rotate.stderr).toBe(0);
    let last: Verdict | undefined;
    await eventually(async () => {
      last = (await call('POST', '/tl/v3/payouts', { headers: IDEMPOTENCY, body: '{}' })).body;
      return last.header?.kid === 'kid-B';
    }, 3_000, 'the new version in use');
    expect(last).toMatchObject({ ok: true, matched: 'as sent' });
    // The bad-key message never quotes the key either (the CLI saw it on stdin only).
    expect(rotate.stdout + rotate.stderr).not.toContain('PRIVATE KEY');
  });

  it('a replay-safe request refused under the new key is re-signed with the previous one, same Idempotency-Key', async () => {
    const rotate = await runCli(['keys', 'rotate', 'tlf', '--from-stdin', '--grace', '1h'], envFor(proxy.dir), JSON.stringify({ kid: 'kid-B', private_key: PEM_B }));
    expect(rotate.code, rotate.stderr).toBe(0);
    await eventually(async () => {
      await call('POST', '/tlf/v3/payouts', { headers: IDEMPOTENCY, body: '{"n":1}' });
      return upstream.requests.some((r) => r.url === '/tlf/v3/payouts' && r.headers['tl-signature']?.length && JSON.parse(Buffer.from(String(r.headers['tl-signature']).split('.')[0]!, 'base64url').toString()).kid === 'kid-B');
    }, 3_000, 'the new version in use');
    const before = upstream.requests.length;
    const res = await call('POST', '/tlf/v3/payouts', { headers: IDEMPOTENCY, body: '{"n":2}' });
    expect(res.body).toMatchObject({ ok: true, matched: 'as sent', header: { kid: 'kid-A', tl_headers: 'Idempotency-Key' } });
    const sent = upstream.requests.slice(before);
    expect(sent).toHaveLength(2);
    expect(sent.map((r) => r.headers['idempotency-key'])).toEqual([IDEMPOTENCY['idempotency-key'], IDEMPOTENCY['idempotency-key']]);
    expect(sent[0]!.headers['tl-signature']).not.toBe(sent[1]!.headers['tl-signature']);
  });

  it('idempotency_key: a POST with one Idempotency-Key refused under the new key is re-signed with the previous one, the same Idempotency-Key in tl_headers and the same body; one without is not re-sent', async () => {
    const rotate = await runCli(['keys', 'rotate', 'tli', '--from-stdin', '--grace', '1h'], envFor(proxy.dir), JSON.stringify({ kid: 'kid-B', private_key: PEM_B }));
    expect(rotate.code, rotate.stderr).toBe(0);
    await eventually(() => proxy.services().store.credential('tli')?.versions[1]?.state === 'current', 3_000, 'the new version in use');
    let before = upstream.requests.length;
    // Not in any replay_safe list: the key alone makes it replay-safe.
    const res = await call('POST', '/tli/v3/payments', { headers: IDEMPOTENCY, body: '{"n":3}' });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ ok: true, matched: 'as sent', header: { kid: 'kid-A', tl_headers: 'Idempotency-Key' } });
    let sent = upstream.requests.slice(before);
    expect(sent.map((r) => JSON.parse(Buffer.from(String(r.headers['tl-signature']).split('.')[0]!, 'base64url').toString()).kid)).toEqual(['kid-B', 'kid-A']);
    expect(sent.map((r) => r.headers['idempotency-key'])).toEqual([IDEMPOTENCY['idempotency-key'], IDEMPOTENCY['idempotency-key']]);
    expect(sent.map((r) => r.body.toString())).toEqual(['{"n":3}', '{"n":3}']);
    before = upstream.requests.length;
    const without = await call('POST', '/tli/v3/payments', { headers: { 'content-type': 'application/json' }, body: '{"n":4}' });
    expect(without.status).toBe(401);
    sent = upstream.requests.slice(before);
    expect(sent).toHaveLength(1);
  });

  it('idempotency_key with oauth2_client_credentials (preset truelayer): a refused access token is replaced by one minted from the current version, and the POST with one Idempotency-Key is re-sent with it, re-signed, same key and body; one without is not re-sent', async () => {
    const env = envFor(proxy.dir);
    const rotate = await runCli(['keys', 'rotate', 'payi', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ ...CREDS.payi, kid: 'kid-B', private_key: PEM_B }));
    expect(rotate.code, rotate.stderr).toBe(0);
    await eventually(() => proxy.services().store.credential('payi')?.versions[1]?.state === 'current', 3_000, 'the new version in use');
    const first = await call('POST', '/payi/v3/payments', { headers: IDEMPOTENCY, body: '{}' });
    expect(first.body).toMatchObject({ ok: true, bearer: 'issued', header: { kid: 'kid-B' } });
    // The provider revokes that token early.
    const bearerOf = (r: { headers: { authorization?: string } }) => String(r.headers.authorization).replace(/^Bearer /, '');
    refusedTokens.add(bearerOf(upstream.requests.at(-1)!));
    let before = upstream.requests.length;
    const res = await call('POST', '/payi/v3/payments', { headers: IDEMPOTENCY, body: '{"amount_in_minor":5}' });
    expect(res.status).toBe(200);
    // The replay goes with the current version (kid-B) and a fresh token: the previous version is for the token endpoint only.
    expect(res.body).toMatchObject({ ok: true, matched: 'as sent', bearer: 'issued', header: { kid: 'kid-B', tl_headers: 'Idempotency-Key' } });
    let sent = upstream.requests.slice(before);
    expect(sent.map((r) => r.url)).toEqual(['/payi/v3/payments', '/connect/token', '/payi/v3/payments']);
    const [refused, , replay] = sent as [typeof sent[0], typeof sent[0], typeof sent[0]];
    expect(bearerOf(replay)).not.toBe(bearerOf(refused));
    expect([refused, replay].map((r) => r.headers['idempotency-key'])).toEqual([IDEMPOTENCY['idempotency-key'], IDEMPOTENCY['idempotency-key']]);
    expect([refused, replay].map((r) => r.body.toString())).toEqual(['{"amount_in_minor":5}', '{"amount_in_minor":5}']);
    const audit = (await proxy.auditText()).split('\n').filter((l) => l.includes('"path":"/payi/v3/payments"'));
    expect(audit.join('\n')).not.toContain('fallback_previous_version');
    // The new token is refused too: without an Idempotency-Key, the POST goes once.
    refusedTokens.add(bearerOf(replay));
    before = upstream.requests.length;
    const without = await call('POST', '/payi/v3/payments', { headers: { 'content-type': 'application/json' }, body: '{"amount_in_minor":6}' });
    expect(without.status).toBe(401);
    sent = upstream.requests.slice(before);
    expect(sent.map((r) => r.url)).toEqual(['/payi/v3/payments']);
  });

  it('a key that does not parse is refused when stored, without quoting it', async () => {
    const broken = PEM_A.replace(/(-----\n)(.{8})/, '$1!!!!!!!!');
    const res = await runCli(['keys', 'put', 'tl-broken', '--from-stdin'], envFor(proxy.dir), JSON.stringify({ kid: 'k', private_key: broken }));
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('is not a valid PEM private key');
    for (const form of KEY_FORMS) expect(res.stderr).not.toContain(form);
  });

  it('no key material in the log, the audit log or anything the caller saw', async () => {
    const audit = await proxy.auditText();
    const everything = [proxy.logs(), audit, ...seenByCaller].join('\n');
    expect(audit).toContain('/tl/v3/payouts');
    for (const form of KEY_FORMS) expect(everything).not.toContain(form);
  });
});

describe('truelayer_signing in a route file', () => {
  const file = (inject: string) => `name: ex\nprefix: /ex\nupstream: https://ex.example\ncredential: ex\ninject:\n${inject}\n`;
  const problems = async (text: string) => {
    const result = await parseRouteText(text, '/x/ex.yaml', async () => '');
    return 'problems' in result ? result.problems.map(formatProblem) : [];
  };

  it('is strict, and must be the last injection', async () => {
    expect(await problems(file('  scheme: truelayer_signing\n  jku: https://x'))).toEqual([expect.stringMatching(/^\/x\/ex\.yaml:.*jku/)]);
    expect(await problems(file('  scheme: truelayer_signing\n  methods: [HEAD]'))).toHaveLength(1);
    expect(await problems(file('  scheme: truelayer_signing\n  signed_headers: [Idempotency-Key, idempotency-key]'))).toEqual([expect.stringContaining('listed twice')]);
    expect(await problems(file('  scheme: truelayer_signing\n  signed_headers: [Tl-Signature]'))).toEqual([expect.stringContaining('cannot sign itself')]);
    expect(await problems(file('  - scheme: truelayer_signing\n  - scheme: bearer'))).toEqual([expect.stringContaining('must be the last injection')]);
    expect(await problems(file('  - scheme: oauth2_client_credentials\n    token_url: https://auth.ex.example/connect/token\n  - scheme: truelayer_signing\n    kid: "{signing_kid}"\n    private_key: "{signing_key}"'))).toEqual([]);
  });

  it('routes schema describes it and routes explain says which methods it signs', async () => {
    const schema = await runCli(['routes', 'schema'], envFor(proxy.dir));
    expect(schema.code).toBe(0);
    expect(schema.stdout).toContain('"truelayer_signing"');
    expect(schema.stdout).toContain('"signed_headers"');
    const post = await runCli(['routes', 'explain', '--caller', 'svc', 'POST', '/pay/v3/payments'], envFor(proxy.dir));
    expect(post.code, post.stderr).toBe(0);
    expect(post.stdout).toContain('oauth2_client_credentials + truelayer_signing');
    expect(post.stdout).toMatch(/Tl-Signature \(ES512\) over POST, the path, Idempotency-Key and the body/);
    const get = await runCli(['routes', 'explain', '--caller', 'svc', 'GET', '/pay/v3/payments/p-1', '--json'], envFor(proxy.dir));
    expect(JSON.parse(get.stdout)).toMatchObject({ inject: 'oauth2_client_credentials + truelayer_signing', signing: ['GET is sent without Tl-Signature (truelayer_signing signs POST, PUT, PATCH, DELETE)'] });
  });
});
