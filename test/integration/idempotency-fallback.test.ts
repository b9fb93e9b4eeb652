import { request } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * FLT-07 with an idempotency key (providers.md §3.2): during a grace window, a request the upstream
 * would not run twice under one Idempotency-Key (Stripe, TrueLayer) may go once more with the
 * previous key, whatever its method, when the route says the upstream honours that header and the
 * request carries it exactly once. The replay carries the same key and the same body.
 */
const OLD = 'sk_live_OLD_1111';
const NEW = 'sk_live_NEW_2222';
const IDEMPOTENCY = '5d8e3b0a-27c4-4a63-9d4f-0e1c2b3a4d5e';

let upstream: Upstream;
let proxy: TestProxy;

const route = (name: string, extra: string) => `name: ${name}
prefix: /${name}
upstream: ${upstream.url}
allow_private_addresses: true
credential: ${name}
inject:
  scheme: bearer
  token: "{secret_key}"
max_body: 100kb
${extra}allow:
  - caller: svc
    methods: [GET, POST]
    paths: [/v1/**]
`;

beforeAll(async () => {
  // A Stripe-like upstream: only the old key is accepted; the new one is answered 401.
  upstream = await startUpstream((req, res) => {
    const key = String(req.headers.authorization ?? '').replace(/^Bearer /, '');
    res.writeHead(key === OLD ? 200 : 401, { 'content-type': 'application/json' });
    res.end(JSON.stringify(key === OLD ? { ok: true, key_tail: key.slice(-4) } : { error: { type: 'invalid_request_error', message: 'Invalid API Key provided' } }));
  });
  proxy = await startTestProxy({
    routes: {
      pay: route('pay', 'idempotency_key: Idempotency-Key\n'),
      plain: route('plain', ''),
    },
    credentials: { pay: { secret_key: OLD }, plain: { secret_key: OLD } },
    callers: ['svc'],
  });
  const env = envFor(proxy.dir);
  for (const id of ['pay', 'plain']) {
    const rotated = await runCli(['keys', 'rotate', id, '--from-stdin', '--grace', '1h'], env, JSON.stringify({ secret_key: NEW }));
    expect(rotated.code, rotated.stderr).toBe(0);
  }
  await eventually(() => ['pay', 'plain'].every((id) => proxy.services().store.credential(id)?.versions[1]?.state === 'current'), 3_000, 'the proxy to see the rotations');
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

/** A POST with these header lines exactly as given (node:http sends repeats as separate lines), its body chunked. */
function post(path: string, headers: readonly (readonly [string, string])[], body: string): Promise<{ status: number; text: string; requestId: string }> {
  return new Promise((resolve, reject) => {
    // A header list is sent as given: Node adds no Host to it.
    const flat = [['host', new URL(proxy.url).host], ['x-egress-token', proxy.tokens.svc!], ['content-type', 'application/x-www-form-urlencoded'], ['transfer-encoding', 'chunked'], ...headers].flat();
    const req = request(`${proxy.url}${path}`, { method: 'POST', headers: flat }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode!, text, requestId: String(res.headers['x-request-id']) }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** Over SMALL_BODY and chunked: only a replay-safe request has it buffered. */
const BODY = `amount=2000&currency=gbp&description=${'d'.repeat(80 * 1024)}`;

async function auditLine(requestId: string): Promise<Record<string, unknown>> {
  let line: string | undefined;
  await eventually(async () => (line = (await proxy.auditText()).split('\n').find((l) => l.includes(requestId))) !== undefined, 2_000, 'the audit line');
  return JSON.parse(line!) as Record<string, unknown>;
}

describe('a route with idempotency_key', () => {
  it('a POST carrying one Idempotency-Key is rejected under the new key, then sent again with the previous key, the same Idempotency-Key and the same body: the caller gets the 200', async () => {
    const before = upstream.requests.length;
    const res = await post('/pay/v1/charges', [['Idempotency-Key', IDEMPOTENCY]], BODY);
    expect(res.status).toBe(200);
    expect(JSON.parse(res.text)).toMatchObject({ ok: true, key_tail: '1111' });
    const sent = upstream.requests.slice(before);
    expect(sent.map((r) => r.headers.authorization)).toEqual([`Bearer ${NEW}`, `Bearer ${OLD}`]);
    for (const r of sent) {
      expect(r.method).toBe('POST');
      expect(r.url).toBe('/v1/charges');
      expect(r.rawHeaders.filter((h, i) => i % 2 === 0 && h.toLowerCase() === 'idempotency-key')).toHaveLength(1);
      expect(r.headers['idempotency-key']).toBe(IDEMPOTENCY);
      expect(r.body.toString()).toBe(BODY);
    }
    expect(await auditLine(res.requestId)).toMatchObject({ route: 'pay', method: 'POST', path: '/pay/v1/charges', reason: 'fallback_previous_version', upstream_status: 200, credential_version: 1 });
    expect(await (await fetch(`${proxy.admin}/metrics`)).text()).toMatch(/egress_rotation_fallbacks_total\{credential="pay",version="1"\} [1-9]/);
  });

  it.each([
    ['without an Idempotency-Key', []],
    ['with two Idempotency-Key lines, even equal ones', [['Idempotency-Key', IDEMPOTENCY], ['Idempotency-Key', IDEMPOTENCY]]],
    ['with an empty Idempotency-Key', [['Idempotency-Key', '']]],
    ['with only Idempotency_Key (a spelling some servers fold into the same name)', [['Idempotency_Key', IDEMPOTENCY]]],
    ['with Idempotency-Key and Idempotency_Key', [['Idempotency-Key', IDEMPOTENCY], ['Idempotency_Key', 'other']]],
    ['with Idempotency-Key listed in Connection (it does not cross the proxy)', [['Connection', 'Idempotency-Key'], ['Idempotency-Key', IDEMPOTENCY]]],
  ] as const)('a POST %s is sent once, not refused: the caller gets the 401', async (_case, headers) => {
    const before = upstream.requests.length;
    const res = await post('/pay/v1/charges', headers, BODY);
    expect(res.status).toBe(401);
    expect(res.text).toContain('Invalid API Key');
    const sent = upstream.requests.slice(before);
    expect(sent.map((r) => r.headers.authorization)).toEqual([`Bearer ${NEW}`]);
    expect(sent[0]!.body.toString()).toBe(BODY);
    expect(await auditLine(res.requestId)).not.toMatchObject({ reason: 'fallback_previous_version' });
  });

  it('a body over max_body is refused with 413 before anything is sent, as for a replay_safe entry', async () => {
    const before = upstream.requests.length;
    const res = await post('/pay/v1/charges', [['Idempotency-Key', IDEMPOTENCY]], 'x'.repeat(150 * 1024));
    expect(res.status).toBe(413);
    expect(upstream.requests.length).toBe(before);
  });
});

describe('a route without idempotency_key', () => {
  it('a POST carrying an Idempotency-Key is not replayed: the caller gets the 401', async () => {
    const before = upstream.requests.length;
    const res = await post('/plain/v1/charges', [['Idempotency-Key', IDEMPOTENCY]], BODY);
    expect(res.status).toBe(401);
    const sent = upstream.requests.slice(before);
    expect(sent.map((r) => r.headers.authorization)).toEqual([`Bearer ${NEW}`]);
    expect(sent[0]!.headers['idempotency-key']).toBe(IDEMPOTENCY);
  });
});
