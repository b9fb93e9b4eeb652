import { createHash, createHmac, generateKeyPairSync, randomBytes, verify, type KeyObject } from 'node:crypto';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatProblem, parseRouteText } from '../../src/config/load-routes.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * Request signers against an upstream that checks every signature with its own code, written here
 * from the providers' descriptions (shared/reference/providers.md), not with the proxy's: a request
 * is answered 200 only when it carries exactly the signature the provider would compute.
 */

const es256 = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const ed25519 = generateKeyPairSync('ed25519');
const ed25519Other = generateKeyPairSync('ed25519');
/** CDP's Ed25519 secret: base64 of the 32-byte seed followed by the 32-byte public key. */
const ed25519Jwk = ed25519.privateKey.export({ format: 'jwk' });
const cdpEd25519Secret = Buffer.concat([Buffer.from(ed25519Jwk.d!, 'base64url'), Buffer.from(ed25519Jwk.x!, 'base64url')]).toString('base64');

const CREDS = {
  'hmac-hdr': { key_id: 'kid-CANARY-1', secret: 'raw secret CANARY ü' },
  'hmac-qs': { api_key: 'mbx-key-CANARY', secret: randomBytes(32).toString('hex') },
  'hmac-b64': { key_id: 'k3', secret: randomBytes(64).toString('base64') },
  'hmac-bad': { secret: 'not base64 at all!' },
  snaptrade: { client_id: 'SNAP-CLIENT-1', consumer_key: 'consumer key/CANARY ä' },
  kraken: { api_key: 'kraken-key-CANARY', api_secret: randomBytes(64).toString('base64') },
  'cb-es256': { key_name: 'organizations/org-1/apiKeys/key-es', private_key: es256.privateKey.export({ type: 'sec1', format: 'pem' }) as string },
  'cb-eddsa': { key_name: 'organizations/org-1/apiKeys/key-ed', private_key: cdpEd25519Secret },
  'cb-eddsa-pem': { key_name: 'organizations/org-1/apiKeys/key-ed-pem', private_key: ed25519Other.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string },
  'cb-rotate': { key_name: 'organizations/org-1/apiKeys/key-rot', private_key: es256.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string },
  'cb-rsa': { key_name: 'organizations/org-1/apiKeys/key-rsa', private_key: generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }) as string },
};
const PUBLIC_KEYS = new Map<string, KeyObject>([
  [CREDS['cb-es256'].key_name, es256.publicKey],
  [CREDS['cb-eddsa'].key_name, ed25519.publicKey],
  [CREDS['cb-eddsa-pem'].key_name, ed25519Other.publicKey],
  [CREDS['cb-rotate'].key_name, es256.publicKey],
]);

const INJECT: Record<string, string> = {
  'hmac-hdr': `
  scheme: hmac
  key: "{secret}"
  string_to_sign: [method, path, query, body_sha256, timestamp]
  timestamp_header: X-Timestamp
  headers:
    X-Api-Key: "{key_id}"
  into: { header: X-Signature }`,
  // Binance-style: HMAC-SHA256 over query + body, hex key, ms timestamp and signature in the query.
  'hmac-qs': `
  scheme: hmac
  key: "{secret}"
  key_encoding: hex
  string_to_sign: [query, body]
  separator: ""
  timestamp: milliseconds
  timestamp_param: timestamp
  headers:
    X-MBX-APIKEY: "{api_key}"
  into: { query: signature }`,
  // Another injection first: the signer covers the query it added.
  'hmac-b64': `
  - scheme: query
    params:
      account: "{key_id}"
  - scheme: hmac
    key: "{secret}"
    key_encoding: base64
    algorithm: sha512
    string_to_sign: [{ literal: v1 }, method, path_and_query, nonce, body]
    separator: "|"
    nonce_header: X-Nonce
    output: base64
    into: { header: X-Sig }`,
  'hmac-bad': `
  scheme: hmac
  key: "{secret}"
  key_encoding: base64
  string_to_sign: [method, path]
  into: { header: X-Sig }`,
  snaptrade: '\n  scheme: snaptrade',
  kraken: '\n  scheme: kraken',
  'cb-es256': '\n  scheme: coinbase_jwt',
  'cb-eddsa': '\n  scheme: coinbase_jwt',
  'cb-eddsa-pem': '\n  scheme: coinbase_jwt',
  'cb-rotate': '\n  scheme: coinbase_jwt',
  'cb-rsa': '\n  scheme: coinbase_jwt',
};

interface Verdict {
  readonly ok: boolean;
  readonly why?: string;
}

const sha256hex = (data: Buffer | string) => createHash('sha256').update(data).digest('hex');
const nowSeconds = () => Date.now() / 1000;
const split = (url: string) => {
  const at = url.indexOf('?');
  return at === -1 ? { path: url, query: '' } : { path: url.slice(0, at), query: url.slice(at + 1) };
};
const single = (req: IncomingMessage, name: string) => req.rawHeaders.filter((_, i) => i % 2 === 0).filter((n) => n.toLowerCase() === name).length === 1;
const check = (conditions: Record<string, boolean>): Verdict => {
  const failed = Object.entries(conditions).filter(([, v]) => !v).map(([k]) => k);
  return failed.length === 0 ? { ok: true } : { ok: false, why: failed.join(', ') };
};

/** SnapTrade's canonical form, as the verifier computes it: a replacer that rebuilds every object with sorted keys. */
function sortedJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return v;
    const sorted: Record<string, unknown> = {};
    for (const k of Object.keys(v).sort()) sorted[k] = (v as Record<string, unknown>)[k];
    return sorted;
  });
}

const krakenNonces: bigint[] = [];

function verifyRequest(req: IncomingMessage, body: Buffer, port: number): Verdict {
  const h = req.headers;
  const { path, query } = split(req.url ?? '/');
  const route = path.split('/')[1] ?? '';
  switch (route) {
    case 'hmac-hdr': {
      const c = CREDS['hmac-hdr'];
      const ts = String(h['x-timestamp']);
      const expected = createHmac('sha256', c.secret).update([req.method, path, query, sha256hex(body), ts].join('\n')).digest('hex');
      return check({ key: h['x-api-key'] === c.key_id, signature: h['x-signature'] === expected, fresh: Math.abs(Number(ts) - nowSeconds()) < 5, once: single(req, 'x-signature') && single(req, 'x-timestamp') });
    }
    case 'hmac-qs': {
      const c = CREDS['hmac-qs'];
      const m = /^(.*)&signature=([0-9a-f]{64})$/.exec(query);
      if (!m) return { ok: false, why: 'no trailing signature' };
      const params = new URLSearchParams(m[1]);
      const expected = createHmac('sha256', Buffer.from(c.secret, 'hex')).update(m[1]! + body.toString('utf8')).digest('hex');
      return check({ key: h['x-mbx-apikey'] === c.api_key, signature: m[2] === expected, timestamp: params.getAll('timestamp').length === 1 && Math.abs(Number(params.get('timestamp')) - Date.now()) < 5000, forged: !m[1]!.includes('signature=') });
    }
    case 'hmac-b64': {
      const c = CREDS['hmac-b64'];
      const nonce = String(h['x-nonce']);
      const message = Buffer.concat([Buffer.from(['v1', req.method, req.url, nonce, ''].join('|')), body]);
      const expected = createHmac('sha512', Buffer.from(c.secret, 'base64')).update(message).digest('base64');
      return check({ signature: h['x-sig'] === expected, account: new URLSearchParams(query).get('account') === c.key_id, nonce: /^\d+$/.test(nonce) });
    }
    case 'snaptrade': {
      const c = CREDS.snaptrade;
      const params = new URLSearchParams(query);
      const text = body.toString('utf8');
      const content: unknown = text === '' || text === '{}' ? null : JSON.parse(text);
      const expected = createHmac('sha256', encodeURI(c.consumer_key)).update(sortedJson({ content, path, query })).digest('base64');
      return check({ signature: h.signature === expected, client: params.getAll('clientId').length === 1 && params.get('clientId') === c.client_id, fresh: params.getAll('timestamp').length === 1 && Math.abs(Number(params.get('timestamp')) - nowSeconds()) <= 2 });
    }
    case 'kraken':
    case 'kraken-preset': {
      const c = CREDS.kraken;
      const postdata = body.toString('utf8');
      const params = new URLSearchParams(postdata);
      const nonce = params.get('nonce') ?? '';
      const expected = createHmac('sha512', Buffer.from(c.api_secret, 'base64')).update(Buffer.concat([Buffer.from(path), createHash('sha256').update(nonce + postdata).digest()])).digest('base64');
      const verdict = check({ key: h['api-key'] === c.api_key, signature: h['api-sign'] === expected, nonce: params.getAll('nonce').length === 1 && /^\d+$/.test(nonce), form: h['content-type'] === 'application/x-www-form-urlencoded', 'user-agent': single(req, 'user-agent') });
      if (verdict.ok) krakenNonces.push(BigInt(nonce));
      return verdict;
    }
    case 'cb-es256':
    case 'cb-eddsa':
    case 'cb-eddsa-pem':
    case 'cb-rotate': {
      const auth = String(h.authorization);
      if (!auth.startsWith('Bearer ')) return { ok: false, why: 'no bearer' };
      const [h64, p64, s64] = auth.slice(7).split('.');
      const header = JSON.parse(Buffer.from(h64!, 'base64url').toString()) as { alg: string; kid: string; nonce: string; typ: string };
      const claims = JSON.parse(Buffer.from(p64!, 'base64url').toString()) as { sub: string; iss: string; nbf: number; exp: number; uri: string };
      const key = PUBLIC_KEYS.get(header.kid);
      const signature = Buffer.from(s64!, 'base64url');
      const signed = Buffer.from(`${h64}.${p64}`);
      const valid = key !== undefined && (header.alg === 'ES256'
        ? signature.length === 64 && verify('sha256', signed, { key, dsaEncoding: 'ieee-p1363' }, signature)
        : header.alg === 'EdDSA' && verify(null, signed, key, signature));
      lastJwt = { header, claims };
      return check({
        valid,
        alg: header.alg === (route === 'cb-es256' || route === 'cb-rotate' ? 'ES256' : 'EdDSA'),
        typ: header.typ === 'JWT',
        nonce: /^[0-9a-f]{16,}$/.test(header.nonce),
        sub: claims.sub === header.kid,
        iss: claims.iss === 'cdp',
        lifetime: claims.exp - claims.nbf === 120,
        fresh: Math.abs(claims.nbf - nowSeconds()) <= 2,
        uri: claims.uri === `${req.method} 127.0.0.1:${port}${path}`,
      });
    }
  }
  return { ok: false, why: `no verifier for ${route}` };
}

let lastJwt: { header: { nonce: string }; claims: { uri: string; nbf: number; exp: number } } | undefined;

function routeFile(name: string, upstreamUrl: string, credential = name): string {
  return `name: ${name}
prefix: /${name}
upstream: ${upstreamUrl}/${name}
allow_private_addresses: true
credential: ${credential}
inject:${INJECT[name]}
allow:
  - caller: svc
    methods: [GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS]
    paths: [/**]
`;
}

let upstream: Upstream;
let proxy: TestProxy;

beforeAll(async () => {
  upstream = await startUpstream((req, res, body) => {
    const verdict = verifyRequest(req, body, upstream.port);
    res.writeHead(verdict.ok ? 200 : 401, { 'content-type': 'application/json' });
    res.end(JSON.stringify(verdict));
  });
  proxy = await startTestProxy({
    routes: {
      ...Object.fromEntries(Object.keys(INJECT).map((name) => [name, routeFile(name, upstream.url)])),
      // The preset as a route file writes it: its inject, the upstream pointed here.
      'kraken-preset': `name: kraken-preset\npreset: kraken\nupstream: ${upstream.url}/kraken-preset\nallow_private_addresses: true\ncredential: kraken\nallow:\n  - caller: svc\n    methods: [POST]\n    paths: [/**]\n`,
    },
    credentials: CREDS,
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

async function call(path: string, init: RequestInit = {}, target: TestProxy = proxy): Promise<{ status: number; body: Verdict & { error?: { code: string } } }> {
  const res = await fetch(`${target.url}${path}`, { ...init, headers: { 'x-egress-token': target.tokens.svc ?? tokens.svc!, ...(init.headers as Record<string, string>) } });
  return { status: res.status, body: (await res.json()) as Verdict & { error?: { code: string } } };
}
let tokens: Record<string, string> = {};

describe('hmac: a declared signature, checked by an independent verifier', () => {
  it('header signature: sha256, raw key, hex, over method, path, query, body hash and timestamp', async () => {
    const res = await call('/hmac-hdr/v1/orders?b=2&a=1%20x', { method: 'POST', headers: { 'x-signature': 'forged', 'x-timestamp': '1' }, body: '{"qty":1}' });
    expect(res.body).toEqual({ ok: true });
    const get = await call('/hmac-hdr/v1/orders');
    expect(get.body).toEqual({ ok: true });
  });

  it('query signature: hex key, millisecond timestamp parameter, signature appended last (Binance style)', async () => {
    const res = await call('/hmac-qs/api/v3/order?symbol=BTCUSDT&timestamp=1&signature=forged', { method: 'POST', body: 'quantity=1&price=2' });
    expect(res.body).toEqual({ ok: true });
    const sent = upstream.requests.at(-1)!.url;
    expect(sent).toMatch(/^\/hmac-qs\/api\/v3\/order\?symbol=BTCUSDT&timestamp=\d{13}&signature=[0-9a-f]{64}$/);
    expect((await call('/hmac-qs/api/v3/account')).body).toEqual({ ok: true });
  });

  it('base64 key, sha512, base64 output, literal and nonce parts, signing after an earlier injection', async () => {
    const first = await call('/hmac-b64/orders?x=1', { method: 'POST', body: 'raw body bytes' });
    expect(first.body).toEqual({ ok: true });
    const second = await call('/hmac-b64/orders?x=1', { method: 'DELETE' });
    expect(second.body).toEqual({ ok: true });
    const [a, b] = upstream.requests.slice(-2).map((r) => BigInt(String(r.headers['x-nonce'])));
    expect(b! > a!).toBe(true);
    expect(upstream.requests.at(-1)!.url).toBe('/hmac-b64/orders?x=1&account=k3');
  });

  it('a key that is not what key_encoding says refuses the request with 503, nothing sent', async () => {
    const before = upstream.requests.length;
    const res = await call('/hmac-bad/x');
    expect(res.status).toBe(503);
    expect(res.body.error?.code).toBe('credential_unavailable');
    expect(upstream.requests.length).toBe(before);
  });
});

describe('snaptrade: clientId + timestamp, canonical JSON HMAC-SHA256', () => {
  it('GET with the caller\'s userId and userSecret: signed as sent, caller copies of ours removed', async () => {
    const res = await call('/snaptrade/accounts?userId=u-1&userSecret=s%2Fecret&clientId=evil&timestamp=1', { headers: { signature: 'forged' } });
    expect(res.body).toEqual({ ok: true });
    const sent = upstream.requests.at(-1)!;
    expect(sent.url).toMatch(/^\/snaptrade\/accounts\?userId=u-1&userSecret=s%2Fecret&clientId=SNAP-CLIENT-1&timestamp=\d+$/);
    expect(sent.headers.signature).not.toBe('forged');
  });

  it('POST with a nested JSON body: keys sorted at every level, unicode kept', async () => {
    const body = JSON.stringify({ zeta: 1, alpha: { y: [{ b: 2, a: 'ü' }], x: null }, mid: [3, 'two', true] });
    const res = await call('/snaptrade/trade/place?userId=u-1', { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    expect(res.body).toEqual({ ok: true });
    expect(upstream.requests.at(-1)!.body.toString()).toBe(body);
  });

  it('an empty body and "{}" both sign content null', async () => {
    expect((await call('/snaptrade/snapTrade/registerUser', { method: 'POST', body: '{}' })).body).toEqual({ ok: true });
    expect((await call('/snaptrade/snapTrade/listUsers', { method: 'POST' })).body).toEqual({ ok: true });
  });

  it('a body that is not JSON is refused with 400', async () => {
    const res = await call('/snaptrade/x', { method: 'POST', body: 'not json' });
    expect(res.status).toBe(400);
  });

  it('a body that is not UTF-8 is refused with 400, nothing sent: its signature would cover other characters than the bytes sent', async () => {
    const before = upstream.requests.length;
    // "café" in Latin-1: the 0xE9 byte is no UTF-8, and decoding it leniently would sign U+FFFD instead.
    const res = await call('/snaptrade/trade/place?userId=u-1', { method: 'POST', headers: { 'content-type': 'application/json' }, body: Buffer.from('{"memo":"caf\u00e9"}', 'latin1') });
    expect(res.status).toBe(400);
    expect(res.body.error?.code).toBe('bad_request');
    expect(upstream.requests.length).toBe(before);
  });
});

describe('kraken: API-Sign over path + SHA256(nonce + POST data)', () => {
  const form = { 'content-type': 'application/x-www-form-urlencoded' };

  it('adds the nonce to the form body and signs exactly what is sent', async () => {
    const res = await call('/kraken/0/private/Balance', { method: 'POST', headers: { ...form, 'api-sign': 'forged' }, body: 'asset=XBT' });
    expect(res.body).toEqual({ ok: true });
    expect(upstream.requests.at(-1)!.body.toString()).toMatch(/^asset=XBT&nonce=\d+$/);
  });

  it('replaces a caller\'s nonce in place and drops repeats; an empty body gets just the nonce', async () => {
    expect((await call('/kraken/0/private/AddOrder', { method: 'POST', headers: form, body: 'nonce=1&pair=XBTUSD&nonce=2' })).body).toEqual({ ok: true });
    expect(upstream.requests.at(-1)!.body.toString()).toMatch(/^nonce=\d+&pair=XBTUSD$/);
    expect(upstream.requests.at(-1)!.body.toString()).not.toMatch(/^nonce=1&/);
    expect((await call('/kraken/0/private/Balance', { method: 'POST' })).body).toEqual({ ok: true });
    expect(upstream.requests.at(-1)!.body.toString()).toMatch(/^nonce=\d+$/);
  });

  it('refuses a body that is not a form with 400, nothing sent', async () => {
    const before = upstream.requests.length;
    const res = await call('/kraken/0/private/Balance', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"nonce":1}' });
    expect(res.status).toBe(400);
    expect(upstream.requests.length).toBe(before);
  });

  // The nonce goes in the form body and API-Sign covers the POST data (providers.md, Kraken):
  // a GET or HEAD cannot carry it, and one sent with a body is malformed for many servers.
  it('refuses GET and HEAD with 400, nothing sent', async () => {
    const before = upstream.requests.length;
    const get = await call('/kraken/0/private/Balance');
    expect(get.status).toBe(400);
    expect(get.body.error?.code).toBe('bad_request');
    const head = await fetch(`${proxy.url}/kraken/0/private/Balance`, { method: 'HEAD', headers: { 'x-egress-token': proxy.tokens.svc! } });
    expect(head.status).toBe(400);
    expect(head.headers.get('x-egress-error')).toBe('bad_request');
    expect(upstream.requests.length).toBe(before);
  });

  // The nonce is added to the form as text: appended to compressed bytes it would corrupt the body
  // and be signed that way.
  it('refuses a form body with a Content-Encoding with 400, nothing sent', async () => {
    const before = upstream.requests.length;
    const res = await call('/kraken/0/private/AddOrder', { method: 'POST', headers: { ...form, 'content-encoding': 'gzip' }, body: gzipSync('pair=XBTUSD&type=buy') });
    expect(res.status).toBe(400);
    expect(res.body.error?.code).toBe('bad_request');
    expect(JSON.stringify(res.body)).toContain('Content-Encoding');
    expect(upstream.requests.length).toBe(before);
    // "identity" is no encoding.
    expect((await call('/kraken/0/private/Balance', { method: 'POST', headers: { ...form, 'content-encoding': 'identity' }, body: 'asset=XBT' })).body).toEqual({ ok: true });
  });

  // Kraken's private REST endpoints are POST only: any other method is refused, not signed with a form body.
  it('refuses PUT, PATCH, DELETE and OPTIONS with 400 naming POST, nothing sent', async () => {
    const before = upstream.requests.length;
    for (const method of ['PUT', 'PATCH', 'DELETE', 'OPTIONS']) {
      const res = await call('/kraken/0/private/CancelOrder', { method, headers: form, body: 'txid=OABC' });
      expect(res.status, method).toBe(400);
      expect(res.body.error?.code).toBe('bad_request');
      expect(JSON.stringify(res.body)).toContain('POST');
    }
    expect(upstream.requests.length).toBe(before);
  });

  it('50 concurrent requests: 50 distinct nonces, all above the one before and below the one after', async () => {
    await call('/kraken/0/private/Balance', { method: 'POST', headers: form, body: '' });
    const before = krakenNonces.at(-1)!;
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) => call('/kraken/0/private/Balance', { method: 'POST', headers: form, body: `i=${i}` })));
    expect(results.map((r) => r.body.ok)).toEqual(Array(50).fill(true));
    const batch = krakenNonces.slice(-50);
    expect(new Set(batch).size).toBe(50);
    expect(batch.every((n) => n > before)).toBe(true);
    await call('/kraken/0/private/Balance', { method: 'POST', headers: form, body: '' });
    expect(batch.every((n) => n < krakenNonces.at(-1)!)).toBe(true);
  });

  // Kraken's private API requires a User-Agent (providers.md, Kraken). fetch always sends one;
  // node:http sends none unless told to, as many clients do.
  it('a request without a User-Agent goes upstream with User-Agent: egress-proxy, on the scheme and the preset; a caller\'s own is kept as it came', async () => {
    const post = (path: string, headers: Record<string, string>) => new Promise<{ status: number; body: Verdict }>((resolve, reject) => {
      const body = 'asset=XBT';
      const req = httpRequest(`${proxy.url}${path}`, { method: 'POST', headers: { 'x-egress-token': proxy.tokens.svc!, 'content-length': String(body.length), ...form, ...headers } }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode!, body: JSON.parse(Buffer.concat(chunks).toString()) as Verdict }));
      });
      req.on('error', reject);
      req.end(body);
    });
    const agents = () => upstream.requests.at(-1)!.rawHeaders.filter((_, i, all) => i % 2 === 1 && all[i - 1]!.toLowerCase() === 'user-agent');
    for (const path of ['/kraken/0/private/Balance', '/kraken-preset/0/private/Balance']) {
      const bare = await post(path, {});
      expect(bare.body, path).toEqual({ ok: true });
      expect(agents(), path).toEqual(['egress-proxy']);
      const own = await post(path, { 'user-agent': 'my-bot/2.1 (+https://example.com)' });
      expect(own.body, path).toEqual({ ok: true });
      expect(agents(), path).toEqual(['my-bot/2.1 (+https://example.com)']);
    }
  });

  it('sequential requests see strictly increasing nonces', async () => {
    const start = krakenNonces.length;
    for (let i = 0; i < 20; i++) await call('/kraken/0/private/Balance', { method: 'POST', headers: form, body: '' });
    const seen = krakenNonces.slice(start);
    expect(seen).toHaveLength(20);
    for (let i = 1; i < seen.length; i++) expect(seen[i]! > seen[i - 1]!).toBe(true);
  });
});

describe('kraken: two proxies sharing one Redis keep one nonce sequence per key', () => {
  let redis: TestRedis;
  let a: TestProxy;
  let b: TestProxy;

  beforeAll(async () => {
    redis = await TestRedis.create();
    const dir = await makeTempDir('egress-kraken-');
    ({ tokens } = await seedDataDir(dir, { routes: { kraken: routeFile('kraken', upstream.url) }, credentials: { kraken: CREDS.kraken }, callers: ['svc'], store: redis.url }));
    a = await startTestProxy({ routes: {}, dir, store: redis.url });
    b = await startTestProxy({ routes: {}, dir, store: redis.url });
  });

  afterAll(async () => {
    await a?.close();
    await b?.close();
    await redis?.destroy();
  });

  it('50 concurrent requests split over both instances: 50 distinct nonces', async () => {
    const start = krakenNonces.length;
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) => call('/kraken/0/private/Balance', { method: 'POST', body: new URLSearchParams({ i: String(i) }) }, i % 2 === 0 ? a : b)));
    expect(results.map((r) => r.body.ok)).toEqual(Array(50).fill(true));
    expect(new Set(krakenNonces.slice(start)).size).toBe(50);
  });

  it('alternating instances, one after another: strictly increasing', async () => {
    const start = krakenNonces.length;
    for (let i = 0; i < 20; i++) await call('/kraken/0/private/Balance', { method: 'POST', body: new URLSearchParams() }, i % 2 === 0 ? a : b);
    const seen = krakenNonces.slice(start);
    expect(seen).toHaveLength(20);
    for (let i = 1; i < seen.length; i++) expect(seen[i]! > seen[i - 1]!).toBe(true);
  });
});

describe('coinbase_jwt: a new JWT per request, verified with node:crypto', () => {
  it('ES256 from a SEC1 PEM key: raw r||s signature, uri is "METHOD host path" without the query', async () => {
    const res = await call('/cb-es256/api/v3/brokerage/accounts?limit=5', { headers: { authorization: 'Bearer forged' } });
    expect(res.body).toEqual({ ok: true });
    expect(lastJwt!.claims.uri).toBe(`GET 127.0.0.1:${upstream.port}/cb-es256/api/v3/brokerage/accounts`);
    expect(lastJwt!.claims.exp - lastJwt!.claims.nbf).toBe(120);
  });

  it('EdDSA from CDP\'s base64 seed + public key, and from a PKCS#8 PEM', async () => {
    expect((await call('/cb-eddsa/api/v3/brokerage/orders', { method: 'POST', body: '{}' })).body).toEqual({ ok: true });
    expect(lastJwt!.claims.uri).toBe(`POST 127.0.0.1:${upstream.port}/cb-eddsa/api/v3/brokerage/orders`);
    expect((await call('/cb-eddsa-pem/api/v3/brokerage/accounts')).body).toEqual({ ok: true });
  });

  it('every request gets its own token and nonce', async () => {
    await call('/cb-es256/api/v3/brokerage/accounts');
    const first = upstream.requests.at(-1)!.headers.authorization;
    const firstNonce = lastJwt!.header.nonce;
    await call('/cb-es256/api/v3/brokerage/accounts');
    expect(upstream.requests.at(-1)!.headers.authorization).not.toBe(first);
    expect(lastJwt!.header.nonce).not.toBe(firstNonce);
  });

  // The parsed key is kept with the opened version: a new version under the same key name must
  // sign with its own key from its first request, and the old key must not sign again.
  it('rotation: a new private key under the same key name signs the next request', async () => {
    expect((await call('/cb-rotate/api/v3/brokerage/accounts')).body).toEqual({ ok: true });
    const next = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const rotate = await runCli(['keys', 'rotate', 'cb-rotate', '--from-stdin'], envFor(proxy.dir), JSON.stringify({ ...CREDS['cb-rotate'], private_key: next.privateKey.export({ type: 'pkcs8', format: 'pem' }) }));
    expect(rotate.code, rotate.stderr).toBe(0);
    PUBLIC_KEYS.set(CREDS['cb-rotate'].key_name, next.publicKey);
    let last: Verdict | undefined;
    await eventually(async () => {
      last = (await call('/cb-rotate/api/v3/brokerage/accounts')).body;
      return last.ok;
    }, 3_000, 'the new key in use');
    for (let i = 0; i < 3; i++) expect((await call('/cb-rotate/api/v3/brokerage/accounts')).body).toEqual({ ok: true });
  });

  it('a key that is neither P-256 nor Ed25519 refuses the request with 503, nothing sent', async () => {
    const before = upstream.requests.length;
    const res = await call('/cb-rsa/api/v3/brokerage/accounts');
    expect(res.status).toBe(503);
    expect(upstream.requests.length).toBe(before);
  });
});

describe('signers in a route file', () => {
  const file = (inject: string) => `name: ex\nprefix: /ex\nupstream: https://ex.example\ncredential: ex\ninject:\n${inject}\n`;
  const problems = async (text: string) => {
    const result = await parseRouteText(text, '/x/ex.yaml', async () => '');
    return 'problems' in result ? result.problems.map(formatProblem) : [];
  };

  it('a signer must be the last injection, with file:line:col', async () => {
    expect(await problems(file('  - scheme: kraken\n  - scheme: bearer'))).toEqual([expect.stringMatching(/^\/x\/ex\.yaml:6:5: inject\.0: "kraken" signs the request as sent, so it must be the last/)]);
    expect(await problems(file('  - scheme: bearer\n  - scheme: snaptrade'))).toEqual([]);
    expect(await problems(file('  - scheme: coinbase_jwt\n  - scheme: snaptrade'))).toHaveLength(1);
  });

  it('hmac: a signed timestamp or nonce must be sent too; names must not collide', async () => {
    const hmac = (extra: string) => file(`  scheme: hmac\n  key: "{k}"\n  into: { header: X-Sig }\n${extra}`);
    expect((await problems(hmac('  string_to_sign: [timestamp]')))[0]).toContain('timestamp_header or timestamp_param');
    expect((await problems(hmac('  string_to_sign: [nonce]')))[0]).toContain('nonce_header or nonce_param');
    expect((await problems(hmac('  string_to_sign: [method]\n  timestamp_header: x-sig')))[0]).toContain('different headers');
    expect((await problems(hmac('  string_to_sign: [method, {literal: x}]\n  key_encoding: base32')))[0]).toContain('key_encoding');
    expect(await problems(hmac('  string_to_sign: [method, { literal: "GET" }, body_sha512]'))).toEqual([]);
  });
});
