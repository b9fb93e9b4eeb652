import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually } from '../helpers/proxy.ts';
import { asA, rawRequest, startLab, statuses, type Lab } from './lab.ts';
import { RawConnection } from './raw-socket.ts';
import { bankRoute, basic, connectTunnel, exchange, makeCerts, tlsInTunnel } from './sec-helpers.ts';

/**
 * AUTH: caller authentication on the plain listener (tokens). Client-certificate cases (AUTH-01 no
 * certificate, AUTH-03 expiry, AUTH-05 CA:TRUE leaves, AUTH-07 revocation of a certificate) are
 * covered on the TLS listener by test/integration/tls-listener.test.ts and mtls.test.ts. The last
 * block (AUTH-06c, AUTH-11c, AUTH-07c) checks tokens in forward mode, on a second lab with the
 * interception CA.
 */
let lab: Lab;

beforeAll(async () => {
  lab = await startLab();
}, 30_000);

afterAll(async () => {
  await lab?.close();
});

const PATH = '/plaid/accounts/get';

async function post(headers: Record<string, string>, path = PATH): Promise<Response> {
  const res = await fetch(`${lab.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: '{}', redirect: 'manual' });
  return res;
}

interface Shape {
  status: number;
  code: string | null;
  headerNames: string[];
  body: { error: { code: string; message: string; request_id: string } };
}

async function shape(res: Response): Promise<Shape> {
  const text = await res.text();
  lab.seen(text + JSON.stringify([...res.headers]));
  expect(text).not.toMatch(/at .*\.ts:\d+/);
  const headerNames = [...res.headers.keys()].filter((n) => !['date', 'content-length'].includes(n)).sort();
  return { status: res.status, code: res.headers.get('x-egress-error'), headerNames, body: JSON.parse(text) as Shape['body'] };
}

async function expect401(res: Response): Promise<Shape> {
  const s = await shape(res);
  expect(s.status).toBe(401);
  expect(s.code).toBe('caller_unauthenticated');
  expect(s.body.error.code).toBe('caller_unauthenticated');
  expect(s.body.error.request_id).toBe(res.headers.get('x-request-id'));
  return s;
}

describe('AUTH: caller tokens on the plain listener', () => {
  it('AUTH-00 the valid token of caller a is accepted (control)', async () => {
    const mark = lab.u.requests.length;
    const res = await post(asA(lab));
    lab.seen(await res.text());
    expect(res.status).toBe(200);
    expect(lab.u.requests.length - mark).toBe(1);
    await lab.g0(mark, 1);
  });

  it('AUTH-01t no token at all → 401, nothing at U', async () => {
    const mark = lab.u.requests.length;
    await expect401(await post({}));
    await expect401(await post({ 'x-egress-token': '' }));
    await lab.g0(mark, 0);
  });

  it('AUTH-02 unknown tokens, well-formed or not → 401', async () => {
    const mark = lab.u.requests.length;
    const a = lab.tokens.a;
    const candidates = [
      `egt_${'A'.repeat(43)}`,
      a.slice(0, -1),
      `${a}x`,
      a.slice(0, -1) + (a.endsWith('A') ? 'B' : 'A'),
      a.toUpperCase() === a ? a.toLowerCase() : a.toUpperCase(),
      ` ${a}x`,
      'egt_',
      'x'.repeat(4096),
      lab.tokens.a.replace('egt_', 'ega_'),
    ];
    for (const token of candidates) await expect401(await post({ 'x-egress-token': token }));
    await lab.g0(mark, 0);
  });

  it('AUTH-02b constant-shape errors: unknown, near-miss, short, long and missing tokens answer alike', async () => {
    const mark = lab.u.requests.length;
    const a = lab.tokens.a;
    const shapes = [
      await expect401(await post({ 'x-egress-token': `egt_${'A'.repeat(43)}` })),
      await expect401(await post({ 'x-egress-token': a.slice(0, -1) + (a.endsWith('A') ? 'B' : 'A') })),
      await expect401(await post({ 'x-egress-token': 'short' })),
      await expect401(await post({ 'x-egress-token': `${a}${'z'.repeat(200)}` })),
    ];
    const normal = shapes.map((s) => ({ status: s.status, code: s.code, headerNames: s.headerNames, message: s.body.error.message, keys: Object.keys(s.body.error).sort() }));
    for (const n of normal) expect(n).toEqual(normal[0]);
    // The message never echoes the token, nor says how much of it matched.
    for (const s of shapes) expect(s.body.error.message).not.toMatch(/egt_|prefix|length|match/i);
    // Missing token: same status, code and header set.
    const missing = await expect401(await post({}));
    expect(missing.headerNames).toEqual(normal[0]!.headerNames);
    await lab.g0(mark, 0);
  });

  it('AUTH-02c a token of another caller does not grant the first caller\'s routes', async () => {
    const mark = lab.u.requests.length;
    const res = await post({ 'x-egress-token': lab.tokens.b });
    const s = await shape(res);
    expect(s.status).toBe(403);
    expect(s.code).toBe('route_forbidden');
    await lab.g0(mark, 0);
  });

  it('AUTH-04 two tokens (same header twice, a and b, a and a, comma-joined) → 401', async () => {
    const mark = lab.u.requests.length;
    const { a, b } = lab.tokens;
    for (const pair of [[a, b], [b, a], [a, a], ['bogus', a]]) {
      const raw = await rawRequest(lab.port, `POST ${PATH} HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${pair[0]}\r\nx-egress-token: ${pair[1]}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      lab.seen(raw);
      expect(statuses(raw), pair.join(' + ')).toEqual([401]);
    }
    // One header whose value lists two tokens is not a valid token either.
    await expect401(await post({ 'x-egress-token': `${a}, ${b}` }));
    await expect401(await post({ 'x-egress-token': `${a},${a}` }));
    await lab.g0(mark, 0);
  });

  it('AUTH-02d one keep-alive connection that changes its token is judged by each token it sends', async () => {
    // The proxy keeps a connection's last token hash so that it is not computed again for the same
    // token; a different token on the same connection must be looked up afresh, in either direction.
    const mark = lab.u.requests.length;
    const { a, b } = lab.tokens;
    const nearMiss = `${a.slice(0, -1)}${a.endsWith('A') ? 'B' : 'A'}`;
    const conn = await RawConnection.open(lab.port);
    try {
      const send = async (token: string) => {
        const raw = await conn.exchange(`POST ${PATH} HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${token}\r\nContent-Length: 0\r\n\r\n`, 150);
        lab.seen(raw);
        return statuses(raw);
      };
      expect(await send(a)).toEqual([200]);
      expect(await send(a)).toEqual([200]);
      expect(await send(b)).toEqual([403]);
      expect(await send(a)).toEqual([200]);
      expect(await send(nearMiss)).toEqual([401]);
      expect(await send(a)).toEqual([200]);
      expect(conn.closed).toBe(false);
    } finally {
      conn.close();
    }
    expect(lab.u.requests.length - mark).toBe(4);
    await lab.g0(mark, 4);
  });

  it('AUTH-06 token in the query string, in Authorization, in a cookie or in Proxy-Authorization does not authenticate', async () => {
    const mark = lab.u.requests.length;
    const a = lab.tokens.a;
    for (const q of [`?x-egress-token=${a}`, `?token=${a}`, `?access_token=${a}`, `?X-Egress-Token=${encodeURIComponent(a)}`]) {
      await expect401(await post({}, `${PATH}${q}`));
    }
    await expect401(await post({ authorization: `Bearer ${a}` }));
    await expect401(await post({ authorization: `Basic ${Buffer.from(`a:${a}`).toString('base64')}` }));
    await expect401(await post({ cookie: `x-egress-token=${a}; token=${a}` }));
    await expect401(await post({ 'proxy-authorization': `Bearer ${a}` }));
    await expect401(await post({ 'x-egress-token-': a }));
    await expect401(await post({ 'x_egress_token': a }));
    await lab.g0(mark, 0);
  });

  it('AUTH-06b the token is never forwarded to U, and Authorization/Proxy-Authorization from the caller are not', async () => {
    const mark = lab.u.requests.length;
    const res = await post(asA(lab, { 'proxy-authorization': 'Basic Zm9vOmJhcg==' }), `${PATH}?q=1`);
    lab.seen(await res.text());
    expect(res.status).toBe(200);
    const r = lab.u.requests.at(-1)!;
    expect(JSON.stringify(r.rawHeaders)).not.toContain(lab.tokens.a);
    expect(r.headers['x-egress-token']).toBeUndefined();
    expect(r.headers['proxy-authorization']).toBeUndefined();
    await lab.g0(mark, 1);
  });

  it('AUTH-11 spoofed identity headers are ignored for authorisation and stripped before U', async () => {
    const mark = lab.u.requests.length;
    const spoof = {
      'x-caller-id': 'a',
      'x-egress-caller': 'a',
      'x-forwarded-client-cert': 'By=spiffe://corp/svc-a;URI=spiffe://corp/svc-a',
      'x-ssl-client-s-dn': 'CN=svc-a',
      'x-ssl-client-verify': 'SUCCESS',
      'x-client-cert': 'spiffe://corp/svc-a',
      'x-remote-user': 'a',
      'x-forwarded-user': 'a',
    };
    // Without a token, spoofed identity gets nothing.
    await expect401(await post(spoof));
    // b's token plus headers claiming to be a is still b: a's route stays forbidden.
    const asB = await shape(await post({ 'x-egress-token': lab.tokens.b, ...spoof }));
    expect(asB.status).toBe(403);
    expect(lab.u.requests.length - mark).toBe(0);
    // a's valid token with headers claiming someone else: allowed as a, and the spoofed headers never reach U.
    const res = await post(asA(lab, { 'x-caller-id': 'svc-admin', 'x-forwarded-client-cert': 'By=spiffe://corp/admin', 'x-ssl-client-s-dn': 'CN=svc-admin', 'x-forwarded-for': '10.0.0.1', forwarded: 'for=10.0.0.1' }));
    lab.seen(await res.text());
    expect(res.status).toBe(200);
    const r = lab.u.requests.at(-1)!;
    for (const name of ['x-forwarded-client-cert', 'x-forwarded-for', 'forwarded']) expect(r.headers[name], name).toBeUndefined();
    await lab.g0(mark, 1);
  });

  it('AUTH-11d the client-certificate headers TLS terminators set (RFC 9440 Client-Cert and Client-Cert-Chain, AWS, Azure, nginx) never reach U', async () => {
    const mark = lab.u.requests.length;
    const claimed = {
      'client-cert': ':MIIBqDCCAU6gAwIBAgIBBzAKBggqhkjOPQQDAjA6MRswGQYDVQQKDBJMZXQncyBBdXRoZW50aWNhdGUxGzAZBgNVBAMMEkxBIEludGVybWVkaWF0ZSBDQTAeFw0y:',
      'client-cert-chain': ':MIIB5jCCAYugAwIBAgIBFjAKBggqhkjOPQQDAjBWMQswCQYDVQQGEwJVUzEbMBkGA1UECgwSTGV0J3MgQXV0aGVudGljYXRlMSowKAYDVQQDDCFMZXQncyBBdXRoZW50aWNhdGUgUm9vdCBDQTAeFw0y:',
      'x-amzn-mtls-clientcert': '-----BEGIN%20CERTIFICATE-----%0AMIIB-----END%20CERTIFICATE-----',
      'x-amzn-mtls-clientcert-subject': 'CN=svc-admin',
      'x-amzn-mtls-clientcert-leaf': '-----BEGIN%20CERTIFICATE-----%0AMIIB-----END%20CERTIFICATE-----',
      'x-arr-clientcert': 'MIIBqDCCAU6gAwIBAgIBBzAK',
      'x-ssl-cert': '-----BEGIN%20CERTIFICATE-----%0AMIIB',
      'ssl-client-cert': '-----BEGIN%20CERTIFICATE-----%0AMIIB',
      'ssl-client-verify': 'SUCCESS',
    };
    const res = await post(asA(lab, claimed));
    lab.seen(await res.text());
    expect(res.status).toBe(200);
    const r = lab.u.requests.at(-1)!;
    for (const name of Object.keys(claimed)) expect(r.headers[name], name).toBeUndefined();
    await lab.g0(mark, 1);
  });

  it('AUTH-11b spoofed identity headers on a route that passes caller headers still cannot change the caller', async () => {
    // The audit log names the caller that the token identified, not the one a header claims.
    const mark = lab.u.requests.length;
    const res = await post({ 'x-egress-token': lab.tokens.b, 'x-caller-id': 'a', 'x-egress-caller': 'a' }, '/plaid/transactions/get');
    lab.seen(await res.text());
    expect(res.status).toBe(403);
    await lab.g0(mark, 0);
  });

  it('AUTH-07 revocation: a revoked caller token is refused within a second, with the same 401', async () => {
    const env = envFor(lab.dir);
    const added = await runCli(['callers', 'add', 'c', '--json'], env);
    expect(added.code).toBe(0);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    expect(token).toMatch(/^egt_/);
    const mark = lab.u.requests.length;
    // Known but not on the allowlist: 403 (authenticated), once the proxy has seen the new caller.
    await eventually(async () => (await post({ 'x-egress-token': token }).then(async (r) => (await r.text(), r.status))) === 403, 3_000, 'new caller known');
    const revoked = await runCli(['callers', 'revoke', 'c'], env);
    expect(revoked.code).toBe(0);
    const ms = await eventually(async () => (await post({ 'x-egress-token': token }).then(async (r) => (await r.text(), r.status))) === 401, 3_000, 'revocation applied');
    expect(ms).toBeLessThan(2_000);
    const s = await expect401(await post({ 'x-egress-token': token }));
    const unknown = await expect401(await post({ 'x-egress-token': `egt_${'Q'.repeat(43)}` }));
    expect(s.headerNames).toEqual(unknown.headerNames);
    // Caller a is untouched by c's revocation.
    const ok = await post(asA(lab));
    lab.seen(await ok.text());
    expect(ok.status).toBe(200);
    await lab.g0(mark, 1);
  });

  it('AUTH-07b a keep-alive connection opened before the revocation cannot keep using the revoked token', async () => {
    const env = envFor(lab.dir);
    const added = await runCli(['callers', 'add', 'd', '--json'], env);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    await eventually(async () => (await post({ 'x-egress-token': token }).then(async (r) => (await r.text(), r.status))) === 403, 3_000, 'new caller known');
    const mark = lab.u.requests.length;
    const conn = await RawConnection.open(lab.port);
    try {
      const req = `POST ${PATH} HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${token}\r\nContent-Length: 0\r\n\r\n`;
      const before = await conn.exchange(req, 200);
      lab.seen(before);
      expect(statuses(before)).toEqual([403]);
      expect((await runCli(['callers', 'revoke', 'd'], env)).code).toBe(0);
      await eventually(async () => (await post({ 'x-egress-token': token }).then(async (r) => (await r.text(), r.status))) === 401, 3_000, 'revocation applied');
      const after = await conn.exchange(req, 300);
      lab.seen(after);
      if (!after) expect(conn.closed, "closed instead of answering").toBe(true);
      else expect(statuses(after)).toEqual([401]);
    } finally {
      conn.close();
    }
    await lab.g0(mark, 0);
  });
});

describe('AUTH: revocation during a rotation grace', () => {
  it('AUTH-07e a token inside its rotation grace dies with the caller\'s revoke, and adding the name again revives neither old token', async () => {
    const env = envFor(lab.dir);
    const status = async (token: string) => post({ 'x-egress-token': token }).then(async (r) => (lab.seen(await r.text()), r.status));
    const first = (JSON.parse((await runCli(['callers', 'add', 'g', '--json'], env)).stdout) as { token: string }).token;
    await eventually(async () => (await status(first)) === 403, 3_000, 'g known');
    const rotated = await runCli(['callers', 'rotate', 'g', '--grace', '24h', '--json'], env);
    expect(rotated.code, rotated.stderr).toBe(0);
    const second = (JSON.parse(rotated.stdout) as { token: string }).token;
    await eventually(async () => (await status(second)) === 403, 3_000, 'the new token known');
    // Known but not on the allowlist: 403 means authenticated. The first token is inside its grace.
    expect(await status(first)).toBe(403);
    const mark = lab.u.requests.length;
    expect((await runCli(['callers', 'revoke', 'g'], env)).code).toBe(0);
    await eventually(async () => (await status(first)) === 401 && (await status(second)) === 401, 3_000, 'both tokens refused');
    const third = (JSON.parse((await runCli(['callers', 'add', 'g', '--json'], env)).stdout) as { token: string }).token;
    await eventually(async () => (await status(third)) === 403, 3_000, 'the re-added caller known');
    expect(await status(first)).toBe(401);
    expect(await status(second)).toBe(401);
    await lab.g0(mark, 0);
  });
});

describe('AUTH: admin tokens', () => {
  it('AUTH-12 the admin API takes its token only as Bearer: Basic (what a browser that opened the status page replays by itself, on a cross-site form POST too) changes nothing', async () => {
    const env = envFor(lab.dir);
    const created = await runCli(['admin-token', 'create', 'ops', '--json'], env);
    expect(created.code, created.stderr).toBe(0);
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    const basicAuth = `Basic ${Buffer.from(`ops:${admin}`).toString('base64')}`;
    // The status page still opens with Basic (it only reads), once the proxy has seen the new token.
    await eventually(async () => (await fetch(`${lab.admin}/`, { headers: { authorization: basicAuth } }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'admin token known');
    const mark = lab.u.requests.length;
    // What an HTML form on another site sends: a urlencoded or text/plain body, often empty.
    for (const [path, contentType, body] of [
      ['/v1/credentials/plaid/revoke', 'application/x-www-form-urlencoded', ''],
      ['/v1/credentials/plaid/rollback', 'text/plain', ''],
      ['/v1/callers/a/revoke', 'application/x-www-form-urlencoded', ''],
      ['/v1/callers/a/rotate', 'multipart/form-data; boundary=x', ''],
      ['/v1/callers', 'application/json', '{"name":"mallory"}'],
    ] as const) {
      const res = await fetch(`${lab.admin}${path}`, { method: 'POST', headers: { authorization: basicAuth, 'content-type': contentType, origin: 'https://evil.example', 'sec-fetch-site': 'cross-site' }, body });
      const text = await res.text();
      lab.seen(text);
      expect(res.status, `${path}: ${text}`).toBe(401);
    }
    const list = await fetch(`${lab.admin}/v1/credentials`, { headers: { authorization: basicAuth } });
    expect(list.status).toBe(401);
    await list.text();
    // Nothing changed: a's token and the credential still work, and Bearer is still accepted.
    const ok = await post(asA(lab));
    lab.seen(await ok.text());
    expect(ok.status).toBe(200);
    const callers = await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } });
    expect(callers.status).toBe(200);
    const names = ((await callers.json()) as { callers: { name: string; revoked_at: string | null }[] }).callers;
    expect(names.find((c) => c.name === 'a')!.revoked_at).toBeNull();
    expect(names.map((c) => c.name)).not.toContain('mallory');
    await lab.g0(mark, 1);
  });
});

describe('AUTH: admin and caller tokens stay apart', () => {
  it('AUTH-13 a caller token is no admin token and an admin token no caller token; a revoked admin token opens nothing', async () => {
    const env = envFor(lab.dir);
    const created = await runCli(['admin-token', 'create', 'ops2', '--json'], env);
    expect(created.code, created.stderr).toBe(0);
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    const list = async (token: string) => fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${token}` } }).then(async (r) => (lab.seen(await r.text()), r.status));
    await eventually(async () => (await list(admin)) === 200, 3_000, 'admin token known');
    // The caller token in the admin API, with its prefix swapped, or the admin token in the prefix's place.
    expect(await list(lab.tokens.a)).toBe(401);
    expect(await list(lab.tokens.a.replace(/^egt_/, 'ega_'))).toBe(401);
    expect(await list(admin.replace(/^ega_/, 'egt_'))).toBe(401);
    const mark = lab.u.requests.length;
    await expect401(await post({ 'x-egress-token': admin }));
    await expect401(await post({ 'x-egress-token': admin.replace(/^ega_/, 'egt_') }));
    expect((await runCli(['admin-token', 'revoke', 'ops2'], env)).code).toBe(0);
    await eventually(async () => (await list(admin)) === 401, 3_000, 'the admin token revoked');
    const revoke = await fetch(`${lab.admin}/v1/callers/a/revoke`, { method: 'POST', headers: { authorization: `Bearer ${admin}` } });
    lab.seen(await revoke.text());
    expect(revoke.status).toBe(401);
    await lab.g0(mark, 0);
  });
});

describe('AUTH: caller tokens in forward mode (Proxy-Authorization on CONNECT, identity inside the tunnel)', () => {
  let fwd: Lab;
  let caPem: string;

  beforeAll(async () => {
    const made = await makeCerts(['api.bank.test']);
    caPem = made.caPem;
    fwd = await startLab({ env: { EGRESS_CERTS: made.certs }, routes: (u) => ({ bank: bankRoute(u.url) }) });
  }, 60_000);

  afterAll(async () => {
    await fwd?.close();
  });

  /** One inner request through a fresh tunnel opened with `auth`: the CONNECT status, then the inner statuses. */
  async function through(auth: string, innerHeaders = ''): Promise<number[]> {
    const t = await connectTunnel(fwd.port, 'api.bank.test:443', auth);
    if (t.status !== 200) {
      t.socket.destroy();
      return [t.status];
    }
    const tls = await tlsInTunnel(t.socket, 'api.bank.test', caPem);
    const out = await exchange(tls, `GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\n${innerHeaders}Connection: close\r\n\r\n`);
    fwd.seen(out);
    return [200, ...statuses(out)];
  }

  const statusOf = async (token: string) => {
    const r = await fetch(`${fwd.url}/bank/accounts`, { headers: { 'x-egress-token': token } });
    fwd.seen(await r.text());
    return r.status;
  };

  it('AUTH-06c the token must be the Basic password or a Bearer value; other spellings get 407', async () => {
    const mark = fwd.u.requests.length;
    const { a, b } = fwd.tokens;
    expect(await through(basic('a', a))).toEqual([200, 200]);
    expect(await through(`Bearer ${a}`)).toEqual([200, 200]);
    for (const auth of [
      `Basic ${Buffer.from(`${a}:`).toString('base64')}`,
      `Basic ${Buffer.from(a).toString('base64')}`,
      `Bearer  ${a}`,
      `Token ${a}`,
      `${basic('a', a)}, ${basic('b', b)}`,
      `Basic ${Buffer.from(`a:${a.slice(0, -1)}`).toString('base64')}`,
    ]) {
      expect(await through(auth), auth).toEqual([407]);
    }
    expect(fwd.u.requests.length - mark).toBe(2);
    await fwd.g0(mark, 2);
  });

  it('AUTH-11c inside a tunnel, X-Egress-Token or Proxy-Authorization of another caller changes nothing and never reaches U', async () => {
    const mark = fwd.u.requests.length;
    const { a, b } = fwd.tokens;
    // b's tunnel claiming to be a: still b, and b may not use the bank route.
    expect(await through(basic('b', b), `X-Egress-Token: ${a}\r\n`)).toEqual([200, 403]);
    expect(await through(basic('b', b), `Proxy-Authorization: ${basic('a', a)}\r\n`)).toEqual([200, 403]);
    expect(fwd.u.requests.length - mark).toBe(0);
    // a's tunnel carrying b's token: a's request, and neither identity header goes upstream.
    expect(await through(basic('a', a), `X-Egress-Token: ${b}\r\nProxy-Authorization: ${basic('b', b)}\r\n`)).toEqual([200, 200]);
    const r = fwd.u.requests.at(-1)!;
    expect(r.headers['x-egress-token']).toBeUndefined();
    expect(r.headers['proxy-authorization']).toBeUndefined();
    expect(JSON.stringify(r.rawHeaders)).not.toContain(b);
    await fwd.g0(mark, 1);
  });

  it('AUTH-07c a token revoked while its tunnel is open: the next inner request is refused (401, or the tunnel is closed)', async () => {
    const env = envFor(fwd.dir);
    const added = await runCli(['callers', 'add', 'q', '--json'], env);
    expect(added.code).toBe(0);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    await eventually(async () => (await statusOf(token)) === 403, 3_000, 'q known');
    const mark = fwd.u.requests.length;
    const t = await connectTunnel(fwd.port, 'api.bank.test:443', basic('q', token));
    expect(t.status).toBe(200);
    const tls = await tlsInTunnel(t.socket, 'api.bank.test', caPem);
    let seen = '';
    tls.on('data', (d: Buffer) => (seen += d.toString('latin1')));
    tls.on('error', () => {});
    try {
      tls.write('GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\n\r\n');
      await eventually(() => statuses(seen).length === 1, 3_000, 'first answer');
      expect(statuses(seen)).toEqual([403]);
      expect((await runCli(['callers', 'revoke', 'q'], env)).code).toBe(0);
      await eventually(async () => (await statusOf(token)) === 401, 3_000, 'revocation applied');
      if (!tls.destroyed) tls.write('GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\n\r\n');
      await eventually(() => statuses(seen).length === 2 || tls.destroyed, 3_000, 'second answer or close');
      fwd.seen(seen);
      // Either answered 401, or closed without a second answer; never a 403 (the tunnel's identity kept) or a 200.
      if (statuses(seen).length === 2) expect(statuses(seen)).toEqual([403, 401]);
      else expect(tls.destroyed, 'closed instead of answering').toBe(true);
    } finally {
      tls.destroy();
    }
    expect(fwd.u.requests.length - mark).toBe(0);
    await fwd.g0(mark, 0);
  });
});
