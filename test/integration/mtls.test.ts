import { generateKeyPairSync } from 'node:crypto';
import { rename, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import forge from 'node-forge';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { makeTestPki } from '../helpers/tls.ts';

/** Upstream mutual TLS: the client certificate comes from the credential (Teller). */
interface Ca { cert: forge.pki.Certificate; key: forge.pki.rsa.PrivateKey }

function makeCa(cn: string): Ca {
  const keys = forge.pki.rsa.generateKeyPair(2048);
  const cert = forge.pki.createCertificate();
  cert.publicKey = keys.publicKey;
  cert.serialNumber = '0a';
  cert.validity.notBefore = new Date(Date.now() - 60_000);
  cert.validity.notAfter = new Date(Date.now() + 86_400_000);
  cert.setSubject([{ name: 'commonName', value: cn }]);
  cert.setIssuer([{ name: 'commonName', value: cn }]);
  cert.setExtensions([{ name: 'basicConstraints', cA: true, critical: true }, { name: 'keyUsage', keyCertSign: true, critical: true }]);
  cert.sign(keys.privateKey, forge.md.sha256.create());
  return { cert, key: keys.privateKey };
}

let serial = 16;
function issueClient(ca: Ca, cn: string, validity: { fromMs?: number; toMs?: number } = {}): { cert: string; key: string; forgeCert: forge.pki.Certificate; forgeKey: forge.pki.rsa.PrivateKey } {
  const keys = forge.pki.rsa.generateKeyPair(2048);
  const cert = forge.pki.createCertificate();
  cert.publicKey = keys.publicKey;
  cert.serialNumber = (serial++).toString(16);
  cert.validity.notBefore = new Date(Date.now() + (validity.fromMs ?? -60_000));
  cert.validity.notAfter = new Date(Date.now() + (validity.toMs ?? 86_400_000));
  cert.setSubject([{ name: 'commonName', value: cn }]);
  cert.setIssuer(ca.cert.subject.attributes);
  cert.setExtensions([{ name: 'basicConstraints', cA: false }, { name: 'extKeyUsage', clientAuth: true }]);
  cert.sign(ca.key, forge.md.sha256.create());
  return { cert: forge.pki.certificateToPem(cert), key: forge.pki.privateKeyToPem(keys.privateKey), forgeCert: cert, forgeKey: keys.privateKey };
}

function pkcs12(c: { forgeCert: forge.pki.Certificate; forgeKey: forge.pki.rsa.PrivateKey }, passphrase: string): string {
  const asn1 = forge.pkcs12.toPkcs12Asn1(c.forgeKey, [c.forgeCert], passphrase, { algorithm: '3des' });
  return forge.util.encode64(forge.asn1.toDer(asn1).getBytes());
}

let clientCa: Ca;
let server: Server;
let upstreamUrl: string;
let serverCa: string;
const seen: { cn: string | undefined; auth: string | undefined }[] = [];
let proxy: TestProxy;
let v1: ReturnType<typeof issueClient>;
let ownPki: ReturnType<typeof makeTestPki>;

beforeAll(async () => {
  clientCa = makeCa('egress test client CA');
  const pki = makeTestPki();
  ownPki = pki;
  serverCa = pki.caCert;
  // Like Teller: no client certificate from our CA, no API.
  server = createServer({ key: pki.serverKey, cert: pki.serverCert, ca: forge.pki.certificateToPem(clientCa.cert), requestCert: true, rejectUnauthorized: true }, (req, res) => {
    const peer = (req.socket as TLSSocket).getPeerCertificate();
    seen.push({ cn: [peer.subject?.CN].flat()[0], auth: req.headers.authorization });
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ cn: peer.subject?.CN }));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  upstreamUrl = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
  v1 = issueClient(clientCa, 'egress-client-v1');
  const paper = issueClient(clientCa, 'egress-client-paper');
  const live = issueClient(clientCa, 'egress-client-live');
  const p12Client = issueClient(clientCa, 'egress-client-p12');
  proxy = await startTestProxy({
    routes: {
      teller: `name: teller\npreset: teller\nupstream: ${upstreamUrl}\nallow_private_addresses: true\nupstream_ca: ./server-ca.pem\ncredential: teller-cert\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/accounts]\n`,
      bundle: `name: bundle\nupstream: ${upstreamUrl}\nallow_private_addresses: true\nprefix: /bundle\nupstream_ca: ./server-ca.pem\ncredential: bundle\ninject:\n  scheme: mtls\n  pkcs12: "{pkcs12}"\n  passphrase: "{passphrase}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/accounts]\n`,
      // One credential holding two certificates, each route presenting its own, to one origin.
      paper: `name: paper\nupstream: ${upstreamUrl}\nallow_private_addresses: true\nprefix: /paper\nupstream_ca: ./server-ca.pem\ncredential: pair\ninject:\n  scheme: mtls\n  certificate: "{paper_cert}"\n  private_key: "{paper_key}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/accounts]\n`,
      live: `name: live\nupstream: ${upstreamUrl}\nallow_private_addresses: true\nprefix: /live\nupstream_ca: ./server-ca.pem\ncredential: pair\ninject:\n  scheme: mtls\n  certificate: "{live_cert}"\n  private_key: "{live_key}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/accounts]\n`,
      nocert: `name: nocert\nupstream: ${upstreamUrl}\nallow_private_addresses: true\nprefix: /nocert\nupstream_ca: ./server-ca.pem\ncredential: bundle\ninject:\n  scheme: bearer\n  token: "{passphrase}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/accounts]\n`,
    },
    files: { 'server-ca.pem': serverCa },
    credentials: {
      'teller-cert': { certificate: v1.cert, private_key: v1.key },
      bundle: { pkcs12: pkcs12(p12Client, 'correct horse'), passphrase: 'correct horse' },
      pair: { paper_cert: paper.cert, paper_key: paper.key, live_cert: live.cert, live_key: live.key },
    },
    callers: ['svc'],
  });
}, 60_000);

afterAll(async () => {
  await proxy?.close();
  await new Promise<void>((r) => server.close(() => r()));
});

const get = (path: string, headers: Record<string, string> = {}) => fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': proxy.tokens.svc!, ...headers } });

describe('mtls', () => {
  it('presents the PEM client certificate from the credential; the caller\'s own Authorization passes through (Teller preset)', async () => {
    const token = `Basic ${Buffer.from('token_user_abc:').toString('base64')}`;
    const res = await get('/teller/accounts', { authorization: token });
    expect(res.status).toBe(200);
    expect(seen.at(-1)).toEqual({ cn: 'egress-client-v1', auth: token });
  });

  it('presents a PKCS#12 bundle opened with its passphrase', async () => {
    const res = await get('/bundle/accounts');
    expect(res.status).toBe(200);
    expect(seen.at(-1)!.cn).toBe('egress-client-p12');
  });

  it('two routes to one origin with one credential present each its own certificate, not the first one used', async () => {
    expect((await get('/paper/accounts')).status).toBe(200);
    expect(seen.at(-1)!.cn).toBe('egress-client-paper');
    expect((await get('/live/accounts')).status).toBe(200);
    expect(seen.at(-1)!.cn).toBe('egress-client-live');
    expect((await get('/paper/accounts')).status).toBe(200);
    expect(seen.at(-1)!.cn).toBe('egress-client-paper');
  });

  it('without a client certificate the upstream refuses the handshake: 502, nothing served', async () => {
    const res = await get('/nocert/accounts');
    expect(res.status).toBe(502);
    expect(res.headers.get('x-egress-error')).toBe('upstream_error');
  });

  it('a rotation moves new requests to the new certificate', async () => {
    const v2 = issueClient(clientCa, 'egress-client-v2');
    const file = JSON.stringify({ certificate: v2.cert, private_key: v2.key });
    const rotated = await runCli(['keys', 'rotate', 'teller-cert', '--from-stdin', '--grace', '0'], envFor(proxy.dir), file);
    expect(rotated.code).toBe(0);
    expect(rotated.stdout + rotated.stderr).not.toContain('PRIVATE KEY');
    await eventually(async () => ((await (await get('/teller/accounts')).json()) as { cn: string }).cn === 'egress-client-v2', 2_000, 'the new certificate');
  });

  it('a certificate put again after the store lost its data is presented, not the one of the lost record\'s version 1', async () => {
    const own = await startTestProxy({
      routes: { teller: `name: teller\npreset: teller\nupstream: ${upstreamUrl}\nallow_private_addresses: true\nupstream_ca: ./server-ca.pem\ncredential: teller-cert\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/accounts]\n` },
      files: { 'server-ca.pem': serverCa },
      credentials: { 'teller-cert': { certificate: v1.cert, private_key: v1.key } },
      callers: ['svc'],
    });
    try {
      const cn = async () => ((await (await fetch(`${own.url}/teller/accounts`, { headers: { 'x-egress-token': own.tokens.svc! } })).json()) as { cn: string }).cn;
      expect(await cn()).toBe('egress-client-v1');
      // The store file is replaced by an empty one, and the credential put again: version 1 once more.
      await writeFile(`${own.storePath}.fresh`, JSON.stringify({ format: 'egress-store/1', credentials: {}, callers: {}, admins: {} }));
      await rename(`${own.storePath}.fresh`, own.storePath);
      await eventually(() => own.logs().includes('store_rollback'), 3_000, 'the record seen gone');
      const again = issueClient(clientCa, 'egress-client-again');
      const put = await runCli(['keys', 'put', 'teller-cert', '--from-stdin'], envFor(own.dir), JSON.stringify({ certificate: again.cert, private_key: again.key }));
      expect(put.code, put.stderr).toBe(0);
      await eventually(async () => (await cn()) === 'egress-client-again', 3_000, 'the certificate put again');
    } finally {
      await own.close();
    }
  });

  it('a reload that changes a route\'s connection settings closes the certificate pool it no longer uses', async () => {
    const open = new Set<import('node:net').Socket>();
    const own = createServer({ key: ownPki.serverKey, cert: ownPki.serverCert, ca: forge.pki.certificateToPem(clientCa.cert), requestCert: true, rejectUnauthorized: true }, (_req, res) => res.end('{}'));
    own.keepAliveTimeout = 60_000;
    own.on('secureConnection', (socket) => {
      open.add(socket);
      socket.on('close', () => open.delete(socket));
    });
    await new Promise<void>((r) => own.listen(0, '127.0.0.1', r));
    const url = `https://127.0.0.1:${(own.address() as AddressInfo).port}`;
    const routeText = (connect: string, paths: string) => `name: teller\npreset: teller\nupstream: ${url}\nallow_private_addresses: true\nupstream_ca: ./server-ca.pem\ntimeouts: { connect: ${connect} }\ncredential: teller-cert\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [${paths}]\n`;
    const reloading = await startTestProxy({
      routes: { teller: routeText('5s', '/accounts') },
      files: { 'server-ca.pem': ownPki.caCert },
      credentials: { 'teller-cert': { certificate: v1.cert, private_key: v1.key } },
      callers: ['svc'],
    });
    try {
      const status = async (path: string) => (await fetch(`${reloading.url}/teller${path}`, { headers: { 'x-egress-token': reloading.tokens.svc! } })).status;
      expect(await status('/accounts')).toBe(200);
      expect(open.size).toBe(1);
      const [idle] = open;
      await writeFile(`${reloading.routesDir}/teller.yaml`, routeText('4s', '/accounts, /other'));
      await eventually(async () => (await status('/other')) === 200, 5_000, 'the reloaded route');
      await eventually(() => !open.has(idle!), 3_000, 'the connection of the pool the route no longer uses to close');
    } finally {
      await reloading.close();
      own.closeAllConnections();
      await new Promise<void>((r) => own.close(() => r()));
    }
  });

  it('refuses certificate material when it is stored: expired, not yet valid, a key that does not match, a bad passphrase', async () => {
    const env = envFor(proxy.dir);
    const expired = issueClient(clientCa, 'old', { fromMs: -2 * 86_400_000, toMs: -86_400_000 });
    const future = issueClient(clientCa, 'future', { fromMs: 86_400_000, toMs: 2 * 86_400_000 });
    const other = issueClient(clientCa, 'other');
    const cases: [Record<string, string>, RegExp][] = [
      [{ certificate: expired.cert, private_key: expired.key }, /expired/],
      [{ certificate: future.cert, private_key: future.key }, /not valid until/],
      [{ certificate: v1.cert, private_key: other.key }, /does not belong/],
      [{ certificate: v1.cert }, /without its private key/],
      [{ pkcs12: pkcs12(other, 'right'), passphrase: 'wrong' }, /passphrase/],
    ];
    for (const [fields, message] of cases) {
      const res = await runCli(['keys', 'put', `bad-${Math.random().toString(36).slice(2, 8)}`, '--from-stdin'], env, JSON.stringify(fields));
      expect(res.code, String(message)).toBe(1);
      expect(res.stderr).toMatch(message);
      expect(res.stderr).not.toContain('BEGIN');
    }
  });

  it('a credential with two certificates (paper and live): each is checked against the key that belongs to it, whatever the order of the fields', async () => {
    const env = envFor(proxy.dir);
    const paper = issueClient(clientCa, 'paper-2');
    const live = issueClient(clientCa, 'live-2');
    const expired = issueClient(clientCa, 'live-old', { fromMs: -2 * 86_400_000, toMs: -86_400_000 });
    const put = (fields: Record<string, string>) => runCli(['keys', 'put', `pair-${Math.random().toString(36).slice(2, 8)}`, '--from-stdin'], env, JSON.stringify(fields));
    const mixed = await put({ live_cert: live.cert, paper_cert: paper.cert, paper_key: paper.key, live_key: live.key });
    expect(mixed.code, mixed.stderr).toBe(0);
    const stale = await put({ paper_cert: paper.cert, paper_key: paper.key, live_cert: expired.cert, live_key: expired.key });
    expect(stale.code).toBe(1);
    expect(stale.stderr).toMatch(/certificate in field "live_cert" expired/);
    const unpaired = await put({ paper_cert: paper.cert, paper_key: paper.key, live_cert: live.cert, live_key: paper.key });
    expect(unpaired.code).toBe(1);
    expect(unpaired.stderr).toMatch(/field "live_cert"/);
    expect(unpaired.stderr + stale.stderr).not.toContain('BEGIN');
  });

  it('a PKCS#12 bundle with its CA certificate before the leaf: the leaf that matches the key is checked (stored when valid, refused when expired), as the TLS stack picks it', async () => {
    const env = envFor(proxy.dir);
    const bundle = (leaf: ReturnType<typeof issueClient>) => forge.util.encode64(forge.asn1.toDer(forge.pkcs12.toPkcs12Asn1(leaf.forgeKey, [clientCa.cert, leaf.forgeCert], 'pw', { algorithm: '3des' })).getBytes());
    const put = (leaf: ReturnType<typeof issueClient>) => runCli(['keys', 'put', `chain-${Math.random().toString(36).slice(2, 8)}`, '--from-stdin'], env, JSON.stringify({ pkcs12: bundle(leaf), passphrase: 'pw' }));
    const good = await put(issueClient(clientCa, 'chain-leaf'));
    expect(good.code, good.stderr).toBe(0);
    const old = await put(issueClient(clientCa, 'chain-old', { fromMs: -2 * 86_400_000, toMs: -86_400_000 }));
    expect(old.code).toBe(1);
    expect(old.stderr).toMatch(/expired/);
  });

  it('a PEM private key without a certificate is a signing key (coinbase_jwt): stored; one that does not parse is refused without quoting it', async () => {
    const env = envFor(proxy.dir);
    const signing = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'sec1', format: 'pem' }) as string;
    const put = await runCli(['keys', 'put', 'cb-signing', '--from-stdin'], env, JSON.stringify({ key_name: 'organizations/o/apiKeys/k', private_key: signing }));
    expect(put.code, put.stderr).toBe(0);
    const broken = signing.replace(/(-----\n)(.{8})/, '$1!!!!!!!!');
    const bad = await runCli(['keys', 'put', 'cb-broken', '--from-stdin'], env, JSON.stringify({ key_name: 'organizations/o/apiKeys/k', private_key: broken }));
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/field "private_key" is not a valid PEM private key/);
    expect(bad.stderr).not.toContain('BEGIN');
    expect(bad.stderr).not.toContain(broken.split('\n')[1]!.slice(10, 40));
  });
});
