import { execFile } from 'node:child_process';
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { promisify } from 'node:util';
import { ProxyAgent, request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { findRouteByHost } from '../../src/config/compile-routes.ts';
import { apiKeyRoute } from '../helpers/routes.ts';
import { makeTestPki } from '../helpers/tls.ts';
import { echo, startUpstream, type Upstream } from '../helpers/upstream.ts';
import { TUNNEL_LIMITS } from '../../src/server/forward.ts';

/**
 * Forward mode: services keep their provider URLs and set HTTPS_PROXY; the proxy intercepts the
 * tunnel with a leaf from its own name-constrained CA and runs the same checks as reverse mode.
 */
const run = promisify(execFile);
const SECRET = 'sk_fwd_CANARY_9b1e';
let upstream: Upstream;
let proxy: TestProxy;
let dir: string;
let caPem: string;
let token: string;
let port: number;

beforeAll(async () => {
  const pki = makeTestPki();
  // /slow answers after the tunnels' idle limit has passed.
  upstream = await startUpstream((req, res, body) => (req.url === '/slow' ? setTimeout(() => echo(req, res, body), TUNNEL_LIMITS.idleMs + 2_000) : echo(req, res, body)), { key: pki.serverKey, cert: pki.serverCert });
  dir = await makeTempDir('egress-forward-');
  const seeded = await seedDataDir(dir, {
    routes: {
      bank: `name: bank
prefix: /bank
upstream: ${upstream.url}
upstream_ca: ./server-ca.pem
allow_private_addresses: true
hosts: [api.bank.test]
credential: key
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
timeouts: { response: 90s }
allow:
  - caller: svc
    methods: [GET, POST]
    paths: [/accounts, /slow]
`,
      // An upstream with a base path, as SimpleFIN's (https://beta-bridge.simplefin.org/simplefin).
      sfin: apiKeyRoute({ name: 'sfin', upstream: `${upstream.url}/simplefin`, extra: 'upstream_ca: ./server-ca.pem\nhosts: [simplefin.bank.test]\n', paths: ['/accounts'] }),
    },
    files: { 'server-ca.pem': pki.caCert },
    credentials: { key: { secret: SECRET } },
    callers: ['svc'],
  });
  token = seeded.tokens.svc!;
  const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
  const init = await runCli(['certs', 'init'], env);
  expect(init.code, init.stderr).toBe(0);
  caPem = await readFile(join(dir, 'certs', 'ca.pem'), 'utf8');
  proxy = await startTestProxy({ routes: {}, dir, env: { EGRESS_CERTS: join(dir, 'certs') } });
  port = proxy.proxy.proxyAddress.port;
}, 30_000);

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

/** Send CONNECT and return the status line; the socket is handed back open on 200. */
function connectTunnel(target: string, auth: string | null = `Basic ${Buffer.from(`svc:${token}`).toString('base64')}`, at = port): Promise<{ status: number; socket: import('node:net').Socket }> {
  return new Promise((resolve, reject) => {
    const socket = connect(at, '127.0.0.1', () => {
      socket.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n${auth ? `Proxy-Authorization: ${auth}\r\n` : ''}\r\n`);
    });
    let buf = '';
    const onData = (d: Buffer) => {
      buf += d.toString('latin1');
      const end = buf.indexOf('\r\n\r\n');
      if (end === -1) return;
      socket.off('data', onData);
      resolve({ status: Number(buf.slice(9, 12)), socket });
    };
    socket.on('data', onData);
    socket.on('error', reject);
  });
}

/** Inside an established tunnel: TLS with `servername`, then one raw request. */
function inTunnel(socket: import('node:net').Socket, servername: string, host: string, path = '/accounts'): Promise<number> {
  return new Promise((resolve, reject) => {
    const tls = tlsConnect({ socket, servername, ca: caPem }, () => {
      tls.write(`GET ${path} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`);
    });
    let buf = '';
    tls.on('data', (d: Buffer) => (buf += d.toString()));
    tls.on('end', () => resolve(Number(buf.slice(9, 12))));
    tls.on('error', reject);
  });
}

describe('forward mode', () => {
  it('certs init makes a CA whose name constraints permit only the routes\' hosts and localhost; its key is 0600', async () => {
    const { stdout } = await run('openssl', ['x509', '-in', join(dir, 'certs', 'ca.pem'), '-noout', '-text']);
    expect(stdout).toMatch(/X509v3 Name Constraints: critical\s+Permitted:\s+DNS:api\.bank\.test\s+DNS:localhost/);
    expect(stdout).toContain('CA:TRUE, pathlen:0');
    expect((await stat(join(dir, 'certs', 'ca.key'))).mode & 0o777).toBe(0o600);
  });

  it('curl through HTTPS_PROXY with --cacert reaches the upstream with the credential attached', async () => {
    const before = upstream.requests.length;
    await writeFile(join(dir, 'ca-for-curl.pem'), caPem);
    const { stdout } = await run('curl', ['-sS', '--cacert', join(dir, 'ca-for-curl.pem'), 'https://api.bank.test/accounts'], {
      env: { PATH: process.env.PATH ?? '', HTTPS_PROXY: `http://svc:${token}@127.0.0.1:${port}` },
    });
    expect(JSON.parse(stdout)).toMatchObject({ method: 'GET', url: '/accounts' });
    const seen = upstream.requests.slice(before);
    expect(seen).toHaveLength(1);
    expect(seen[0]!.headers['x-api-key']).toBe(SECRET);
    expect(seen[0]!.headers['proxy-authorization']).toBeUndefined();
    expect(JSON.stringify(seen[0]!.headers)).not.toContain(token);
  });

  it('undici ProxyAgent works the same way', async () => {
    const agent = new ProxyAgent({ uri: `http://127.0.0.1:${port}`, token: `Basic ${Buffer.from(`svc:${token}`).toString('base64')}`, requestTls: { ca: caPem } });
    try {
      const res = await request('https://api.bank.test/accounts', { dispatcher: agent, method: 'POST', body: '{}' });
      expect(res.statusCode).toBe(200);
      expect(((await res.body.json()) as { method: string }).method).toBe('POST');
    } finally {
      await agent.close();
    }
  });

  it('refuses, without opening any connection: a host no route names, another port, an IP literal, no credentials', async () => {
    const before = upstream.requests.length;
    expect((await connectTunnel('evil.example:443')).status).toBe(403);
    expect((await connectTunnel('api.bank.test.:443')).status).toBe(403);
    expect((await connectTunnel('api.bank.test:22')).status).toBe(403);
    expect((await connectTunnel(`127.0.0.1:${upstream.port}`)).status).toBe(403);
    expect((await connectTunnel('[::1]:443')).status).toBe(403);
    expect((await connectTunnel('api.bank.test:443', null)).status).toBe(407);
    expect((await connectTunnel('api.bank.test:443', `Basic ${Buffer.from('svc:egt_wrong').toString('base64')}`)).status).toBe(407);
    expect(upstream.requests.length).toBe(before);
  });

  it('a leaf is only ever minted for a host a route names', async () => {
    expect((await connectTunnel('evil.example:443')).status).toBe(403);
    expect((await connectTunnel('api.bank.test.evil.example:443')).status).toBe(403);
    expect(proxy.proxy.minter!.minted()).toEqual(['api.bank.test']);
  });

  it('a caller holds at most 64 tunnels at once; the next gets 429', async () => {
    const open = [];
    for (let i = 0; i < 64; i++) {
      const t = await connectTunnel('api.bank.test:443');
      expect(t.status).toBe(200);
      open.push(t.socket);
    }
    expect((await connectTunnel('api.bank.test:443')).status).toBe(429);
    for (const s of open) s.destroy();
    await new Promise((r) => setTimeout(r, 200));
    const again = await connectTunnel('api.bank.test:443');
    expect(again.status).toBe(200);
    again.socket.destroy();
  });

  it('an SNI different from the CONNECT host is refused in the handshake', async () => {
    const before = upstream.requests.length;
    const { status, socket } = await connectTunnel('api.bank.test:443');
    expect(status).toBe(200);
    // The handshake is aborted: the client gets an error or a bare close, never a response.
    expect(await inTunnel(socket, 'evil.example', 'evil.example').catch(() => 0)).toBe(0);
    expect(upstream.requests.length).toBe(before);
  });

  it('an inner Host different from the CONNECT host gets 421; the allowlist applies inside the tunnel', async () => {
    const before = upstream.requests.length;
    const a = await connectTunnel('api.bank.test:443');
    expect(a.status).toBe(200);
    expect(await inTunnel(a.socket, 'api.bank.test', 'evil.example')).toBe(421);
    const b = await connectTunnel('api.bank.test:443');
    expect(b.status).toBe(200);
    expect(await inTunnel(b.socket, 'api.bank.test', 'api.bank.test', '/admin')).toBe(403);
    const c = await connectTunnel('api.bank.test:443');
    expect(c.status).toBe(200);
    expect(await inTunnel(c.socket, 'api.bank.test', 'api.bank.test')).toBe(200);
    expect(upstream.requests.length - before).toBe(1);
  });

  it('absolute-form http:// to a route\'s host (curl -x, no CONNECT) runs through the same checks', async () => {
    const before = upstream.requests.length;
    const { stdout } = await run('curl', ['-sS', '-x', `http://svc:${token}@127.0.0.1:${port}`, 'http://api.bank.test/accounts']);
    expect(JSON.parse(stdout)).toMatchObject({ method: 'GET', url: '/accounts' });
    expect(upstream.requests.at(-1)!.headers['x-api-key']).toBe(SECRET);
    const denied = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code}', '-x', `http://svc:${token}@127.0.0.1:${port}`, 'http://api.bank.test/admin']);
    expect(denied.stdout).toBe('403');
    const other = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code}', '-x', `http://svc:${token}@127.0.0.1:${port}`, 'http://evil.example/accounts']);
    expect(other.stdout).toBe('400');
    const dots = await run('curl', ['-sS', '--path-as-is', '-o', '/dev/null', '-w', '%{http_code}', '-x', `http://svc:${token}@127.0.0.1:${port}`, 'http://api.bank.test/x/../accounts']);
    expect(dots.stdout).toBe('400');
    expect(upstream.requests.length - before).toBe(1);
  });

  it('absolute-form without Proxy-Authorization (Java, .NET: credentials only when asked) gets a 407 challenge, audited; the retry with them is served', async () => {
    const { rawRequest } = await import('../helpers/raw.ts');
    const before = upstream.requests.length;
    const request = (auth: string) => rawRequest(port, `GET http://api.bank.test/accounts HTTP/1.1\r\nHost: api.bank.test\r\n${auth}Connection: close\r\n\r\n`);
    const challenged = await request('');
    expect(challenged).toMatch(/^HTTP\/1\.1 407 /);
    expect(challenged).toMatch(/\r\nproxy-authenticate: Basic realm="egress-proxy"\r\n/i);
    expect(challenged).toMatch(/\r\nx-egress-error: caller_unauthenticated\r\n/i);
    const id = /\r\nx-request-id: ([0-9a-f-]{36})\r\n/i.exec(challenged)?.[1];
    expect(id).toBeDefined();
    const body = JSON.parse(challenged.slice(challenged.indexOf('\r\n\r\n') + 4)) as { error: { code: string; request_id: string } };
    expect(body.error).toMatchObject({ code: 'caller_unauthenticated', request_id: id });
    // The retry on the same terms, as the client makes it after the challenge.
    const retried = await request(`Proxy-Authorization: Basic ${Buffer.from(`svc:${token}`).toString('base64')}\r\n`);
    expect(retried).toMatch(/^HTTP\/1\.1 200 /);
    expect(upstream.requests.length - before).toBe(1);
    // An unknown token in absolute form is the proxy's refusal too: 407, not the 401 an origin sends.
    expect(await request(`Proxy-Authorization: Basic ${Buffer.from('svc:egt_wrong').toString('base64')}\r\n`)).toMatch(/^HTTP\/1\.1 407 [^]*proxy-authenticate: Basic/i);
    await eventually(async () => (await proxy.auditText()).includes(id!), 3_000, 'the audit line');
    const line = (await proxy.auditText()).split('\n').find((l) => l.includes(id!))!;
    expect(JSON.parse(line)).toMatchObject({ caller: null, method: 'GET', path: '/accounts', decision: 'deny', reason: 'caller_unauthenticated' });
    // Not a proxy request: absolute-form for a host no route names, or with a reverse-mode token, is still a 400.
    expect(await rawRequest(port, 'GET http://evil.example/accounts HTTP/1.1\r\nHost: evil.example\r\n\r\n')).toMatch(/^HTTP\/1\.1 400 /);
    expect(await rawRequest(port, `GET http://api.bank.test/accounts HTTP/1.1\r\nHost: api.bank.test\r\nX-Egress-Token: ${token}\r\n\r\n`)).toMatch(/^HTTP\/1\.1 400 /);
    expect(upstream.requests.length - before).toBe(1);
  });

  it('a CONNECT without Proxy-Authorization gets the same 407 challenge as absolute form', async () => {
    const { rawRequest } = await import('../helpers/raw.ts');
    const answer = await rawRequest(port, 'CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\n\r\n');
    expect(answer).toMatch(/^HTTP\/1\.1 407 /);
    expect(answer).toMatch(/\r\nproxy-authenticate: Basic realm="egress-proxy"\r\n/i);
    expect(answer).toMatch(/\r\nx-egress-error: caller_unauthenticated\r\n/i);
    expect(answer).toMatch(/\r\nx-request-id: [0-9a-f-]{36}\r\n/i);
  });

  it('requests that merely carry no credentials (a client waiting for the challenge) are not counted as unknown-token attempts; unknown tokens are', async () => {
    const { rawRequest } = await import('../helpers/raw.ts');
    const unknownAlerts = () => proxy.services().rules.alerts.recent().filter((a) => a.id === 'unknown_token').length;
    const before = unknownAlerts();
    for (let i = 0; i < 12; i++) {
      expect(await rawRequest(port, 'CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\n\r\n')).toMatch(/^HTTP\/1\.1 407 /);
      expect(await rawRequest(port, 'GET http://api.bank.test/accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n')).toMatch(/^HTTP\/1\.1 407 /);
      expect((await fetch(`${proxy.url}/bank/accounts`)).status).toBe(401);
    }
    expect(unknownAlerts()).toBe(before);
    // Control: unknown tokens from the same address still raise the alert.
    for (let i = 0; i < 10; i++) expect(await rawRequest(port, `CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: Basic ${Buffer.from(`svc:egt_unknown_${i}`).toString('base64')}\r\n\r\n`)).toMatch(/^HTTP\/1\.1 407 /);
    expect(unknownAlerts()).toBe(before + 1);
  });

  it('an HTTP/1.0 absolute-form request without a Host header is served as the HTTP/1.1 one is: the host is in the target', async () => {
    const { rawRequest } = await import('../helpers/raw.ts');
    const before = upstream.requests.length;
    const auth = `Proxy-Authorization: Basic ${Buffer.from(`svc:${token}`).toString('base64')}\r\n`;
    const answer = await rawRequest(port, `GET http://api.bank.test/accounts HTTP/1.0\r\n${auth}\r\n`);
    expect(answer).toMatch(/^HTTP\/1\.1 200 /);
    expect(upstream.requests.length - before).toBe(1);
    expect(upstream.requests.at(-1)!.headers['x-api-key']).toBe(SECRET);
    // A Host that names another host is still refused, on HTTP/1.0 as on HTTP/1.1.
    expect(await rawRequest(port, `GET http://api.bank.test/accounts HTTP/1.0\r\nHost: evil.example\r\n${auth}\r\n`)).toMatch(/^HTTP\/1\.1 421 /);
    // And the allowlist still applies.
    expect(await rawRequest(port, `GET http://api.bank.test/admin HTTP/1.0\r\n${auth}\r\n`)).toMatch(/^HTTP\/1\.1 403 /);
    expect(upstream.requests.length - before).toBe(1);
  });

  it('a CONNECT that carries content (Content-Length or Transfer-Encoding) is refused with 400 and the connection closed; no tunnel is opened', async () => {
    const { rawRequest } = await import('../helpers/raw.ts');
    const auth = `Proxy-Authorization: Basic ${Buffer.from(`svc:${token}`).toString('base64')}\r\n`;
    for (const framing of ['Content-Length: 5\r\n\r\nhello', 'Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n']) {
      const started = Date.now();
      const answer = await rawRequest(port, `CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\n${auth}${framing}`, 5_000);
      // rawRequest returns on the proxy's close, or after 5 s of silence from a connection left open.
      expect(Date.now() - started).toBeLessThan(4_000);
      expect(answer, framing).toMatch(/^HTTP\/1\.1 400 /);
      expect(answer).toMatch(/\r\nx-egress-error: bad_request\r\n/i);
      expect(answer).toMatch(/\r\nconnection: close\r\n/i);
      // Exactly one answer.
      expect(answer.match(/HTTP\/1\.1 /g)).toHaveLength(1);
    }
    // Content-Length: 0 is no content: the tunnel opens.
    const t = await connectTunnel('api.bank.test:443', `Basic ${Buffer.from(`svc:${token}`).toString('base64')}\r\nContent-Length: 0`);
    expect(t.status).toBe(200);
    expect(await inTunnel(t.socket, 'api.bank.test', 'api.bank.test')).toBe(200);
  });

  it('a malformed percent-escape in Proxy-Authorization is refused, not a crash (CONNECT and absolute-form)', async () => {
    const bad = `Basic ${Buffer.from('svc:%E0%A4%A').toString('base64')}`;
    expect((await connectTunnel('api.bank.test:443', bad)).status).toBe(407);
    const { rawRequest } = await import('../helpers/raw.ts');
    expect(await rawRequest(port, `GET http://api.bank.test/accounts HTTP/1.1\r\nHost: api.bank.test\r\nProxy-Authorization: ${bad}\r\nConnection: close\r\n\r\n`)).toMatch(/^HTTP\/1\.1 407 /);
    expect((await connectTunnel('api.bank.test:443')).status).toBe(200);
  });

  it('an upstream with a base path: the provider URL\'s path is checked and sent relative to that base, not doubled; a path outside it is refused', async () => {
    const before = upstream.requests.length;
    // Reverse mode, for comparison: /sfin/accounts goes to <upstream>/simplefin/accounts.
    expect((await fetch(`${proxy.url}/sfin/accounts`, { headers: { 'x-egress-token': token } })).status).toBe(200);
    // Through HTTPS_PROXY the service calls the provider's own URL, https://simplefin.bank.test/simplefin/accounts.
    const t = await connectTunnel('simplefin.bank.test:443');
    expect(await inTunnel(t.socket, 'simplefin.bank.test', 'simplefin.bank.test', '/simplefin/accounts')).toBe(200);
    expect(upstream.requests.slice(before).map((r) => r.url)).toEqual(['/simplefin/accounts', '/simplefin/accounts']);
    expect(upstream.requests.at(-1)!.headers['x-api-key']).toBe(SECRET);
    for (const path of ['/accounts', '/simplefinx/accounts', '/other/simplefin/accounts', '/simplefin/simplefin/accounts', '/']) {
      const denied = await connectTunnel('simplefin.bank.test:443');
      expect(await inTunnel(denied.socket, 'simplefin.bank.test', 'simplefin.bank.test', path), path).toBe(403);
    }
    expect(upstream.requests.length - before).toBe(2);
    // routes explain judges the same URL the same way.
    const explained = await runCli(['routes', 'explain', '--caller', 'svc', '--json', 'GET', 'https://simplefin.bank.test/simplefin/accounts'], envFor(dir));
    expect(explained.code, explained.stdout + explained.stderr).toBe(0);
    expect(JSON.parse(explained.stdout)).toMatchObject({ decision: 'allow', mode: 'forward', path: '/accounts', upstream_url: `${upstream.url}/simplefin/accounts` });
    const outside = await runCli(['routes', 'explain', '--caller', 'svc', '--json', 'GET', 'https://simplefin.bank.test/accounts'], envFor(dir));
    expect(outside.code, outside.stdout + outside.stderr).toBe(1);
    expect(JSON.parse(outside.stdout)).toMatchObject({ decision: 'deny', status: 403, mode: 'forward' });
  });

  it('a request in a tunnel waits for a slow upstream as long as its route allows: the idle limit is for a tunnel with nothing in flight', async () => {
    const before = upstream.requests.length;
    const t = await connectTunnel('api.bank.test:443');
    const started = Date.now();
    // The first request of a fresh tunnel (a new tunnel per request is what curl and many clients do).
    expect(await inTunnel(t.socket, 'api.bank.test', 'api.bank.test', '/slow').catch(() => 0)).toBe(200);
    expect(Date.now() - started).toBeGreaterThan(TUNNEL_LIMITS.idleMs);
    expect(upstream.requests.length - before).toBe(1);
  }, TUNNEL_LIMITS.idleMs + 30_000);

  it('a caller that opens and closes tunnels faster than EGRESS_CALLER_CONNECT_RATE (each a TLS handshake for the proxy) gets 429 with Retry-After once its burst is spent, counted and audited; reverse mode and tunnels already open go on', async () => {
    const { rawRequest } = await import('../helpers/raw.ts');
    const auditLog = join(dir, 'audit-churn.log');
    const churn = await startTestProxy({ routes: {}, dir, env: { EGRESS_CERTS: join(dir, 'certs'), EGRESS_AUDIT_LOG: auditLog, EGRESS_CALLER_CONNECT_RATE: '1/min' } });
    const at = churn.proxy.proxyAddress.port;
    const auth = `Basic ${Buffer.from(`svc:${token}`).toString('base64')}`;
    try {
      const kept = await connectTunnel('api.bank.test:443', auth, at);
      expect(kept.status).toBe(200);
      // Never more than two open at once: the cap on open tunnels is not what refuses.
      for (let i = 1; i < TUNNEL_LIMITS.perCaller; i++) {
        const t = await connectTunnel('api.bank.test:443', auth, at);
        expect(t.status, `tunnel ${i + 1}`).toBe(200);
        if (i % 8 === 0) expect(await inTunnel(t.socket, 'api.bank.test', 'api.bank.test')).toBe(200);
        t.socket.destroy();
      }
      const refused = await rawRequest(at, `CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: ${auth}\r\n\r\n`);
      expect(refused).toMatch(/^HTTP\/1\.1 429 /);
      expect(refused).toMatch(/\r\nx-egress-error: rate_limited\r\n/i);
      const retryAfter = Number(/\r\nretry-after: (\d+)\r\n/i.exec(refused)?.[1]);
      expect(retryAfter).toBeGreaterThan(50);
      expect(retryAfter).toBeLessThanOrEqual(60);
      expect(refused).toContain('EGRESS_CALLER_CONNECT_RATE');
      // What the caller holds already keeps working, and so does reverse mode.
      expect(await inTunnel(kept.socket, 'api.bank.test', 'api.bank.test')).toBe(200);
      expect((await fetch(`${churn.url}/bank/accounts`, { headers: { 'x-egress-token': token } })).status).toBe(200);
      const metrics = await (await fetch(`${churn.admin}/metrics`)).text();
      expect(metrics).toContain('egress_rate_limited_total{route="bank"} 1');
      await eventually(async () => (await readFile(auditLog, 'utf8')).includes('"reason":"rate_limited"'), 3_000, 'the audit line');
      const lines = (await readFile(auditLog, 'utf8')).split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(lines.filter((l) => l.reason === 'rate_limited')).toEqual([expect.objectContaining({ method: 'CONNECT', caller: 'svc', route: 'bank', decision: 'deny', path: 'api.bank.test:443' })]);
    } finally {
      await churn.close();
    }
  }, 30_000);

  it('with the store unreachable, a CONNECT gets 503 credential_unavailable (as a reverse-mode request does), not a 407 that blames the caller\'s token', async () => {
    const { freePort } = await import('../helpers/redis.ts');
    const { rawRequest } = await import('../helpers/raw.ts');
    const down = await startTestProxy({ routes: {}, dir, store: `redis://127.0.0.1:${await freePort()}`, env: { EGRESS_CERTS: join(dir, 'certs'), EGRESS_AUDIT_LOG: join(dir, 'audit-store-down.log') } });
    try {
      const auth = `Basic ${Buffer.from(`svc:${token}`).toString('base64')}`;
      const answer = await rawRequest(down.proxy.proxyAddress.port, `CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: ${auth}\r\n\r\n`);
      expect(answer).toMatch(/^HTTP\/1\.1 503 /);
      expect(answer).toMatch(/\r\nx-egress-error: credential_unavailable\r\n/i);
      expect(answer).toMatch(/\r\nretry-after: 1\r\n/i);
      expect(answer).not.toMatch(/proxy-authenticate/i);
      // The same caller in reverse mode, for comparison.
      const reverse = await fetch(`${down.url}/bank/accounts`, { headers: { 'x-egress-token': token } });
      expect(reverse.status).toBe(503);
      expect(reverse.headers.get('x-egress-error')).toBe('credential_unavailable');
    } finally {
      await down.close();
    }
  }, 20_000);

  it('a host a route names after the CA was made (outside its name constraints) is refused at CONNECT with a message saying how to fix it, not given a leaf no client accepts', async () => {
    const file = join(dir, 'routes', 'later.yaml');
    await writeFile(file, apiKeyRoute({ name: 'later', upstream: upstream.url, extra: 'upstream_ca: ./server-ca.pem\nhosts: [api.later.test]\n', paths: ['/accounts'] }));
    try {
      await eventually(() => findRouteByHost(proxy.proxy.routes.config, 'api.later.test') !== undefined, 5_000, 'the reload');
      const before = upstream.requests.length;
      const { rawRequest } = await import('../helpers/raw.ts');
      const answer = await rawRequest(port, `CONNECT api.later.test:443 HTTP/1.1\r\nHost: api.later.test:443\r\nProxy-Authorization: Basic ${Buffer.from(`svc:${token}`).toString('base64')}\r\n\r\n`);
      expect(answer).toMatch(/^HTTP\/1\.1 403 /);
      expect(answer).toContain('certs init --refresh');
      expect(proxy.logs()).toContain('api.later.test');
      expect(proxy.logs()).toContain('certs init --refresh');
      expect(proxy.proxy.minter!.minted()).not.toContain('api.later.test');
      // The hosts the CA covers are served as before.
      const t = await connectTunnel('api.bank.test:443');
      expect(await inTunnel(t.socket, 'api.bank.test', 'api.bank.test')).toBe(200);
      expect(upstream.requests.length - before).toBe(1);
    } finally {
      await rm(file);
      await eventually(() => findRouteByHost(proxy.proxy.routes.config, 'api.later.test') === undefined, 5_000, 'the reload');
    }
  });

  it('without a CA, CONNECT is refused outright', async () => {
    const other = await makeTempDir('egress-noca-');
    await mkdir(join(other, 'certs'));
    const { tokens } = await seedDataDir(other, { routes: {}, callers: ['svc'] });
    const p = await startTestProxy({ routes: {}, dir: other, env: { EGRESS_CERTS: join(other, 'certs') } });
    try {
      const res = await new Promise<string>((resolve) => {
        const s = connect(p.proxy.proxyAddress.port, '127.0.0.1', () => s.write(`CONNECT api.bank.test:443 HTTP/1.1\r\nProxy-Authorization: Basic ${Buffer.from(`svc:${tokens.svc}`).toString('base64')}\r\n\r\n`));
        let buf = '';
        s.on('data', (d: Buffer) => (buf += d.toString()));
        s.on('close', () => resolve(buf));
      });
      expect(res).toMatch(/^HTTP\/1\.1 403/);
    } finally {
      await p.close();
    }
  });
});
