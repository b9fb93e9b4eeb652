import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { connect as tlsConnect } from 'node:tls';
import { join } from 'node:path';
import { promisify } from 'node:util';
import forge from 'node-forge';
import { Agent, request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CALLER_URI_PREFIX } from '../../src/certs/ca.ts';
import { runCli, startServe } from '../helpers/cli.ts';
import { exchangeOn, statuses } from '../helpers/raw.ts';
import { RawConnection } from '../security/raw-socket.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { makeTestPki } from '../helpers/tls.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** The TLS listener: callers identified by a client certificate from the egress CA. */
const run = promisify(execFile);
const SECRET = 'sk_mtls_caller_CANARY_77';
let upstream: Upstream;
let proxy: TestProxy;
let dir: string;
let serverCa: string;
let url: string;
let caKey: forge.pki.rsa.PrivateKey;
let caCert: forge.pki.Certificate;
let svcToken: string;
let seededZedToken: string;

function issue(opts: { cn?: string; uris?: string[]; sans?: { type: number; value: string }[]; subject?: { name: string; value: string }[]; ca?: boolean; signer?: { cert: forge.pki.Certificate; key: forge.pki.rsa.PrivateKey }; selfSigned?: boolean; eku?: 'client' | 'server'; fromMs?: number; toMs?: number; serial?: string; keys?: forge.pki.rsa.KeyPair; keyUsage?: Record<string, boolean> }) {
  // Keys made beforehand (opts.keys) keep a short validity from being spent on key generation.
  const keys = opts.keys ?? forge.pki.rsa.generateKeyPair(2048);
  const cert = forge.pki.createCertificate();
  cert.publicKey = keys.publicKey;
  cert.serialNumber = opts.serial ?? `7${Math.floor(Math.random() * 1e12).toString(16)}`;
  cert.validity.notBefore = new Date(Date.now() + (opts.fromMs ?? -60_000));
  cert.validity.notAfter = new Date(Date.now() + (opts.toMs ?? 86_400_000));
  cert.setSubject(opts.subject ?? [{ name: 'commonName', value: opts.cn ?? 'svc' }]);
  const signer = opts.selfSigned ? { cert, key: keys.privateKey } : (opts.signer ?? { cert: caCert, key: caKey });
  cert.setIssuer(signer.cert.subject.attributes);
  const altNames = opts.sans ?? (opts.uris ?? []).map((value) => ({ type: 6, value }));
  cert.setExtensions([
    { name: 'basicConstraints', cA: opts.ca ?? false, critical: true },
    ...(opts.ca ? [{ name: 'keyUsage', ...(opts.keyUsage ?? { keyCertSign: true, digitalSignature: true }), critical: true }] : [{ name: 'extKeyUsage', ...(opts.eku === 'server' ? { serverAuth: true } : { clientAuth: true }) }]),
    ...(altNames.length > 0 ? [{ name: 'subjectAltName', altNames }] : []),
  ]);
  cert.sign(signer.key, forge.md.sha256.create());
  return { cert, key: keys.privateKey, certPem: forge.pki.certificateToPem(cert), keyPem: forge.pki.privateKeyToPem(keys.privateKey) };
}

beforeAll(async () => {
  upstream = await startUpstream();
  dir = await makeTempDir('egress-tls-');
  const pki = makeTestPki();
  serverCa = pki.caCert;
  const seeded = await seedDataDir(dir, {
    routes: {
      api: `name: api\nprefix: /api\nupstream: ${upstream.url}\nallow_private_addresses: true\ncredential: key\ninject:\n  scheme: headers\n  headers:\n    X-Api-Key: "{secret}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/x]\n  - caller: other\n    methods: [GET]\n    paths: [/x]\n  - caller: zed\n    methods: [GET]\n    paths: [/x]\n  - caller: team.sync\n    methods: [GET]\n    paths: [/x]\n`,
      strict: `name: strict\nprefix: /strict\nupstream: ${upstream.url}\nallow_private_addresses: true\nrequire_client_cert: true\ncredential: key\ninject:\n  scheme: bearer\n  token: "{secret}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/x]\n  - caller: zed\n    methods: [GET]\n    paths: [/x]\n`,
    },
    credentials: { key: { secret: SECRET } },
    callers: ['svc', 'zed', 'team.sync'],
  });
  svcToken = seeded.tokens.svc!;
  seededZedToken = seeded.tokens.zed!;
  await writeFile(join(dir, 'server.pem'), pki.serverCert);
  await writeFile(join(dir, 'server.key'), pki.serverKey, { mode: 0o600 });
  const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
  expect((await runCli(['certs', 'init'], env)).code).toBe(0);
  expect((await runCli(['certs', 'issue-caller', 'svc'], env)).code).toBe(0);
  expect((await runCli(['certs', 'issue-caller', 'zed'], env)).code).toBe(0);
  caKey = forge.pki.privateKeyFromPem(await readFile(join(dir, 'certs', 'ca.key'), 'utf8')) as forge.pki.rsa.PrivateKey;
  caCert = forge.pki.certificateFromPem(await readFile(join(dir, 'certs', 'ca.pem'), 'utf8'));
  proxy = await startTestProxy({ routes: {}, dir, env: { EGRESS_CERTS: join(dir, 'certs'), EGRESS_TLS_LISTEN: '127.0.0.1:0', EGRESS_TLS_CERT: join(dir, 'server.pem'), EGRESS_TLS_KEY: join(dir, 'server.key') } });
  url = `https://127.0.0.1:${proxy.proxy.tlsAddress!.port}`;
}, 60_000);

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

async function call(path: string, client?: { cert: string; key: string }, headers: Record<string, string> = {}, agent?: Agent, base = url): Promise<number> {
  const dispatcher = agent ?? new Agent({ connect: { ca: serverCa, ...(client ? { cert: client.cert, key: client.key } : {}) } });
  try {
    const res = await request(`${base}${path}`, { dispatcher, headers });
    await res.body.dump();
    return res.statusCode;
  } finally {
    if (!agent) await dispatcher.close();
  }
}

/** A second TLS listener on the same data folder, pinned to another EGRESS_CLIENT_CA (its own audit log). */
async function listenerWith(label: string, clientCaPem: string): Promise<{ proxy: TestProxy; port: number; url: string }> {
  const path = join(dir, `client-ca-${label}.pem`);
  await writeFile(path, clientCaPem);
  const own = await startTestProxy({ routes: {}, dir, env: { EGRESS_CERTS: join(dir, 'certs'), EGRESS_TLS_LISTEN: '127.0.0.1:0', EGRESS_TLS_CERT: join(dir, 'server.pem'), EGRESS_TLS_KEY: join(dir, 'server.key'), EGRESS_CLIENT_CA: path, EGRESS_AUDIT_LOG: join(dir, `audit-${label}.log`) } });
  const port = own.proxy.tlsAddress!.port;
  return { proxy: own, port, url: `https://127.0.0.1:${port}` };
}

const svcFiles = async () => ({ cert: await readFile(join(dir, 'certs', 'callers', 'svc.pem'), 'utf8'), key: await readFile(join(dir, 'certs', 'callers', 'svc.key'), 'utf8') });

describe('TLS listener with client certificates', () => {
  it('identifies the caller by its certificate alone; the credential is attached; identity headers are stripped', async () => {
    const before = upstream.requests.length;
    expect(await call('/api/x', await svcFiles(), { 'x-forwarded-client-cert': 'By=spiffe://corp/admin', 'x-caller-id': 'admin' })).toBe(200);
    const seen = upstream.requests.slice(before);
    expect(seen[0]!.headers['x-api-key']).toBe(SECRET);
    expect(seen[0]!.headers['x-forwarded-client-cert']).toBeUndefined();
    expect(seen[0]!.headers['x-caller-id']).toBeUndefined();
    expect((await readFile(join(dir, 'certs', 'callers', 'svc.pem'), 'utf8')).length).toBeGreaterThan(0);
  });

  it('tokens still work on this listener, but a route may require a certificate', async () => {
    expect(await call('/api/x', undefined, { 'x-egress-token': svcToken })).toBe(200);
    expect(await call('/strict/x', undefined, { 'x-egress-token': svcToken })).toBe(403);
    expect(await call('/strict/x', await svcFiles())).toBe(200);
  });

  it('a route that requires a certificate serves a caller that presents its certificate and also sends its own token; another caller\'s token beside it is not the certificate\'s caller', async () => {
    // Clients that set X-Egress-Token for every request (one setting for both listeners) and present a certificate.
    const before = upstream.requests.length;
    expect(await call('/strict/x', await svcFiles(), { 'x-egress-token': svcToken })).toBe(200);
    expect(upstream.requests.length - before).toBe(1);
    // zed may use the route, but only with a certificate of its own: svc's beside zed's token names two callers.
    expect(await call('/strict/x', await svcFiles(), { 'x-egress-token': seededZedToken })).toBe(401);
    expect(upstream.requests.length - before).toBe(1);
  });

  it.each([
    ['from another CA', () => { const other = makeTestPki({ commonName: 'rogue CA' }); return { cert: other.serverCert, key: other.serverKey }; }],
    ['expired', () => { const c = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`], fromMs: -2 * 86_400_000, toMs: -86_400_000 }); return { cert: c.certPem, key: c.keyPem }; }],
    ['a CN that disagrees with its identity SAN', () => { const c = issue({ cn: 'admin', uris: [`${CALLER_URI_PREFIX}svc`] }); return { cert: c.certPem, key: c.keyPem }; }],
    ['two identity SANs', () => { const c = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`, `${CALLER_URI_PREFIX}admin`] }); return { cert: c.certPem, key: c.keyPem }; }],
    ['a CA:TRUE leaf that signed a second identity', () => {
      const rogue = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`], ca: true });
      const minted = issue({ cn: 'other', uris: [`${CALLER_URI_PREFIX}other`], signer: rogue });
      return { cert: `${minted.certPem}${rogue.certPem}`, key: minted.keyPem };
    }],
  ])('refuses a certificate %s', async (_what, make) => {
    const before = upstream.requests.length;
    const status = await call('/api/x', make()).catch(() => 0);
    expect([0, 401]).toContain(status);
    expect(upstream.requests.length).toBe(before);
  });

  const id = (name: string) => ({ type: 6, value: `${CALLER_URI_PREFIX}${name}` });
  const caSubject = () => caCert.subject.attributes.map((a) => ({ name: a.name!, value: String(a.value) }));

  it.each([
    ['not yet valid', () => issue({ sans: [id('svc')], fromMs: 3_600_000 })],
    ['self-signed, claiming the egress CA as issuer', () => issue({ sans: [id('svc')], selfSigned: true, subject: caSubject() })],
    ['EKU serverAuth only', () => issue({ sans: [id('svc')], eku: 'server' })],
    ['no SAN, only CN=svc', () => issue({ cn: 'svc' })],
    ['identity URI with another prefix', () => issue({ sans: [{ type: 6, value: 'spiffe://corp/svc' }] })],
    ['identity URI prefix in upper case', () => issue({ sans: [{ type: 6, value: `${CALLER_URI_PREFIX.toUpperCase()}svc` }] })],
    ['the identity as a DNS SAN', () => issue({ sans: [{ type: 2, value: 'svc' }] })],
    ['one URI SAN whose value embeds ", URI:" and a second identity', () => issue({ cn: 'svc', sans: [{ type: 6, value: `${CALLER_URI_PREFIX}svc, URI:${CALLER_URI_PREFIX}svc` }] })],
    ['a CN that smuggles a newline and "CN=svc"', () => issue({ cn: 'x\nCN=svc', sans: [id('svc')] })],
    ['"CN=svc" inside another attribute', () => issue({ subject: [{ name: 'organizationalUnitName', value: 'CN=svc' }, { name: 'commonName', value: 'zz' }], sans: [id('svc')] })],
  ])('AUTH-08 refuses a certificate: %s (401 or handshake failure, nothing at U)', async (_what, make) => {
    const c = make();
    const before = upstream.requests.length;
    expect([0, 401]).toContain(await call('/api/x', { cert: c.certPem, key: c.keyPem }).catch(() => 0));
    expect(upstream.requests.length).toBe(before);
  });

  it('AUTH-08b chains: a rogue root with the egress CA\'s exact subject, and a real intermediate under the egress CA, are refused', async () => {
    const rogue = issue({ ca: true, selfSigned: true, subject: caSubject() });
    const viaRogue = issue({ sans: [id('svc')], signer: rogue });
    const inter = issue({ cn: 'intermediate', ca: true });
    const viaInter = issue({ sans: [id('svc')], signer: inter });
    const before = upstream.requests.length;
    expect([0, 401]).toContain(await call('/api/x', { cert: viaRogue.certPem + rogue.certPem, key: viaRogue.keyPem }).catch(() => 0));
    expect([0, 401]).toContain(await call('/api/x', { cert: viaInter.certPem + inter.certPem, key: viaInter.keyPem }).catch(() => 0));
    expect(upstream.requests.length).toBe(before);
  });

  it('AUTH-08d a certificate from an earlier egress CA (same name, another key: issued before `certs init --refresh`) is 401 with the reason, not a 400 parse error', async () => {
    // OpenSSL finds the issuer by name and the signature does not verify; the error it leaves
    // behind surfaced at the first read of the request (with curl's timing), which Node reported
    // as an unparsable request: a 400 that named neither the certificate nor the reason.
    const earlier = issue({ ca: true, selfSigned: true, subject: caSubject() });
    const leaf = issue({ sans: [id('svc')], signer: earlier });
    const files = { cert: join(dir, 'earlier-ca-leaf.pem'), key: join(dir, 'earlier-ca-leaf.key'), ca: join(dir, 'server-ca-for-curl.pem') };
    await writeFile(files.cert, leaf.certPem);
    await writeFile(files.key, leaf.keyPem, { mode: 0o600 });
    await writeFile(files.ca, serverCa);
    const before = upstream.requests.length;
    for (const version of [['--tlsv1.3'], ['--tlsv1.2', '--tls-max', '1.2']]) {
      for (const token of [[], ['-H', `x-egress-token: ${svcToken}`]]) {
        const { stdout } = await run('curl', ['-sS', '-i', ...version, ...token, '--cacert', files.ca, '--cert', files.cert, '--key', files.key, `${url}/api/x`], { timeout: 10_000 });
        const label = `${version.join(' ')} ${token.length ? 'with a valid token' : ''}`;
        expect(stdout, label).toMatch(/^HTTP\/1\.1 401 /);
        expect(stdout, label).toMatch(/x-egress-error: caller_unauthenticated/);
        expect(stdout, label).toContain('certificate not accepted (CERT_SIGNATURE_FAILURE)');
      }
    }
    // The same certificate through undici, whose timing never showed it.
    const dispatcher = new Agent({ connect: { ca: serverCa, cert: leaf.certPem, key: leaf.keyPem } });
    try {
      const res = await request(`${url}/api/x`, { dispatcher });
      await res.body.dump();
      expect(res.statusCode).toBe(401);
    } finally {
      await dispatcher.close();
    }
    expect(upstream.requests.length).toBe(before);
  });

  it('a caller whose name has a dot (team.sync) is identified by the certificate issue-caller gives it', async () => {
    // The CA's name constraints (hosts the routes name) must not apply to a caller certificate's
    // name: OpenSSL reads a dotted CN as a host name when the certificate has no DNS SAN.
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
    const issued = await runCli(['certs', 'issue-caller', 'team.sync'], env);
    expect(issued.code, issued.stderr).toBe(0);
    const files = { cert: await readFile(join(dir, 'certs', 'callers', 'team.sync.pem'), 'utf8'), key: await readFile(join(dir, 'certs', 'callers', 'team.sync.key'), 'utf8') };
    const before = upstream.requests.length;
    expect(await call('/api/x', files)).toBe(200);
    expect(upstream.requests.length - before).toBe(1);
  });

  it('AUTH-08c a valid certificate plus a bad token: the certificate does not rescue the token', async () => {
    const before = upstream.requests.length;
    expect(await call('/api/x', await svcFiles(), { 'x-egress-token': `egt_${'A'.repeat(43)}` })).toBe(401);
    expect(upstream.requests.length).toBe(before);
  });

  /**
   * A client certificate's connection, kept open with a request a second until `expiry` (each
   * served), then one request past it on that connection and one on a resumed TLS session: both
   * must be refused, saying what expired. Resolves to the number of requests served.
   */
  async function refusedPastExpiry(port: number, client: { cert: string; key: string }, notAfter: number): Promise<number> {
    // A certificate holds its dates in whole seconds: the Date it was made with can be up to a
    // second past the end the proxy reads, and a request in that second was refused "before expiry".
    const expiry = Math.floor(notAfter / 1_000) * 1_000;
    const options = { port, host: '127.0.0.1', ca: serverCa, servername: 'localhost', ...client };
    const open = async (extra: { session?: Buffer } = {}) => {
      const socket = tlsConnect({ ...options, ...extra });
      await new Promise<void>((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject));
      return { socket, conn: RawConnection.over(socket) };
    };
    const req = 'GET /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n';
    let served = 0;
    const first = await open();
    try {
      // Inside the listener's 5 s keep-alive: one request a second while half a second is left, then past expiry.
      do {
        expect(statuses(await first.conn.request(req)), 'before expiry').toEqual([200]);
        served++;
        await new Promise((r) => setTimeout(r, Math.min(1_000, Math.max(0, expiry - Date.now() - 500))));
      } while (expiry - Date.now() > 500);
      await new Promise((r) => setTimeout(r, Math.max(0, expiry - Date.now()) + 300));
      const session = first.socket.getSession();
      expect(session).toBeDefined();
      const after = await first.conn.request(req);
      expect(statuses(after), 'the open connection').toEqual([401]);
      expect(after).toContain('x-egress-error: caller_unauthenticated');
      expect(after).toContain('expired');
      const resumed = await open({ session: session! });
      try {
        expect(resumed.socket.isSessionReused(), 'the session was resumed').toBe(true);
        const answer = await resumed.conn.request(req);
        expect(statuses(answer), 'the resumed session').toEqual([401]);
        expect(answer).toContain('expired');
      } finally {
        resumed.conn.close();
      }
    } finally {
      first.conn.close();
    }
    return served;
  }

  it('AUTH-03b a certificate that expires while its connection stays open, or whose TLS session is resumed after it expired, identifies no one', async () => {
    // OpenSSL checks the certificate's dates in the full handshake only: a keep-alive connection
    // outlives it, and a resumed session carries over the verdict of the handshake that made it.
    const short = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`], toMs: 3_000 });
    const before = upstream.requests.length;
    const served = await refusedPastExpiry(proxy.proxy.tlsAddress!.port, { cert: short.certPem, key: short.keyPem }, short.cert.validity.notAfter.getTime());
    expect(upstream.requests.length - before).toBe(served);
  });

  it('AUTH-03c a client CA (EGRESS_CLIENT_CA) that expires while a connection stays open, or whose TLS session is resumed after it expired, vouches for no one', async () => {
    // The same OpenSSL behaviour as AUTH-03b, for the CA's dates: its certificates keep working
    // past the CA's notAfter on connections and sessions made before it.
    const keys = [forge.pki.rsa.generateKeyPair(2048), forge.pki.rsa.generateKeyPair(2048)];
    const shortCa = issue({ cn: 'short-lived client CA', ca: true, selfSigned: true, toMs: 8_000, keys: keys[0] });
    const leaf = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`], signer: shortCa, keys: keys[1] });
    const own = await listenerWith('short-lived', shortCa.certPem);
    try {
      const before = upstream.requests.length;
      const served = await refusedPastExpiry(own.port, { cert: leaf.certPem, key: leaf.keyPem }, shortCa.cert.validity.notAfter.getTime());
      expect(upstream.requests.length - before).toBe(served);
      // A new connection after the CA expired fails OpenSSL's own check: refused as well.
      expect([0, 401]).toContain(await call('/api/x', { cert: leaf.certPem, key: leaf.keyPem }, {}, undefined, own.url).catch(() => 0));
      expect(upstream.requests.length - before).toBe(served);
    } finally {
      await own.proxy.close();
    }
  });

  it('EGRESS_CLIENT_CA holding several CAs (a CA change-over) pins every one: a certificate issued directly by any of them identifies its caller, one from a CA outside the bundle does not', async () => {
    const egressCa = await readFile(join(dir, 'certs', 'ca.pem'), 'utf8');
    const next = issue({ cn: 'next client CA', ca: true, selfSigned: true });
    // What `certs init --refresh` makes: a CA with the same name as the one before it, another key,
    // and certificates that issue-caller signs with it.
    const refreshedCerts = join(dir, 'certs-refreshed');
    const refreshedEnv = envFor(dir, { EGRESS_CERTS: refreshedCerts });
    expect((await runCli(['certs', 'init'], refreshedEnv)).code).toBe(0);
    const issued = await runCli(['certs', 'issue-caller', 'svc'], refreshedEnv);
    expect(issued.code, issued.stderr).toBe(0);
    const refreshed = await readFile(join(refreshedCerts, 'ca.pem'), 'utf8');
    expect(new X509Certificate(refreshed).subject).toBe(new X509Certificate(egressCa).subject);
    const outside = issue({ cn: 'outside client CA', ca: true, selfSigned: true });
    const own = await listenerWith('bundle', `${egressCa}${next.certPem}${refreshed}`);
    try {
      const before = upstream.requests.length;
      const fromNext = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`], signer: next });
      const fromRefreshed = { cert: await readFile(join(refreshedCerts, 'callers', 'svc.pem'), 'utf8'), key: await readFile(join(refreshedCerts, 'callers', 'svc.key'), 'utf8') };
      const fromOutside = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`], signer: outside });
      expect(await call('/api/x', await svcFiles(), {}, undefined, own.url), 'the first CA').toBe(200);
      expect(await call('/api/x', { cert: fromNext.certPem, key: fromNext.keyPem }, {}, undefined, own.url), 'the second CA').toBe(200);
      expect(await call('/api/x', fromRefreshed, {}, undefined, own.url), 'the third CA, named as the first').toBe(200);
      expect(upstream.requests.length - before).toBe(3);
      expect([0, 401]).toContain(await call('/api/x', { cert: fromOutside.certPem, key: fromOutside.keyPem }, {}, undefined, own.url).catch(() => 0));
      // A CA in the bundle is no caller, and a chain through one of them to a deeper leaf is refused.
      const inter = issue({ cn: 'intermediate', ca: true, signer: next });
      const viaInter = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`], signer: inter });
      expect([0, 401]).toContain(await call('/api/x', { cert: viaInter.certPem + inter.certPem, key: viaInter.keyPem }, {}, undefined, own.url).catch(() => 0));
      expect(upstream.requests.length - before).toBe(3);
    } finally {
      await own.proxy.close();
    }
  });

  it('a certificate of one caller with the token of another is refused (401, saying so, with an audit line); nothing reaches the upstream', async () => {
    const before = upstream.requests.length;
    const dispatcher = new Agent({ connect: { ca: serverCa, ...(await svcFiles()) } });
    const res = await request(`${url}/api/x`, { dispatcher, headers: { 'x-egress-token': seededZedToken } });
    const text = await res.body.text();
    await dispatcher.close();
    expect(res.statusCode).toBe(401);
    expect(res.headers['x-egress-error']).toBe('caller_unauthenticated');
    const body = JSON.parse(text) as { error: { message: string; request_id: string } };
    expect(body.error.message).toContain('The client certificate and the caller token name different callers.');
    expect(text).not.toContain(seededZedToken);
    expect(upstream.requests.length).toBe(before);
    await eventually(async () => (await proxy.auditText()).includes(body.error.request_id), 2_000, 'the audit line');
    const line = JSON.parse((await proxy.auditText()).split('\n').find((l) => l.includes(body.error.request_id))!) as Record<string, unknown>;
    expect(line).toMatchObject({ decision: 'deny', reason: 'caller_unauthenticated', caller: null, route: null });
    expect(JSON.stringify(line)).not.toContain(seededZedToken);
    // The same caller on both is served.
    expect(await call('/api/x', await svcFiles(), { 'x-egress-token': svcToken })).toBe(200);
    expect(upstream.requests.length - before).toBe(1);
  });

  it('AUTH-10 protocol floor: TLS 1.0/1.1 and non-AEAD TLS 1.2 suites fail the handshake', async () => {
    const port = proxy.proxy.tlsAddress!.port;
    const attempt = (opts: object) => new Promise<string>((resolve) => {
      const s = tlsConnect({ port, host: '127.0.0.1', ca: serverCa, servername: 'localhost', ...opts }, () => {
        resolve(`connected ${s.getProtocol()} ${s.getCipher().name}`);
        s.destroy();
      });
      s.on('error', (e) => resolve(`refused: ${e.message}`));
    });
    for (const opts of [
      { minVersion: 'TLSv1', maxVersion: 'TLSv1', ciphers: 'DEFAULT@SECLEVEL=0' },
      { minVersion: 'TLSv1.1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0' },
      { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2', ciphers: 'AES128-SHA:AES256-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA256' },
    ]) expect(await attempt(opts), JSON.stringify(opts)).toMatch(/^refused/);
    expect(await attempt({ minVersion: 'TLSv1.3' })).toMatch(/^connected TLSv1.3/);
  });

  it('a certificate identifies only a caller the store has and has not revoked: `egress callers revoke` ends its certificates too, open connections included; issue-caller refuses a name the store does not have, or has revoked', async () => {
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
    const before = upstream.requests.length;
    // Signed by the egress CA, well-formed, allowed by a rule, but "other" was never added as a caller.
    const stranger = issue({ cn: 'other', uris: [`${CALLER_URI_PREFIX}other`] });
    expect(await call('/api/x', { cert: stranger.certPem, key: stranger.keyPem })).toBe(401);
    const zed = { cert: await readFile(join(dir, 'certs', 'callers', 'zed.pem'), 'utf8'), key: await readFile(join(dir, 'certs', 'callers', 'zed.key'), 'utf8') };
    const agent = new Agent({ connect: { ca: serverCa, ...zed }, keepAliveTimeout: 30_000 });
    // Served until the proxy has read the revocation (under load that can take a few polls), never after.
    let served = 0;
    const status = async () => {
      const s = await call('/api/x', undefined, {}, agent);
      if (s === 200) served++;
      return s;
    };
    try {
      expect(await status()).toBe(200);
      expect((await runCli(['callers', 'revoke', 'zed'], env)).code).toBe(0);
      await eventually(async () => (await status()) === 401, 3_000, 'the caller revocation on an open connection');
      expect(await call('/api/x', zed)).toBe(401);
    } finally {
      await agent.close();
    }
    expect(upstream.requests.length - before).toBe(served);
    const unknown = await runCli(['certs', 'issue-caller', 'nobody'], env);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain('egress callers add nobody');
    const revoked = await runCli(['certs', 'issue-caller', 'zed'], env);
    expect(revoked.code).toBe(1);
    expect(revoked.stderr).toContain('revoked');
  });

  it('AUTH-07d a revoked caller\'s name added again does not bring its old certificates back: they stay refused, a certificate issued after the new add works', async () => {
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
    const old = { cert: await readFile(join(dir, 'certs', 'callers', 'zed.pem'), 'utf8'), key: await readFile(join(dir, 'certs', 'callers', 'zed.key'), 'utf8') };
    expect((await runCli(['callers', 'revoke', 'zed'], env)).code).toBe(0);
    await eventually(async () => (await call('/api/x', old)) === 401, 3_000, 'the caller revocation');
    const before = upstream.requests.length;
    // The revoked name is reused (allowed: `callers add` gives it a new token); the old certificate was never revoke-caller'd.
    const added = await runCli(['callers', 'add', 'zed'], env);
    expect(added.code, added.stderr).toBe(0);
    await new Promise((r) => setTimeout(r, 1_200));
    expect(await call('/api/x', old)).toBe(401);
    // A certificate the test mints with the same identity and a back-dated start is refused as well.
    const backdated = issue({ cn: 'zed', uris: [`${CALLER_URI_PREFIX}zed`], fromMs: -3_600_000 });
    expect(await call('/api/x', { cert: backdated.certPem, key: backdated.keyPem })).toBe(401);
    expect(upstream.requests.length - before).toBe(0);
    expect((await runCli(['certs', 'issue-caller', 'zed'], env)).code).toBe(0);
    const fresh = { cert: await readFile(join(dir, 'certs', 'callers', 'zed.pem'), 'utf8'), key: await readFile(join(dir, 'certs', 'callers', 'zed.key'), 'utf8') };
    expect(await call('/api/x', fresh)).toBe(200);
    expect((await runCli(['callers', 'revoke', 'zed'], env)).code).toBe(0);
  });

  it('revoke-caller: new requests are refused and an open connection is closed, for every certificate of the caller, one whose serial starts with a zero byte included', async () => {
    // As an older issue-caller recorded it: "00…" in issued.json, while Node reports the serial without the zero byte.
    const zeroLed = issue({ cn: 'svc', uris: [`${CALLER_URI_PREFIX}svc`], serial: '0023456789abcdef0123456789abcdef' });
    const issuedPath = join(dir, 'certs', 'issued.json');
    const issued = JSON.parse(await readFile(issuedPath, 'utf8')) as Record<string, string[]>;
    issued.svc!.push('0023456789abcdef0123456789abcdef');
    await writeFile(issuedPath, JSON.stringify(issued));
    expect(await call('/api/x', { cert: zeroLed.certPem, key: zeroLed.keyPem })).toBe(200);
    const agent = new Agent({ connect: { ca: serverCa, ...(await svcFiles()) }, keepAliveTimeout: 30_000 });
    try {
      expect(await call('/api/x', undefined, {}, agent)).toBe(200);
      const revoked = await runCli(['certs', 'revoke-caller', 'svc'], envFor(dir, { EGRESS_CERTS: join(dir, 'certs') }));
      expect(revoked.code).toBe(0);
      await eventually(async () => (await call('/api/x', undefined, {}, agent).catch(() => 0)) !== 200, 3_000, 'the revocation');
      expect([0, 401]).toContain(await call('/api/x', await svcFiles()).catch(() => 0));
      expect([0, 401]).toContain(await call('/api/x', { cert: zeroLed.certPem, key: zeroLed.keyPem }).catch(() => 0));
    } finally {
      await agent.close();
    }
  });

  it('a damaged revoked.json lifts no revocation: the last good list stays in force with a critical alert, revoke-caller refuses to overwrite it, and serve does not start on it', async () => {
    // svc's certificates were revoked by the test before.
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
    const path = join(dir, 'certs', 'revoked.json');
    const good = await readFile(path, 'utf8');
    try {
      await writeFile(path, good.slice(0, Math.floor(good.length / 2)));
      await eventually(async () => proxy.logs().includes('"subject":"revocations"'), 3_000, 'the alert');
      expect(proxy.logs()).toContain('the caller certificate revocation list cannot be read');
      // Past two polls of the file: still revoked.
      await new Promise((r) => setTimeout(r, 1_200));
      expect([0, 401]).toContain(await call('/api/x', await svcFiles()).catch(() => 0));
      const damaged = await readFile(path, 'utf8');
      const cli = await runCli(['certs', 'revoke-caller', 'svc'], env);
      expect(cli.code).toBe(1);
      expect(cli.stderr).toContain('revoked.json is damaged');
      expect(await readFile(path, 'utf8')).toBe(damaged);
      const serve = await runCli(['serve'], { ...env, EGRESS_LISTEN: '127.0.0.1:0', EGRESS_ADMIN_LISTEN: '127.0.0.1:0', EGRESS_TLS_LISTEN: '127.0.0.1:0', EGRESS_TLS_CERT: join(dir, 'server.pem'), EGRESS_TLS_KEY: join(dir, 'server.key'), EGRESS_AUDIT_LOG: join(dir, 'audit-2.log') });
      expect(serve.code).toBe(1);
      expect(serve.stderr).toContain('revoked.json is damaged');
    } finally {
      await writeFile(path, good);
    }
    await eventually(async () => (await call('/api/x', undefined, { 'x-egress-token': svcToken })) === 200, 3_000, 'the proxy serving');
  });

  it('serve names the setting and the file when the listener\'s certificate, key or client CA is not what it should be', async () => {
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs'), EGRESS_TLS_LISTEN: '127.0.0.1:0', EGRESS_TLS_CERT: join(dir, 'server.pem'), EGRESS_TLS_KEY: join(dir, 'server.key'), EGRESS_AUDIT_LOG: join(dir, 'audit-files.log') });
    const garbage = join(dir, 'not-a-pem.txt');
    await writeFile(garbage, 'not a certificate\n');
    const otherKey = join(dir, 'other.key');
    await writeFile(otherKey, makeTestPki().serverKey, { mode: 0o600 });
    // A caller's or the listener's own certificate given as the client CA, alone or in a bundle,
    // and a CA:TRUE certificate whose keyUsage does not allow it to sign certificates.
    const leaf = join(dir, 'server.pem');
    const bundled = join(dir, 'ca-and-leaf.pem');
    await writeFile(bundled, `${await readFile(join(dir, 'certs', 'ca.pem'), 'utf8')}${await readFile(leaf, 'utf8')}`);
    const noCertSign = join(dir, 'ca-without-keycertsign.pem');
    await writeFile(noCertSign, issue({ cn: 'signs nothing', ca: true, selfSigned: true, keyUsage: { digitalSignature: true } }).certPem);
    for (const [setting, path, message] of [
      ['EGRESS_CLIENT_CA', garbage, `EGRESS_CLIENT_CA ${garbage} holds no PEM certificate`],
      ['EGRESS_CLIENT_CA', leaf, `EGRESS_CLIENT_CA ${leaf}: certificate 1 of 1 (CN=localhost) is not a CA (it needs basicConstraints CA:TRUE and, if it has a keyUsage, keyCertSign)`],
      ['EGRESS_CLIENT_CA', bundled, `EGRESS_CLIENT_CA ${bundled}: certificate 2 of 2 (CN=localhost) is not a CA (it needs basicConstraints CA:TRUE and, if it has a keyUsage, keyCertSign)`],
      ['EGRESS_CLIENT_CA', noCertSign, `EGRESS_CLIENT_CA ${noCertSign}: certificate 1 of 1 (CN=signs nothing) is not a CA (it needs basicConstraints CA:TRUE and, if it has a keyUsage, keyCertSign)`],
      ['EGRESS_TLS_CERT', garbage, `EGRESS_TLS_CERT ${garbage} holds no PEM certificate`],
      ['EGRESS_TLS_KEY', garbage, `EGRESS_TLS_KEY ${garbage} holds no PEM private key`],
      ['EGRESS_TLS_KEY', otherKey, `EGRESS_TLS_KEY ${otherKey} does not belong to the certificate in EGRESS_TLS_CERT ${join(dir, 'server.pem')}`],
    ] as const) {
      const serve = await runCli(['serve'], { ...env, [setting]: path });
      expect(serve.code, `${setting}: ${serve.stderr}`).toBe(1);
      expect(serve.stderr).toContain(message);
      expect(serve.stderr).not.toContain('unexpected error');
      expect(serve.stderr + serve.stdout).not.toContain('PRIVATE KEY');
    }
  });

  it('serve warns when the listener\'s key is readable by group or others (whoever reads it can pose as the proxy to its callers), and not when it is 0600', async () => {
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs'), EGRESS_TLS_LISTEN: '127.0.0.1:0', EGRESS_TLS_CERT: join(dir, 'server.pem'), EGRESS_AUDIT_LOG: join(dir, 'audit-keymode.log') });
    const pem = await readFile(join(dir, 'server.key'), 'utf8');
    for (const mode of [0o644, 0o600]) {
      const path = join(dir, `server-${mode.toString(8)}.key`);
      await writeFile(path, pem);
      await chmod(path, mode);
      const serve = await startServe({ ...env, EGRESS_TLS_KEY: path });
      const output = serve.output();
      expect(await serve.stop()).toBe(0);
      if (mode === 0o644) {
        expect(output).toContain(`EGRESS_TLS_KEY ${path} is readable by group or others (mode 644)`);
      } else {
        expect(output).not.toContain('is readable by group or others');
      }
      expect(output).not.toContain('PRIVATE KEY');
    }
  });

  it('serve warns about a client CA or listener certificate that has expired, is not yet valid or expires within 30 days (every certificate it vouches for would be refused), naming it; a bundle\'s valid CA draws no warning', async () => {
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs'), EGRESS_TLS_LISTEN: '127.0.0.1:0', EGRESS_TLS_CERT: join(dir, 'server.pem'), EGRESS_TLS_KEY: join(dir, 'server.key'), EGRESS_AUDIT_LOG: join(dir, 'audit-ca-dates.log') });
    const day = 86_400_000;
    const expired = issue({ cn: 'old client CA', ca: true, selfSigned: true, fromMs: -400 * day, toMs: -day });
    const early = issue({ cn: 'future client CA', ca: true, selfSigned: true, fromMs: 10 * day, toMs: 400 * day });
    const soon = issue({ cn: 'ending client CA', ca: true, selfSigned: true, toMs: 5 * day });
    const valid = await readFile(join(dir, 'certs', 'ca.pem'), 'utf8');
    const bundle = join(dir, 'ca-dates.pem');
    await writeFile(bundle, `${valid}${expired.certPem}${early.certPem}${soon.certPem}`);
    const serve = await startServe({ ...env, EGRESS_CLIENT_CA: bundle });
    const output = serve.output();
    expect(await serve.stop()).toBe(0);
    expect(output).toContain(`EGRESS_CLIENT_CA ${bundle}: certificate 2 of 4 (CN=old client CA) has expired`);
    expect(output).toContain(`EGRESS_CLIENT_CA ${bundle}: certificate 3 of 4 (CN=future client CA) is not yet valid`);
    expect(output).toContain(`EGRESS_CLIENT_CA ${bundle}: certificate 4 of 4 (CN=ending client CA) expires in 4 days`);
    expect(output).not.toContain('certificate 1 of 4');
    // certs init's CA, and a listener certificate good for a year (the shared test one lasts a day).
    const long = issue({ cn: 'localhost', eku: 'server', toMs: 400 * day, sans: [{ type: 2, value: 'localhost' }] });
    await writeFile(join(dir, 'long-server.pem'), long.certPem);
    await writeFile(join(dir, 'long-server.key'), long.keyPem, { mode: 0o600 });
    const quiet = await startServe({ ...env, EGRESS_TLS_CERT: join(dir, 'long-server.pem'), EGRESS_TLS_KEY: join(dir, 'long-server.key') });
    const quietOutput = quiet.output();
    expect(await quiet.stop()).toBe(0);
    expect(quietOutput).not.toMatch(/has expired|is not yet valid|expires in/);
    // The listener's own certificate: callers' TLS clients would refuse it.
    const ownKeys = forge.pki.rsa.generateKeyPair(2048);
    const own = issue({ cn: 'localhost', eku: 'server', toMs: 2 * day, keys: ownKeys, sans: [{ type: 2, value: 'localhost' }] });
    await writeFile(join(dir, 'ending-server.pem'), own.certPem);
    await writeFile(join(dir, 'ending-server.key'), own.keyPem, { mode: 0o600 });
    const ending = await startServe({ ...env, EGRESS_TLS_CERT: join(dir, 'ending-server.pem'), EGRESS_TLS_KEY: join(dir, 'ending-server.key') });
    const endingOutput = ending.output();
    expect(await ending.stop()).toBe(0);
    expect(endingOutput).toContain(`EGRESS_TLS_CERT ${join(dir, 'ending-server.pem')} (CN=localhost) expires in 1 day`);
    expect(endingOutput).not.toContain('PRIVATE KEY');
  });

  it('AUTH-07f certificates issued and revoked by six CLI processes at once: every serial is recorded in issued.json, every revocation lands in revoked.json, every certificate is refused', async () => {
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
    const names = ['p0', 'p1', 'p2', 'p3', 'p4', 'p5'];
    for (const n of names) expect((await runCli(['callers', 'add', n], env)).code).toBe(0);
    const issued = await Promise.all(names.map((n) => runCli(['certs', 'issue-caller', n, '--json'], env)));
    for (const r of issued) expect(r.code, r.stderr).toBe(0);
    const serials = issued.map((r) => (JSON.parse(r.stdout) as { serial: string }).serial.toLowerCase());
    const book = JSON.parse(await readFile(join(dir, 'certs', 'issued.json'), 'utf8')) as Record<string, string[]>;
    names.forEach((n, i) => expect(book[n], n).toContain(serials[i]));
    const files = await Promise.all(names.map(async (n) => ({ cert: await readFile(join(dir, 'certs', 'callers', `${n}.pem`), 'utf8'), key: await readFile(join(dir, 'certs', 'callers', `${n}.key`), 'utf8') })));
    // Known callers with valid certificates but no rule: 403 (authenticated).
    await eventually(async () => (await call('/api/x', files[0])) === 403, 3_000, 'the new callers known');
    const revoked = await Promise.all(names.map((n) => runCli(['certs', 'revoke-caller', n], env)));
    for (const r of revoked) expect(r.code, r.stderr).toBe(0);
    const list = JSON.parse(await readFile(join(dir, 'certs', 'revoked.json'), 'utf8')) as { serials: Record<string, unknown> };
    for (const s of serials) expect(Object.keys(list.serials).map((k) => k.replace(/^0+/, '')), s).toContain(s.replace(/^0+/, ''));
    await new Promise((r) => setTimeout(r, 1_200));
    for (const [i, f] of files.entries()) expect([0, 401], names[i]).toContain(await call('/api/x', f).catch(() => 0));
  });

  it('refuses a TLS 1.2 renegotiation: the connection ends, and the next connection is served', async () => {
    const port = proxy.proxy.tlsAddress!.port;
    const socket = tlsConnect({ port, host: '127.0.0.1', ca: serverCa, servername: 'localhost', maxVersion: 'TLSv1.2' });
    await new Promise<void>((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject));
    expect(socket.getProtocol()).toBe('TLSv1.2');
    const outcome = await new Promise<string>((resolve) => {
      socket.on('error', () => {});
      socket.once('close', () => resolve('closed'));
      // A renegotiation the server took would call back without an error and keep the connection.
      socket.renegotiate({ rejectUnauthorized: true }, (err) => {
        if (!err) resolve('renegotiated');
      });
      socket.write(`GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-Egress-Token: ${svcToken}\r\n\r\n`);
    });
    expect(outcome).toBe('closed');
    expect(await call('/api/x', undefined, { 'x-egress-token': svcToken })).toBe(200);
  });

  it('a request over the header limit gets the proxy\'s 431 (with its error header), every time, even while the caller is still sending', async () => {
    const big = Array.from({ length: 200 }, (_, i) => `X-H${i}: ${'b'.repeat(8 * 1024)}`).join('\r\n');
    const bytes = `GET /api/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${svcToken}\r\n${big}\r\n\r\n`;
    const port = proxy.proxy.tlsAddress!.port;
    for (let i = 0; i < 10; i++) {
      const answer = await exchangeOn((ready) => tlsConnect({ port, host: '127.0.0.1', ca: serverCa, servername: 'localhost' }, ready), bytes, 5_000);
      expect(answer.split('\r\n')[0], `attempt ${i + 1}`).toBe('HTTP/1.1 431 Request Header Fields Too Large');
      expect(answer).toContain('x-egress-error: bad_request');
    }
  });
});
