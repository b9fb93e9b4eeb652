import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * Credential injection probes (CRED-INJ): what each scheme sends must be exactly what the caller
 * sent plus the credential, and a credential that cannot be sent as the provider expects is refused.
 * The upstream checks everything with its own code.
 */
let upstream: Upstream;
let proxy: TestProxy;
const mints: { client: string; token: string }[] = [];
let counter = 0;

const CREDS = {
  plaidbody: { client_id: 'client-456', secret: 'body_secret_CANARY_555' },
  colon: { username: 'user:with-colon', password: 'pw_CANARY_666' },
  tl: { client_id: 'client-1', client_secret: 'cs_CANARY_eu', us_client_id: 'client-2', us_client_secret: 'cs_CANARY_us' },
  refused: { client_id: 'client-1', client_secret: 'cs_CANARY_wrong' },
  opaque: { client_id: 'client-9', client_secret: 'cs_CANARY_opaque' },
  keyed: { key: 'qk_CANARY_1010' },
  nulltoken: { client_id: 'client-null', client_secret: 'cs_CANARY_null' },
  snap: { client_id: 'snap-client', consumer_key: 'ck_CANARY_snap' },
  crlf: { client_id: 'client-crlf', client_secret: 'cs_CANARY_crlf' },
  slow: { client_id: 'client-slow', client_secret: 'cs_CANARY_slow' },
  two: { client_id: 'client-two', client_secret: 'cs_CANARY_two' },
  kraken: { api_key: 'kraken-key', api_secret: Buffer.from('kraken_CANARY_secret_bytes').toString('base64') },
};

function route(name: string, inject: string, extra = ''): string {
  return `name: ${name}
prefix: /${name}
upstream: ${upstream.url}
allow_private_addresses: true
credential: ${name.replace(/-.*/, '')}
inject:
${inject}
${extra}allow:
  - caller: svc
    methods: [GET, HEAD, POST]
    paths: [/check, /accounts, /echo-auth]
`;
}

const oauth = (id: string, secret: string) => `  scheme: oauth2_client_credentials
  token_url: ${upstream.url}/connect/token
  client_id: "${id}"
  client_secret: "${secret}"`;

beforeAll(async () => {
  upstream = await startUpstream((req, res, body) => {
    const json = (status: number, doc: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(doc));
    };
    if (req.url === '/connect/token') {
      const [user, pass] = Buffer.from(String(req.headers.authorization ?? '').replace(/^Basic /, ''), 'base64').toString().split(':').map(decodeURIComponent);
      const known: Record<string, string> = { 'client-1': 'cs_CANARY_eu', 'client-2': 'cs_CANARY_us' };
      if (!user || known[user] !== pass) return json(401, { error: 'invalid_client', error_description: `bad secret ${pass}` });
      const token = `at_${user}_${++counter}`;
      mints.push({ client: user, token });
      return json(200, { access_token: token, token_type: 'Bearer', expires_in: 3600 });
    }
    if (req.url === '/connect/token-huge') {
      const token = `at_huge_${++counter}`;
      mints.push({ client: 'huge', token });
      // A lifetime no token has: 1e308 seconds.
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(`{"access_token":"${token}","token_type":"Bearer","expires_in":1e308}`);
    }
    if (req.url === '/connect/token-opaque') {
      // An opaque token (not a JWT) with "/" and "+", as many authorization servers hand out.
      const token = `at/CANARY+opaque_${++counter}==`;
      mints.push({ client: 'opaque', token });
      return json(200, { access_token: token, token_type: 'Bearer', expires_in: 3600 });
    }
    if (req.url === '/connect/token-crlf') {
      // The first answer carries a token no header can hold; the endpoint answers properly after.
      const n = ++counter;
      const token = mints.some((m) => m.client === 'crlf') ? `at_crlf_good_${n}` : `at_CANARY_crlf_${n}\r\nX-Injected: yes`;
      mints.push({ client: 'crlf', token });
      return json(200, { access_token: token, token_type: 'Bearer', expires_in: 3600 });
    }
    if (req.url === '/connect/token-gc') {
      // GoCardless style: a short-lived access token and a refresh token, in a JSON answer.
      return json(200, { access: `at_gc_${++counter}`, access_expires: 1, refresh: 'rt_CANARY_1', refresh_expires: 600 });
    }
    if (req.url === '/connect/token-two') {
      // One answer, two tokens: which one a route sends is its token_field.
      const n = ++counter;
      mints.push({ client: 'two-access', token: `at_two_${n}` }, { client: 'two-other', token: `ot_two_${n}` });
      return json(200, { access_token: `at_two_${n}`, other_token: `ot_two_${n}`, token_type: 'Bearer', expires_in: 3600 });
    }
    if (req.url === '/connect/token-null') {
      // JSON, but not an object.
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end('null');
    }
    if (req.url === '/connect/token-slow') {
      // A token endpoint that answers at once and then trickles its body, a byte at a time, well
      // inside any per-read timeout: the answer never ends.
      mints.push({ client: 'slow', token: '' });
      res.writeHead(200, { 'content-type': 'application/json' });
      res.write('{"access_token":"');
      const drip = setInterval(() => res.write('a'), 200);
      res.on('close', () => clearInterval(drip));
      return;
    }
    if (req.url === '/echo-auth') {
      // An upstream quoting what it got, as a PHP backend writes JSON ("/" as "\/"), and a
      // redirect carrying it percent-encoded in the Location's query.
      const auth = String(req.headers.authorization ?? req.headers['api-sign'] ?? '').replace(/^Bearer /, '');
      res.writeHead(302, { location: `/login?from=${encodeURIComponent(auth)}`, 'content-type': 'application/json' });
      return res.end(JSON.stringify({ error: 'session expired', got: auth }).replaceAll('/', '\\/'));
    }
    if (req.url === '/accounts') {
      const bearer = String(req.headers.authorization ?? '').replace(/^Bearer /, '');
      return json(200, { client: mints.find((m) => m.token === bearer)?.client ?? null });
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    res.end(body);
  });
  proxy = await startTestProxy({
    routes: {
      plaidbody: route('plaidbody', '  scheme: json_body\n  fields:\n    client_id: "{client_id}"\n    secret: "{secret}"'),
      colon: route('colon', '  scheme: basic'),
      'tl-eu': route('tl-eu', oauth('{client_id}', '{client_secret}')),
      'tl-us': route('tl-us', oauth('{us_client_id}', '{us_client_secret}')),
      refused: route('refused', oauth('{client_id}', '{client_secret}')),
      opaque: route('opaque', `  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/connect/token-opaque`),
      kraken: route('kraken', '  scheme: kraken'),
      slow: route('slow', `  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/connect/token-slow`, 'timeouts: { response: 1s }\n'),
      crlf: route('crlf', `  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/connect/token-crlf`),
      nulltoken: route('nulltoken', `  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/connect/token-null`),
      snap: route('snap', '  scheme: snaptrade'),
      keyed: route('keyed', '  scheme: query\n  params:\n    api_key: "{key}"'),
      'two-a': route('two-a', `  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/connect/token-two`),
      'two-b': route('two-b', `  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/connect/token-two\n  token_field: other_token`),
      plaidpre: `name: plaidpre\npreset: plaid\nupstream: ${upstream.url}\nallow_private_addresses: true\ncredential: plaidbody\nallow:\n  - caller: svc\n    methods: [POST]\n    paths: [/check]\n`,
    },
    credentials: CREDS,
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

function call(path: string, init: RequestInit = {}): Promise<Response> {
  return fetch(`${proxy.url}${path}`, { ...init, headers: { 'x-egress-token': proxy.tokens.svc!, ...(init.headers as Record<string, string>) } });
}

describe('CRED-INJ', () => {
  it('CRED-INJ-01 json_body keeps the caller\'s numbers as written: 64-bit ids and decimals are not rounded by re-serialisation', async () => {
    const sent = '{"account_id":12345678901234567890,"amount":10.10,"rate":1e-7,"big":-9007199254740993}';
    const res = await call('/plaidbody/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: sent });
    expect(res.status).toBe(200);
    const got = await res.text();
    expect(got).toContain('"account_id":12345678901234567890');
    expect(got).toContain('"amount":10.10');
    expect(got).toContain('"rate":1e-7');
    expect(got).toContain('"big":-9007199254740993');
    const parsed = JSON.parse(got) as Record<string, unknown>;
    expect(parsed.secret).toBe(CREDS.plaidbody.secret);
    expect(parsed.client_id).toBe(CREDS.plaidbody.client_id);
  });

  it('CRED-INJ-06 json_body refuses a body that is not UTF-8 (400, nothing sent) instead of sending it on with U+FFFD in place', async () => {
    const before = upstream.requests.length;
    const latin1 = Buffer.concat([Buffer.from('{"name":"caf'), Buffer.from([0xe9]), Buffer.from('"}')]);
    const res = await call('/plaidbody/check', { method: 'POST', headers: { 'content-type': 'application/json; charset=iso-8859-1' }, body: latin1 });
    expect(res.status).toBe(400);
    expect(res.headers.get('x-egress-error')).toBe('bad_request');
    expect(upstream.requests.length).toBe(before);
    const ok = await call('/plaidbody/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: Buffer.from('{"name":"café ☕"}', 'utf8') });
    expect(ok.status).toBe(200);
    expect((JSON.parse(await ok.text()) as { name: string }).name).toBe('café ☕');
  });

  it('CRED-INJ-08 json_body: caller copies of the proxy fields in another case are dropped, so a case-insensitive decoder cannot pick the caller value', async () => {
    const res = await call('/plaidbody/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"secret":"x","SECRET":"mine","client_id":"c","Client_ID":"evil","access_token":"a"}' });
    expect(res.status).toBe(200);
    const parsed = JSON.parse(await res.text()) as Record<string, unknown>;
    // As Go's encoding/json reads it: the last key matching without regard to case wins.
    const goRead = (field: string) => Object.entries(parsed).filter(([k]) => k.toLowerCase() === field).at(-1)?.[1];
    expect(goRead('secret')).toBe(CREDS.plaidbody.secret);
    expect(goRead('client_id')).toBe(CREDS.plaidbody.client_id);
    expect(Object.keys(parsed).filter((k) => ['secret', 'client_id'].includes(k.toLowerCase()))).toEqual(['client_id', 'secret']);
    expect(parsed.access_token).toBe('a');
  });

  it('CRED-INJ-02 basic auth with ":" in the user-id (RFC 7617 §2 forbids it) is refused with 503, nothing sent', async () => {
    const before = upstream.requests.length;
    const res = await call('/colon/check');
    expect(res.status).toBe(503);
    expect(res.headers.get('x-egress-error')).toBe('credential_unavailable');
    const text = await res.text();
    expect(text).not.toContain('CANARY');
    expect(text).not.toContain('user:with-colon');
    expect(upstream.requests.length).toBe(before);
  });

  it('CRED-INJ-03 two routes minting from one credential and one token endpoint with different client fields get their own tokens', async () => {
    const eu = await (await call('/tl-eu/accounts')).json() as { client: string };
    const us = await (await call('/tl-us/accounts')).json() as { client: string };
    expect(eu.client).toBe('client-1');
    expect(us.client).toBe('client-2');
  });

  it('CRED-INJ-04 a token endpoint refusing the client (no previous version) is 503 credential_unavailable with an alert, its error text never relayed', async () => {
    const res = await call('/refused/accounts');
    expect(res.status).toBe(503);
    expect(res.headers.get('x-egress-error')).toBe('credential_unavailable');
    const text = await res.text();
    expect(text).not.toContain('CANARY');
    expect(proxy.logs()).not.toContain('cs_CANARY_wrong');
    // Ops hear about it as they do for an API's rejection: the upstream refused the credential.
    expect(proxy.logs()).toContain('upstream_rejected_credential');
  });
});

describe('CRED-INJ derived values', () => {
  it('CRED-INJ-09 a minted token or a signature echoed JSON-escaped or percent-encoded in a redirect is redacted, not only its raw form', async () => {
    const res = await call('/opaque/echo-auth', { redirect: 'manual' });
    expect(res.status).toBe(302);
    const token = mints.filter((m) => m.client === 'opaque').at(-1)!.token;
    const location = res.headers.get('location') ?? '';
    const body = await res.text();
    expect(upstream.requests.at(-1)!.headers.authorization).toBe(`Bearer ${token}`);
    for (const text of [location, body]) {
      expect(text).not.toContain('CANARY');
      expect(text).toContain('[REDACTED]');
    }
    // Kraken's API-Sign is base64: "/" and "+" in nearly every signature.
    const signed = await call('/kraken/echo-auth', { method: 'POST', redirect: 'manual', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: 'pair=XBTUSD' });
    expect(signed.status).toBe(302);
    const sign = String(upstream.requests.at(-1)!.headers['api-sign']);
    const forms = [encodeURIComponent(sign), JSON.stringify(sign).slice(1, -1).replaceAll('/', '\\/')];
    const seen = `${signed.headers.get('location') ?? ''}\n${await signed.text()}`;
    for (const form of forms) expect(seen.toLowerCase()).not.toContain(form.toLowerCase());
  });
});

describe('CRED-INJ oauth2 token endpoint', () => {
  it('CRED-INJ-11 a token endpoint that trickles its answer is given up at the route deadline (503), not waited on for good', async () => {
    const before = upstream.requests.filter((r) => r.url === '/accounts').length;
    const started = Date.now();
    const res = await call('/slow/accounts', { signal: AbortSignal.timeout(8_000) });
    expect(res.status).toBe(503);
    expect(res.headers.get('x-egress-error')).toBe('credential_unavailable');
    expect(Date.now() - started).toBeLessThan(4_000);
    expect(upstream.requests.filter((r) => r.url === '/accounts').length).toBe(before);
  });
});

describe('CRED-INJ oauth2 token shape', () => {
  it('CRED-INJ-12 a minted token that cannot be a header value (CR LF) is refused (503) and not kept: the next request after the hold-off mints afresh', async () => {
    const before = upstream.requests.filter((r) => r.url === '/accounts').length;
    const refused = await call('/crlf/accounts');
    expect(refused.status).toBe(503);
    expect(refused.headers.get('x-egress-error')).toBe('credential_unavailable');
    expect(await refused.text()).not.toContain('CANARY');
    expect(upstream.requests.filter((r) => r.url === '/accounts').length).toBe(before);
    // A failed mint holds the token endpoint off for a second (TokenBroker).
    await new Promise((r) => setTimeout(r, 1_100));
    const ok = await call('/crlf/accounts');
    expect(ok.status).toBe(200);
    expect(mints.filter((m) => m.client === 'crlf')).toHaveLength(2);
    expect(upstream.requests.at(-1)!.headers.authorization).toBe(`Bearer ${mints.filter((m) => m.client === 'crlf')[1]!.token}`);
    expect(proxy.logs()).not.toContain('at_CANARY_crlf');
  });
});

describe('CRED-INJ oauth2 refresh endpoint on its own origin', () => {
  let refresher: Upstream | undefined;
  let own: TestProxy | undefined;
  afterAll(async () => {
    await own?.close();
    await refresher?.close();
  });

  it('CRED-INJ-13 a refresh_url on another origin than token_url gets the refresh token; the token endpoint\'s host never does', async () => {
    let n = 0;
    refresher = await startUpstream((req, res, body) => {
      const doc = JSON.parse(body.toString()) as { refresh?: string };
      res.writeHead(doc.refresh === 'rt_CANARY_1' ? 200 : 401, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ access: `at_refreshed_${++n}`, access_expires: 3600 }));
    });
    const gc = `  scheme: oauth2_client_credentials
  token_url: ${upstream.url}/connect/token-gc
  refresh_url: ${refresher.url}/token/refresh/
  client_auth: json
  token_field: access
  expires_field: access_expires
  refresh_field: refresh
  refresh_expires_field: refresh_expires`;
    own = await startTestProxy({ routes: { gc: route('gc', gc) }, credentials: { gc: { client_id: 'gc-id', client_secret: 'gc_CANARY_secret' } }, callers: ['svc'] });
    const get = () => fetch(`${own!.url}/gc/accounts`, { headers: { 'x-egress-token': own!.tokens.svc! } });
    expect((await get()).status).toBe(200);
    const mark = upstream.requests.length;
    await new Promise((r) => setTimeout(r, 1_200));
    expect((await get()).status).toBe(200);
    expect(refresher.requests.map((r) => r.url)).toEqual(['/token/refresh/']);
    expect(upstream.requests.slice(mark).map((r) => r.url)).not.toContain('/token/refresh/');
    expect(upstream.requests.at(-1)!.headers.authorization).toBe('Bearer at_refreshed_1');
  });
});

describe('CRED-INJ oauth2 routes reading other fields of one token answer', () => {
  it('CRED-INJ-18 two routes on one credential and token endpoint with different token_field send their own token, not one cached token', async () => {
    const clientOf = async (path: string) => ((await (await call(path)).json()) as { client: string | null }).client;
    expect(await clientOf('/two-a/accounts')).toBe('two-access');
    expect(await clientOf('/two-b/accounts')).toBe('two-other');
    expect(await clientOf('/two-a/accounts')).toBe('two-access');
  });
});

describe('CRED-INJ answers and bodies of the wrong shape', () => {
  it('CRED-INJ-15 a token endpoint answering JSON that is not an object (null) is 503 credential_unavailable, not a 500', async () => {
    const res = await call('/nulltoken/accounts');
    expect(res.status).toBe(503);
    expect(res.headers.get('x-egress-error')).toBe('credential_unavailable');
  });

  it('CRED-INJ-16 a SnapTrade JSON body nested too deeply to sign is refused with 400 (nothing sent), not a 500', async () => {
    const before = upstream.requests.length;
    const depth = 200_000;
    const res = await call('/snap/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: `{"a":${'['.repeat(depth)}${']'.repeat(depth)}}` });
    expect(res.status).toBe(400);
    expect(res.headers.get('x-egress-error')).toBe('bad_request');
    expect(upstream.requests.length).toBe(before);
    expect((await call('/snap/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"a":[[1]]}' })).status).toBe(200);
  });
});

describe('CRED-INJ the plaid preset and a caller\'s body credentials', () => {
  it('CRED-INJ-17 client_id and secret a caller puts in the body (any case, escaped, repeated) are removed; the rest of the body is sent as written; a body that is not a JSON object is 400', async () => {
    // Plaid takes client_id and secret from the headers or the body (providers.md): a caller's body
    // copy could be read instead of the proxy's headers, and a wrong one would look like the key
    // being rejected (a fallback to the previous key, a critical alert).
    const before = upstream.requests.length;
    const sent = '{"client_id":"callers-id","SECRET":"callers_secret_1","secret":"callers_secret_2","\\u0073ecret":"callers_secret_3","access_token":"access-sandbox-1","count":12345678901234567890,"options":{"secret":"nested stays"}}';
    const res = await call('/plaidpre/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: sent });
    expect(res.status).toBe(200);
    const got = upstream.requests.at(-1)!;
    expect(JSON.parse(got.body.toString())).toEqual({ access_token: 'access-sandbox-1', count: 12345678901234567890, options: { secret: 'nested stays' } });
    expect(got.body.toString()).toContain('"count":12345678901234567890');
    expect(got.body.toString()).not.toMatch(/callers/);
    expect(got.headers['plaid-client-id']).toBe(CREDS.plaidbody.client_id);
    expect(got.headers['plaid-secret']).toBe(CREDS.plaidbody.secret);
    // A body without them goes on byte for byte.
    const plain = '{ "access_token" : "access-sandbox-2",\n  "cursor": null }';
    expect((await call('/plaidpre/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: plain })).status).toBe(200);
    expect(upstream.requests.at(-1)!.body.toString()).toBe(plain);
    // Not a JSON object: refused, nothing sent.
    const mark = upstream.requests.length;
    for (const body of ['client_id=callers-id&secret=x', '[{"secret":"x"}]']) expect((await call('/plaidpre/check', { method: 'POST', body })).status).toBe(400);
    expect(upstream.requests.length).toBe(mark);
    expect(upstream.requests.length - before).toBe(2);
  });
});

describe('CRED-INJ bodies on methods without content', () => {
  it('CRED-INJ-14 json_body refuses GET and HEAD (400) rather than send them with a body holding the credential', async () => {
    // A server that ignores a GET's content reads it as the start of the next request on the
    // connection: the proxy refuses such content from callers, and must not make it itself.
    const before = upstream.requests.length;
    for (const method of ['GET', 'HEAD']) {
      const res = await call('/plaidbody/check', { method });
      expect(res.status, method).toBe(400);
      expect(res.headers.get('x-egress-error')).toBe('bad_request');
    }
    expect(upstream.requests.length).toBe(before);
    const post = await call('/plaidbody/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"a":1}' });
    expect(post.status).toBe(200);
  });
});

describe('CRED-INJ query parameter pollution', () => {
  it('CRED-INJ-10 caller copies of a query credential in another case, with a [] suffix or after ";" are dropped: no parser can pick the caller value', async () => {
    const forged = ['API_KEY=evil1', 'api_key%5B%5D=evil2', 'Api_Key%5B0%5D=evil3', 'x=1;api_key=evil4', 'api_key%5Bk%5D=evil5', 'api.key=evil6', '+Api_Key=evil7', 'api%5Bkey=evil8'];
    const res = await call(`/keyed/check?${forged.join('&')}&q=kept%20as%20sent`);
    expect(res.status).toBe(200);
    const sent = upstream.requests.at(-1)!.url;
    expect(sent).not.toContain('evil');
    // As the frameworks read it: ASP.NET matches names without regard to case and takes the first,
    // qs, PHP and Rack read "name[]" and "name[k]" as the name, older Python and Rack split on ";".
    const names = sent.split('?')[1]!.split(/[&;]/).map((pair) => decodeURIComponent(pair.split('=')[0]!).toLowerCase().replace(/\[.*$/, ''));
    expect(names.filter((n) => n === 'api_key')).toHaveLength(1);
    expect(sent).toBe(`/check?q=kept%20as%20sent&api_key=${CREDS.keyed.key}`);
  });
});

describe('CRED-INJ form-body copies of a query credential', () => {
  it('CRED-INJ-19 a form body carrying the parameter a query route injects (api_key, in the spellings the query check removes) is refused with 400; PHP\'s $_REQUEST and Laravel\'s input() let the body win over the query', async () => {
    const before = upstream.requests.length;
    const forms: [string, string][] = [
      ['application/x-www-form-urlencoded', 'q=1&api_key=evil1'],
      ['application/x-www-form-urlencoded;charset=utf-8', 'API.KEY=evil2'],
      ['application/x-www-form-urlencoded', 'api_key%5B%5D=evil3'],
      ['multipart/form-data; boundary=B', '--B\r\nContent-Disposition: form-data; name="Api_Key"\r\n\r\nevil4\r\n--B--\r\n'],
    ];
    for (const [type, body] of forms) {
      const res = await call('/keyed/check', { method: 'POST', headers: { 'content-type': type }, body });
      const text = await res.text();
      expect(res.status, body).toBe(400);
      expect(text).toContain('api_key');
      expect(text).not.toContain('evil');
    }
    expect(upstream.requests.length - before, 'nothing sent').toBe(0);
    // Other fields, and a JSON body naming api_key, go as written with the one injected api_key.
    for (const [type, body] of [['application/x-www-form-urlencoded', 'q=1&key=2&metadata[api]=3'], ['application/json', '{"api_key":"x"}']] as const) {
      const res = await call('/keyed/check', { method: 'POST', headers: { 'content-type': type }, body });
      expect(res.status, type).toBe(200);
      expect((await res.arrayBuffer()).byteLength).toBe(body.length);
      const sent = upstream.requests.at(-1)!;
      expect(sent.body.toString(), type).toBe(body);
      expect(sent.url).toBe(`/check?api_key=${CREDS.keyed.key}`);
    }
  });
});

describe('CRED-INJ probes with their own proxy', () => {
  let own: TestProxy | undefined;
  afterAll(async () => {
    await own?.close();
  });

  it('CRED-INJ-05 a credential value that cannot be a header value (CR LF, NUL) is refused with 503 and never logged; nothing is sent', async () => {
    own = await startTestProxy({
      routes: {
        crlf: route('crlf', '  scheme: headers\n  headers:\n    X-Api-Key: "{key}"'),
        nul: route('nul', '  scheme: bearer'),
        under: route('under', '  scheme: headers\n  headers:\n    X_Api_Key: "{key}"'),
      },
      credentials: { crlf: { key: 'k_CANARY_777\r\nX-Injected: yes' }, nul: { token: 't_CANARY_888\u0000tail' }, under: { key: 'k_CANARY_999\ntail' } },
      callers: ['svc'],
    });
    const before = upstream.requests.length;
    for (const name of ['crlf', 'nul', 'under']) {
      const res = await fetch(`${own.url}/${name}/check`, { headers: { 'x-egress-token': own.tokens.svc! } });
      expect(res.status).toBe(503);
      expect(res.headers.get('x-egress-error')).toBe('credential_unavailable');
      expect(await res.text()).not.toContain('CANARY');
    }
    expect(upstream.requests.length).toBe(before);
    expect(own.logs()).not.toContain('CANARY');
  });
});

describe('CRED-INJ oauth2 lifetimes', () => {
  let redis: TestRedis | undefined;
  const running: TestProxy[] = [];
  afterAll(async () => {
    for (const p of running) await p.close();
    await redis?.destroy();
  });

  it('CRED-INJ-07 an absurd expires_in (1e308 s) is capped: the token is still shared through Redis, one mint for two instances', async () => {
    redis = await TestRedis.create();
    const store = `${redis.url}/6`;
    const dir = await makeTempDir('egress-huge-');
    const routes = { huge: route('huge', `  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/connect/token-huge`) };
    const { tokens } = await seedDataDir(dir, { routes, credentials: { huge: { client_id: 'c', client_secret: 'cs_CANARY_huge' } }, callers: ['svc'], store });
    for (let i = 0; i < 2; i++) running.push(await startTestProxy({ routes: {}, dir, store }));
    const before = mints.filter((m) => m.client === 'huge').length;
    for (const p of running) {
      const res = await fetch(`${p.url}/huge/accounts`, { headers: { 'x-egress-token': tokens.svc! } });
      expect(res.status).toBe(200);
    }
    expect(mints.filter((m) => m.client === 'huge').length - before).toBe(1);
  });
});
