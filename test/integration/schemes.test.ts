import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * Each injection scheme against an upstream that checks the credential with its own code (not the
 * proxy's): the request either carries exactly the expected credential, or it is refused with 401.
 */
const CREDS = {
  plaid: { client_id: 'client-123', secret: 'plaid_secret_CANARY_111' },
  tradier: { token: 'tradier_token_CANARY_222' },
  simplefin: { username: 'sf-user', password: 'sf_pass_CANARY_333' },
  keyed: { key: 'query_key_CANARY_444&x=1' },
  plaidbody: { client_id: 'client-456', secret: 'body_secret_CANARY_555' },
  teller: { token: 'token_CANARY_666' },
};

let upstream: Upstream;
let proxy: TestProxy;

function route(name: string, inject: string, methods = '[GET, POST]'): string {
  return `name: ${name}
prefix: /${name}
upstream: ${upstream.url}
allow_private_addresses: true
credential: ${name}
inject:
${inject}
allow:
  - caller: svc
    methods: ${methods}
    paths: [/check, /check/**]
`;
}

beforeAll(async () => {
  upstream = await startUpstream((req, res, body) => {
    const h = req.headers;
    const url = new URL(req.url ?? '/', 'http://x');
    const auth = h.authorization;
    let ok = false;
    switch (url.pathname.split('/')[1]) {
      case 'headers':
        ok = h['plaid-client-id'] === CREDS.plaid.client_id && h['plaid-secret'] === CREDS.plaid.secret;
        break;
      case 'bearer':
        ok = auth === `Bearer ${CREDS.tradier.token}`;
        break;
      case 'basic': {
        const [scheme, value] = (auth ?? '').split(' ');
        const [user, ...pass] = Buffer.from(value ?? '', 'base64').toString('utf8').split(':');
        ok = scheme === 'Basic' && user === CREDS.simplefin.username && pass.join(':') === CREDS.simplefin.password;
        break;
      }
      case 'query':
        ok = url.searchParams.getAll('api_key').length === 1 && url.searchParams.get('api_key') === CREDS.keyed.key && url.searchParams.get('q') === 'caller value';
        break;
      case 'token-basic':
        // Teller: the access token as the Basic user-id, with an empty password ("token:").
        ok = auth === `Basic ${Buffer.from(`${CREDS.teller.token}:`, 'utf8').toString('base64')}`;
        break;
      case 'json': {
        const parsed = JSON.parse(body.toString('utf8')) as Record<string, unknown>;
        ok = parsed.client_id === CREDS.plaidbody.client_id && parsed.secret === CREDS.plaidbody.secret && parsed.access_token === 'access-sandbox-1' && h['content-length'] === String(body.length);
        break;
      }
    }
    res.writeHead(ok ? 200 : 401, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ ok }));
  });
  // Upstream paths are /<scheme>/check: the route's upstream base path carries the scheme name.
  const base = (name: string, inject: string) => route(name, inject).replace(`upstream: ${upstream.url}`, `upstream: ${upstream.url}/${name === 'plaid' ? 'headers' : name === 'tradier' ? 'bearer' : name === 'simplefin' ? 'basic' : name === 'keyed' ? 'query' : name === 'teller' ? 'token-basic' : 'json'}`);
  proxy = await startTestProxy({
    routes: {
      plaid: base('plaid', '  scheme: headers\n  headers:\n    PLAID-CLIENT-ID: "{client_id}"\n    PLAID-SECRET: "{secret}"'),
      tradier: base('tradier', '  scheme: bearer'),
      simplefin: base('simplefin', '  scheme: basic'),
      keyed: base('keyed', '  scheme: query\n  params:\n    api_key: "{key}"'),
      teller: base('teller', '  scheme: basic\n  username: "{token}"\n  password: ""'),
      plaidbody: base('plaidbody', '  scheme: json_body\n  fields:\n    client_id: "{client_id}"\n    secret: "{secret}"'),
    },
    credentials: CREDS,
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

async function call(path: string, init: RequestInit = {}): Promise<Response> {
  return fetch(`${proxy.url}${path}`, { ...init, headers: { 'x-egress-token': proxy.tokens.svc!, ...(init.headers as Record<string, string>) } });
}

describe('injection schemes, verified by an independent upstream', () => {
  it('headers: Plaid-style PLAID-CLIENT-ID / PLAID-SECRET', async () => {
    const res = await call('/plaid/check', { method: 'POST', body: '{}' });
    expect(res.status).toBe(200);
    expect(upstream.requests.at(-1)!.url).toBe('/headers/check');
  });

  it('bearer: Authorization: Bearer {token}', async () => {
    const res = await call('/tradier/check');
    expect(res.status).toBe(200);
  });

  it('basic: Authorization: Basic base64(username:password)', async () => {
    const res = await call('/simplefin/check');
    expect(res.status).toBe(200);
  });

  it('basic: an empty password is written "", for the token-as-user-id form (Teller\'s "token:")', async () => {
    const res = await call('/teller/check');
    expect(res.status).toBe(200);
  });

  it('query: the key is appended URL-encoded and the caller query is kept', async () => {
    const res = await call('/keyed/check?q=caller%20value&api_key=caller-forged');
    expect(res.status).toBe(200);
    const sent = upstream.requests.at(-1)!.url;
    expect(sent.startsWith('/query/check?q=caller%20value&api_key=')).toBe(true);
    expect(sent).not.toContain('caller-forged');
  });

  it('json_body: fields merged into the caller JSON, proxy values win, Content-Length recomputed', async () => {
    const res = await call('/plaidbody/check', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ access_token: 'access-sandbox-1', secret: 'caller-forged' }),
    });
    expect(res.status).toBe(200);
    expect(upstream.requests.at(-1)!.body.toString()).not.toContain('caller-forged');
  });

  it('json_body: a body that is not a JSON object is refused with 400, nothing sent', async () => {
    const before = upstream.requests.length;
    const res = await call('/plaidbody/check', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '[1,2]' });
    expect(res.status).toBe(400);
    expect(res.headers.get('x-egress-error')).toBe('bad_request');
    expect(upstream.requests.length).toBe(before);
  });

  it('the caller never sees the credential in the response', async () => {
    const res = await call('/plaid/check', { method: 'POST', body: '{}' });
    const text = await res.text();
    for (const v of Object.values(CREDS).flatMap((c) => Object.values(c))) expect(text).not.toContain(v);
  });
});
