import { execFile } from 'node:child_process';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTestPki } from '../helpers/tls.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { rawRequest, startLab, statuses, type Lab } from './lab.ts';
import { bankRoute, basic, connectTunnel, exchange, makeCerts, peer, tlsInTunnel } from './sec-helpers.ts';

/** MITM: the interception mode re-checks every inner request, mints narrow leaves and verifies upstream TLS. */
const run = promisify(execFile);
let lab: Lab;
let caPem: string;
let certsDir: string;
let authA: string;
const bad: Record<string, Upstream> = {};
let goodCaPath = '';

const tlsRoute = (name: string, url: string, ca: boolean) => `name: ${name}
prefix: /${name}
upstream: ${url}
${ca ? `upstream_ca: ${goodCaPath}\n` : ''}allow_private_addresses: true
credential: plaid
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
timeouts: { connect: 2s, response: 3s }
allow:
  - caller: a
    methods: [GET]
    paths: [/x]
`;

beforeAll(async () => {
  const made = await makeCerts(['api.bank.test']);
  caPem = made.caPem;
  certsDir = made.certs;
  const selfSigned = makeTestPki(); // its CA is not trusted by the route
  const expired = makeTestPki({ commonName: 'sec CA expired', notBeforeMs: -2 * 86_400_000, notAfterMs: -86_400_000 });
  const wrongHost = makeTestPki({ commonName: 'sec CA wronghost', dnsNames: ['other.test'], ips: [] });
  const good = makeTestPki({ commonName: 'sec CA good' });
  bad.good = await startUpstream((_req, res) => res.end('{}'), { key: good.serverKey, cert: good.serverCert });
  bad.untrusted = await startUpstream(undefined, { key: selfSigned.serverKey, cert: selfSigned.serverCert });
  bad.expired = await startUpstream(undefined, { key: expired.serverKey, cert: expired.serverCert });
  bad.wronghost = await startUpstream(undefined, { key: wrongHost.serverKey, cert: wrongHost.serverCert });
  const { writeFile } = await import('node:fs/promises');
  // The expired and wrong-host routes trust their issuing CA, so only the cert's own defect fails.
  goodCaPath = join(made.dir, 'good-ca.pem');
  await writeFile(goodCaPath, `${expired.caCert}${wrongHost.caCert}${good.caCert}`);
  lab = await startLab({
    env: { EGRESS_CERTS: certsDir },
    routes: (u) => ({
      bank: bankRoute(u.url),
      untrusted: tlsRoute('untrusted', bad.untrusted!.url, false),
      expired: tlsRoute('expired', bad.expired!.url.replace('127.0.0.1', 'localhost'), true),
      wronghost: tlsRoute('wronghost', bad.wronghost!.url, true),
      good: tlsRoute('good', bad.good!.url, true),
    }),
  });
  authA = basic('a', lab.tokens.a);
}, 60_000);

afterAll(async () => {
  await lab?.close();
  for (const u of Object.values(bad)) await u.close();
});

/** A proxy to talk to: the main lab unless given (MITM-04 and MITM-06 use one with two listed hosts). */
type Site = { lab: Lab; ca: string; auth: string };

async function inner(bytes: string, servername = 'api.bank.test', site: Site = { lab, ca: caPem, auth: authA }): Promise<string> {
  const t = await connectTunnel(site.lab.port, 'api.bank.test:443', site.auth);
  expect(t.status).toBe(200);
  const tls = await tlsInTunnel(t.socket, servername, site.ca);
  const out = await exchange(tls, bytes);
  site.lab.seen(out);
  return out;
}

/** A handshake in a fresh tunnel to api.bank.test without the host-name check: the leaf it got, or the handshake error. */
async function handshake(site: Site, options: { servername?: string; ALPNProtocols?: string[] }): Promise<{ san?: string; alpn?: string | false | null; error?: string; tls?: TLSSocket }> {
  const t = await connectTunnel(site.lab.port, 'api.bank.test:443', site.auth);
  expect(t.status).toBe(200);
  return new Promise((resolve) => {
    const tls: TLSSocket = tlsConnect({ socket: t.socket, ca: site.ca, checkServerIdentity: () => undefined, ...options }, () => resolve({ san: peer(tls).subjectaltname, alpn: tls.alpnProtocol, tls }));
    tls.on('error', (err: NodeJS.ErrnoException) => resolve({ error: err.code ?? err.message }));
  });
}

describe('MITM', () => {
  it('MITM-00 control: a well-formed inner request reaches U once with the credential', async () => {
    const mark = lab.u.requests.length;
    expect(statuses(await inner('GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n'))).toEqual([200]);
    expect(lab.u.requests.length - mark).toBe(1);
    await lab.g0(mark, 1);
  });

  it('MITM-01 inner Host different from the CONNECT host gets 421; nothing reaches U or E', async () => {
    const mark = lab.u.requests.length;
    for (const host of ['evil.example', `127.0.0.1:${lab.e.port}`, 'api.bank.test.evil.example', 'api.bank.test.', 'evilapi.bank.test', `localhost:${lab.u.port}`]) {
      const out = await inner(`GET /accounts HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`);
      expect(statuses(out), host).toEqual([421]);
    }
    expect(lab.e.requests).toHaveLength(0);
    await lab.g0(mark, 0);
  });

  it('MITM-01b absolute-form inner targets, duplicate or missing Host are refused', async () => {
    const mark = lab.u.requests.length;
    for (const bytes of [
      `GET https://evil.example/accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n`,
      `GET http://evil.example/accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n`,
      `GET https://api.bank.test/accounts HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n`,
      `GET http://127.0.0.1:${lab.e.port}/accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n`,
      `GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\nHost: evil.example\r\nConnection: close\r\n\r\n`,
      `GET /accounts HTTP/1.1\r\nConnection: close\r\n\r\n`,
    ]) {
      const s = statuses(await inner(bytes));
      expect(s.length, bytes).toBeLessThanOrEqual(1);
      if (s.length) expect([400, 421], bytes).toContain(s[0]);
    }
    expect(lab.e.requests).toHaveLength(0);
    await lab.g0(mark, 0);
  });

  it('MITM-01c the ACL is re-checked on every request of a keep-alive tunnel', async () => {
    const mark = lab.u.requests.length;
    const out = await inner(
      'GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\n\r\n' +
        'GET /admin HTTP/1.1\r\nHost: api.bank.test\r\n\r\n' +
        'GET /accounts HTTP/1.1\r\nHost: evil.example\r\n\r\n' +
        'DELETE /accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n',
    );
    const s = statuses(out);
    expect(s[0]).toBe(200);
    expect(s[1]).toBe(403);
    // After the 421 the proxy may close the tunnel; whatever follows is never allowed.
    expect(s[2]).toBe(421);
    if (s.length > 3) expect(s[3]).toBe(403);
    expect(lab.u.requests.length - mark).toBe(1);
    await lab.g0(mark, 1);
  });

  it('MITM-01d two Proxy-Authorization headers (two callers) are refused, on CONNECT with 407 and in absolute form with 400, in either order; nothing reaches U', async () => {
    const mark = lab.u.requests.length;
    const authB = basic('b', lab.tokens.b);
    for (const [first, second] of [[authA, authB], [authB, authA], [authA, authA]]) {
      const t = await connectTunnel(lab.port, 'api.bank.test:443', `${first}\r\nProxy-Authorization: ${second}`);
      t.socket.destroy();
      expect(t.status).toBe(407);
      expect(t.head).toContain('More than one Proxy-Authorization');
      const raw = await rawRequest(lab.port, `GET http://api.bank.test/accounts HTTP/1.1\r\nHost: api.bank.test\r\nProxy-Authorization: ${first}\r\nProxy-Authorization: ${second}\r\nConnection: close\r\n\r\n`);
      lab.seen(raw);
      expect(statuses(raw)).toEqual([400]);
    }
    expect(lab.u.requests.length).toBe(mark);
  });

  it('MITM-02 the TLS SNI must name the CONNECT host', async () => {
    const mark = lab.u.requests.length;
    for (const sni of ['evil.example', 'api.bank.test.evil.example', 'localhost']) {
      const t = await connectTunnel(lab.port, 'api.bank.test:443', authA);
      expect(t.status).toBe(200);
      await expect(tlsInTunnel(t.socket, sni, caPem), sni).rejects.toThrow();
      t.socket.destroy();
    }
    // Case of the SNI does not matter; the leaf is the CONNECT host's.
    const t = await connectTunnel(lab.port, 'api.bank.test:443', authA);
    const tls = await tlsInTunnel(t.socket, 'API.BANK.TEST', caPem);
    expect(peer(tls).subjectaltname).toBe('DNS:api.bank.test');
    tls.destroy();
    await lab.g0(mark, 0);
  });

  it('MITM-03 bad upstream certificate (untrusted, expired, wrong host): 502, no request and no credential sent', async () => {
    const env = (await readFile(`/proc/${lab.serve.child.pid}/environ`, 'latin1')).split('\0');
    expect(env.some((e) => e.startsWith('NODE_TLS_REJECT_UNAUTHORIZED='))).toBe(false);
    const mark = lab.u.requests.length;
    // Control: the same set-up with a valid certificate works, so the 502s below are the certificates' fault.
    const ok = await fetch(`${lab.url}/good/x`, { headers: { 'x-egress-token': lab.tokens.a } });
    lab.seen(await ok.text());
    expect(ok.status).toBe(200);
    expect(bad.good!.requests).toHaveLength(1);
    for (const name of ['untrusted', 'expired', 'wronghost']) {
      const res = await fetch(`${lab.url}/${name}/x`, { headers: { 'x-egress-token': lab.tokens.a } });
      const body = await res.text();
      lab.seen(body + JSON.stringify([...res.headers]));
      expect(res.status, `${name}: ${body}`).toBe(502);
      expect(res.headers.get('x-egress-error')).toBe('upstream_error');
      expect(bad[name]!.requests, name).toHaveLength(0);
    }
    await lab.g0(mark, 0);
  });

  it('MITM-05 minted leaves: one day at most, only the listed host, issued by the name-constrained CA', async () => {
    const t = await connectTunnel(lab.port, 'api.bank.test:443', authA);
    const tls = await tlsInTunnel(t.socket, 'api.bank.test', caPem);
    const leaf = peer(tls);
    tls.destroy();
    expect(leaf.subjectaltname).toBe('DNS:api.bank.test');
    const life = Date.parse(leaf.valid_to) - Date.parse(leaf.valid_from);
    expect(life).toBeGreaterThan(0);
    expect(life).toBeLessThanOrEqual(26 * 3_600_000);
    expect(Date.parse(leaf.valid_to)).toBeLessThanOrEqual(Date.now() + 26 * 3_600_000);
    expect(leaf.ca).toBe(false);
    const { stdout } = await run('openssl', ['x509', '-in', join(certsDir, 'ca.pem'), '-noout', '-text']);
    expect(stdout).toMatch(/X509v3 Name Constraints: critical\s+Permitted:\s+DNS:api\.bank\.test\s+DNS:localhost\s*\n\s*X509v3|X509v3 Name Constraints: critical\s+Permitted:\s+DNS:api\.bank\.test\s+DNS:localhost\s*$/m);
    expect(stdout).not.toMatch(/Permitted:[\s\S]*IP:/);
    await lab.g0();
  });

  it('MITM-05b the CA key is 0600, never served by the admin or proxy listeners, never logged', async () => {
    expect((await stat(join(certsDir, 'ca.key'))).mode & 0o777).toBe(0o600);
    const keyPem = await readFile(join(certsDir, 'ca.key'), 'utf8');
    const keyBody = keyPem.split('\n').filter((l) => l && !l.startsWith('-----')).join('');
    const needles = [keyBody.slice(0, 40), keyBody.slice(-40), 'PRIVATE KEY'];
    const texts: string[] = [];
    for (const path of ['/', '/healthz', '/readyz', '/metrics', '/ca.key', '/certs/ca.key', '/ca.pem', '/v1/credentials', '/../certs/ca.key', '/status']) {
      for (const base of [lab.admin, lab.url]) {
        const res = await fetch(`${base}${path}`);
        texts.push(await res.text(), JSON.stringify([...res.headers]));
      }
    }
    texts.push(lab.serve.output(), await readFile(join(lab.dir, 'audit.log'), 'utf8'));
    for (const n of needles) expect(texts.some((t) => t.includes(n)), n).toBe(false);
    await lab.g0();
  });

  it('MITM-07 a TLS 1.2 renegotiation inside a tunnel is refused, as on the TLS listener; the next tunnel is served', async () => {
    // The TLS listener refuses renegotiation; the tunnels' TLS sockets took every one, without even
    // Node's limit of three per ten minutes: a caller could make the proxy run full handshakes
    // again and again on one tunnel.
    const t = await connectTunnel(lab.port, 'api.bank.test:443', authA);
    expect(t.status).toBe(200);
    const tls = tlsConnect({ socket: t.socket, servername: 'api.bank.test', ca: caPem, maxVersion: 'TLSv1.2' });
    await new Promise<void>((resolve, reject) => tls.once('secureConnect', resolve).once('error', reject));
    expect(tls.getProtocol()).toBe('TLSv1.2');
    const outcome = await new Promise<string>((resolve) => {
      tls.on('error', () => {});
      tls.on('data', () => {});
      tls.once('close', () => resolve('closed'));
      // A renegotiation the proxy took would call back without an error and keep the tunnel.
      tls.renegotiate({ rejectUnauthorized: true }, (err) => {
        if (!err) resolve('renegotiated');
      });
      tls.write('GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\n\r\n');
      setTimeout(() => resolve('not renegotiated'), 3_000).unref();
    });
    tls.destroy();
    expect(outcome).not.toBe('renegotiated');
    const out = await inner('GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n');
    expect(out.split('\r\n')[0]).toBe('HTTP/1.1 200 OK');
    await lab.g0();
  });

  it('MITM-09 protocol floor inside a tunnel, as on the TLS listener: TLS 1.0/1.1, and TLS 1.2 suites that are not AEAD or lack forward secrecy, fail the handshake; TLS 1.3 and an ECDHE AEAD TLS 1.2 suite are served', async () => {
    const attempt = async (opts: object): Promise<string> => {
      const t = await connectTunnel(lab.port, 'api.bank.test:443', authA);
      expect(t.status).toBe(200);
      return new Promise<string>((resolve) => {
        const s = tlsConnect({ socket: t.socket, servername: 'api.bank.test', ca: caPem, ...opts }, () => {
          resolve(`connected ${s.getProtocol()} ${s.getCipher().name}`);
          s.destroy();
        });
        s.on('error', (e) => resolve(`refused: ${e.message}`));
      });
    };
    for (const opts of [
      { minVersion: 'TLSv1', maxVersion: 'TLSv1', ciphers: 'DEFAULT@SECLEVEL=0' },
      { minVersion: 'TLSv1.1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0' },
      // CBC with HMAC, with and without forward secrecy, and GCM with RSA key exchange: all in Node's default TLS 1.2 list.
      { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2', ciphers: 'AES128-SHA:AES256-SHA:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384:AES128-SHA256:AES256-GCM-SHA384' },
    ]) expect(await attempt(opts), JSON.stringify(opts)).toMatch(/^refused/);
    expect(await attempt({ minVersion: 'TLSv1.3' })).toMatch(/^connected TLSv1.3/);
    expect(await attempt({ maxVersion: 'TLSv1.2', ciphers: 'ECDHE-RSA-AES128-GCM-SHA256' })).toBe('connected TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256');
    await lab.g0();
  });
});

describe('MITM, requests inside a tunnel that do not parse', () => {
  it('MITM-08 bytes that do not parse, pipelined behind an allowed request: its answer comes first, then a 400 with X-Request-Id, X-Egress-Error and a JSON body, as on the plain listener', async () => {
    const mark = lab.u.requests.length;
    // Answered at once, the 400 went out before the first request's answer and the tunnel was cut:
    // the caller read "400" for a request the upstream had received.
    const out = await inner('POST /accounts HTTP/1.1\r\nHost: api.bank.test\r\nContent-Length: 2\r\n\r\n{}GET /accounts HTTP/1.1\r\nHost : api.bank.test\r\n\r\n');
    expect(statuses(out)).toEqual([200, 400]);
    expect(lab.u.requests.length - mark).toBe(1);
    const refusal = out.slice(out.indexOf('HTTP/1.1 400'));
    expect(refusal).toMatch(/\r\nx-egress-error: bad_request\r\n/i);
    expect(refusal).toMatch(/\r\nx-request-id: [0-9a-f-]{36}\r\n/i);
    expect(JSON.parse(refusal.slice(refusal.indexOf('\r\n\r\n') + 4))).toMatchObject({ error: { code: 'bad_request' } });
    await lab.g0(mark, 1);
  });

  it('MITM-08b a header block over the limit inside a tunnel gets a 431 with X-Request-Id and X-Egress-Error', async () => {
    const mark = lab.u.requests.length;
    const out = await inner(`GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\nX-Big: ${'a'.repeat(20 * 1024)}\r\n\r\n`);
    expect(statuses(out)).toEqual([431]);
    expect(out).toMatch(/\r\nx-egress-error: bad_request\r\n/i);
    expect(out).toMatch(/\r\nx-request-id: [0-9a-f-]{36}\r\n/i);
    await lab.g0(mark, 0);
  });
});

/** Forward mode with two listed hosts (the main lab's CA is constrained to api.bank.test alone: MITM-05). */
describe('MITM, two listed hosts', () => {
  let site: Site;

  beforeAll(async () => {
    const made = await makeCerts(['api.bank.test', 'api.other.test']);
    const two = await startLab({
      env: { EGRESS_CERTS: made.certs },
      routes: (u) => ({
        bank: bankRoute(u.url),
        other: bankRoute(u.url).replace('name: bank', 'name: other').replace('prefix: /bank', 'prefix: /other').replace(/api\.bank\.test/g, 'api.other.test'),
      }),
    });
    site = { lab: two, ca: made.caPem, auth: basic('a', two.tokens.a) };
  }, 60_000);

  afterAll(async () => {
    await site?.lab.close();
  });

  it('MITM-04 no SNI gets the CONNECT host\'s leaf and the inner Host is still checked; another listed host as SNI fails the handshake; ALPN never selects h2', async () => {
    const { lab } = site;
    const mark = lab.u.requests.length;
    const noSni = await handshake(site, { servername: '' });
    expect(noSni).toMatchObject({ san: 'DNS:api.bank.test' });
    const out = await exchange(noSni.tls!, 'GET /accounts HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n');
    lab.seen(out);
    expect(statuses(out)).toEqual([421]);
    // Control for the SNI check: api.other.test's own tunnel does get its leaf.
    const t = await connectTunnel(lab.port, 'api.other.test:443', site.auth);
    const other = await tlsInTunnel(t.socket, 'api.other.test', site.ca);
    expect(peer(other).subjectaltname).toBe('DNS:api.other.test');
    other.destroy();
    const crossed = await handshake(site, { servername: 'api.other.test' });
    crossed.tls?.destroy();
    expect(crossed.error, JSON.stringify(crossed.san)).toBeDefined();
    const h2 = await handshake(site, { servername: 'api.bank.test', ALPNProtocols: ['h2'] });
    h2.tls?.destroy();
    expect(h2.alpn, JSON.stringify({ ...h2, tls: undefined })).not.toBe('h2');
    const both = await handshake(site, { servername: 'api.bank.test', ALPNProtocols: ['h2', 'http/1.1'] });
    both.tls?.destroy();
    expect(both).toMatchObject({ alpn: 'http/1.1' });
    await lab.g0(mark, 0);
  });

  it('MITM-06 inside a tunnel: HTTP/1.0 without Host, another listed host, a wrong port, a nested CONNECT, an Upgrade and an h2 preface reach nobody', async () => {
    const { lab } = site;
    // Control: the same tunnel serves a well-formed request.
    expect(statuses(await inner('GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n', undefined, site))).toEqual([200]);
    const mark = lab.u.requests.length;
    expect(statuses(await inner('GET /accounts HTTP/1.0\r\n\r\n', undefined, site))).toEqual([421]);
    expect(statuses(await inner('GET /accounts HTTP/1.1\r\nHost: api.other.test\r\nConnection: close\r\n\r\n', undefined, site))).toEqual([421]);
    expect(statuses(await inner('GET /accounts HTTP/1.1\r\nHost: api.bank.test:8443\r\nConnection: close\r\n\r\n', undefined, site))).toEqual([421]);
    for (const bytes of [
      `CONNECT 127.0.0.1:${lab.e.port} HTTP/1.1\r\nHost: 127.0.0.1:${lab.e.port}\r\n\r\n`,
      `CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\n\r\n`,
      'GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n',
      'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n',
    ]) {
      const out = await inner(bytes, undefined, site);
      expect(out, bytes).not.toMatch(/^HTTP\/1\.[01] (1\d\d|2\d\d)/m);
    }
    expect(lab.e.requests).toHaveLength(0);
    await lab.g0(mark, 0);
  });
});
