import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { rawRequest, statuses } from '../helpers/raw.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * caller_headers: a route that lists them lets through only the standard content and negotiation
 * headers plus those; a route without the key lets every caller header through (hop-by-hop, proxy
 * and claimed ones aside) but Authorization, which only a route that lists it lets through. The
 * credential's own headers are never the caller's.
 */
const KEY = 'key_CANARY_caller_headers';
let upstream: Upstream;
let proxy: TestProxy;

const route = (name: string, extra: string) => `name: ${name}
prefix: /${name}
upstream: ${upstream.url}
allow_private_addresses: true
credential: key
inject:
  scheme: headers
  headers:
    X-Api-Key: "{key}"
${extra}allow:
  - caller: svc
    methods: [GET, POST]
    paths: [/**]
`;

beforeAll(async () => {
  upstream = await startUpstream();
  proxy = await startTestProxy({
    routes: {
      strict: route('strict', 'caller_headers: [X-Teller-User-Token, Authorization]\n'),
      bare: route('bare', 'caller_headers: []\n'),
      open: route('open', ''),
    },
    credentials: { key: { key: KEY } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

const SENT = {
  'x-teller-user-token': 'user-token-1',
  authorization: 'Basic dG9rZW46',
  'x-api-key': 'forged',
  'x-custom': 'vendor value',
  accept: 'application/json',
  'content-type': 'application/json',
  'idempotency-key': 'idem-1',
  'user-agent': 'svc/1.0',
  traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
};

async function send(prefix: string, extra: Record<string, string> = {}): Promise<Record<string, string | string[] | undefined>> {
  const res = await fetch(`${proxy.url}/${prefix}/x`, { method: 'POST', headers: { ...SENT, ...extra, 'x-egress-token': proxy.tokens.svc! }, body: '{}' });
  expect(res.status).toBe(200);
  await res.arrayBuffer();
  const last = upstream.requests.at(-1)!;
  expect(last.rawHeaders.filter((h) => h.toLowerCase() === 'x-api-key')).toHaveLength(1);
  return last.headers;
}

describe('caller_headers', () => {
  it('a listed route passes the standard set and the listed headers, and nothing else', async () => {
    const h = await send('strict');
    expect(h['x-teller-user-token']).toBe('user-token-1');
    expect(h.authorization).toBe('Basic dG9rZW46');
    for (const name of ['accept', 'content-type', 'idempotency-key', 'user-agent', 'traceparent'] as const) expect(h[name]).toBe(SENT[name]);
    expect(h['x-custom']).toBeUndefined();
    expect(h['x-api-key']).toBe(KEY);
  });

  it('an empty list passes the standard set only', async () => {
    const h = await send('bare');
    expect(h['x-teller-user-token']).toBeUndefined();
    expect(h.authorization).toBeUndefined();
    expect(h['content-type']).toBe('application/json');
    expect(h['x-api-key']).toBe(KEY);
  });

  it('without the key every caller header but Authorization passes; the credential header is still the proxy\'s', async () => {
    const h = await send('open');
    expect(h['x-custom']).toBe('vendor value');
    expect(h['x-teller-user-token']).toBe('user-token-1');
    // All but the caller's Authorization: only a route that lists it lets a caller credential through.
    expect(h.authorization).toBeUndefined();
    expect(h['x-api-key']).toBe(KEY);
  });

  it('a listed header named in Connection is still hop-by-hop and dropped', async () => {
    const raw = await rawRequest(proxy.proxy.proxyAddress.port, `GET /strict/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${proxy.tokens.svc}\r\nX-Teller-User-Token: u1\r\nAuthorization: Basic dG9rZW46\r\nConnection: close, X-Teller-User-Token\r\n\r\n`);
    expect(statuses(raw)).toEqual([200]);
    const h = upstream.requests.at(-1)!.headers;
    expect(h['x-teller-user-token']).toBeUndefined();
    expect(h.authorization).toBe('Basic dG9rZW46');
  });
});
