import { X509Certificate } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import forge from 'node-forge';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CALLER_URI_PREFIX } from '../../src/certs/ca.ts';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { statuses } from '../helpers/raw.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { freePort } from '../helpers/redis.ts';
import { makeTestPki, type TestPki } from '../helpers/tls.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { RawConnection } from '../security/raw-socket.ts';

/**
 * The TLS listener's certificate, key and client CA bundle are renewed in place (cert-manager,
 * certbot, a CA change-over): the running listener takes them up for new handshakes, and a change
 * that fails the start-up checks keeps the last good files in use, with a reload_rejected alert.
 */
let upstream: Upstream;
let dir: string;
let svcToken: string;
let egressCaPem: string;
/** Two listener certificates from two CAs, the way a renewal (or a move to another issuer) brings one. */
let pkiA: TestPki;
let pkiB: TestPki;
let svc: { cert: string; key: string };

beforeAll(async () => {
  upstream = await startUpstream();
  dir = await makeTempDir('egress-tls-reload-');
  const seeded = await seedDataDir(dir, {
    routes: { api: `name: api\nprefix: /api\nupstream: ${upstream.url}\nallow_private_addresses: true\nrequire_client_cert: true\ncredential: key\ninject:\n  scheme: bearer\n  token: "{secret}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/x]\n` },
    credentials: { key: { secret: 'sk_tls_reload_1234' } },
    callers: ['svc'],
  });
  svcToken = seeded.tokens.svc!;
  const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
  expect((await runCli(['certs', 'init'], env)).code).toBe(0);
  expect((await runCli(['certs', 'issue-caller', 'svc'], env)).code).toBe(0);
  egressCaPem = await readFile(join(dir, 'certs', 'ca.pem'), 'utf8');
  svc = { cert: await readFile(join(dir, 'certs', 'callers', 'svc.pem'), 'utf8'), key: await readFile(join(dir, 'certs', 'callers', 'svc.key'), 'utf8') };
  pkiA = makeTestPki({ commonName: 'listener CA A' });
  pkiB = makeTestPki({ commonName: 'listener CA B' });
}, 60_000);

afterAll(async () => {
  await upstream?.close();
});

let proxy: TestProxy | undefined;
let serve: ServeProcess | undefined;
afterEach(async () => {
  await proxy?.close();
  proxy = undefined;
  await serve?.stop();
  serve = undefined;
});

let listeners = 0;

/** The listener's three files in a folder of their own: pair A, and the egress CA (or `clientCa`) as the client CA. */
async function listenerFiles(clientCa = egressCaPem): Promise<{ cert: string; key: string; clientCa: string; env: Record<string, string> }> {
  const own = join(dir, `listener-${++listeners}`);
  await mkdir(own);
  const files = { cert: join(own, 'server.pem'), key: join(own, 'server.key'), clientCa: join(own, 'client-ca.pem') };
  await writeFile(files.cert, pkiA.serverCert);
  await writeFile(files.key, pkiA.serverKey, { mode: 0o600 });
  await writeFile(files.clientCa, clientCa);
  const env = { EGRESS_CERTS: join(dir, 'certs'), EGRESS_TLS_LISTEN: '127.0.0.1:0', EGRESS_TLS_CERT: files.cert, EGRESS_TLS_KEY: files.key, EGRESS_CLIENT_CA: files.clientCa, EGRESS_AUDIT_LOG: join(own, 'audit.log') };
  return { ...files, env };
}

async function startListener(env: Record<string, string>): Promise<number> {
  proxy = await startTestProxy({ routes: {}, dir, env });
  return proxy.proxy.tlsAddress!.port;
}

/** A TLS connection to the listener that trusts both listener CAs; its peer certificate's fingerprint. */
async function open(port: number, client?: { cert: string; key: string }, extra: object = {}): Promise<{ socket: TLSSocket; conn: RawConnection; fingerprint: string }> {
  const socket = tlsConnect({ port, host: '127.0.0.1', servername: 'localhost', ca: [pkiA.caCert, pkiB.caCert], ...client, ...extra });
  await new Promise<void>((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject));
  return { socket, conn: RawConnection.over(socket), fingerprint: socket.getPeerCertificate().fingerprint256 };
}

/** The listener's certificate on a new connection. */
async function served(port: number): Promise<string> {
  const c = await open(port);
  c.conn.close();
  return c.fingerprint;
}

/** One request on a new connection with the caller's certificate: 200, 401, or 0 when the handshake fails. */
async function callWith(port: number, client: { cert: string; key: string }): Promise<number> {
  let c;
  try {
    c = await open(port, client);
    return statuses(await c.conn.request('GET /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n'))[0] ?? 0;
  } catch {
    return 0;
  } finally {
    c?.conn.close();
  }
}

const GET = 'GET /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n';
const fingerprintOf = (pem: string) => new X509Certificate(pem).fingerprint256;
const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));
const tlsAlerts = () => proxy!.services().rules.alerts.recent().filter((a) => a.id === 'reload_rejected' && a.subject === 'tls_listener');
const tlsStatus = async () => ((await (await fetch(`${proxy!.admin}/readyz`)).json()) as { tls_listener?: { last_reload_error?: { at: string; errors: string[] } } }).tls_listener;

/** A self-signed client CA and a certificate for `caller` that it issued. */
function clientCaWithLeaf(cn: string, caller = 'svc'): { caPem: string; leaf: { cert: string; key: string } } {
  const caKeys = forge.pki.rsa.generateKeyPair(2048);
  const ca = forge.pki.createCertificate();
  ca.publicKey = caKeys.publicKey;
  ca.serialNumber = '0a';
  ca.validity.notBefore = new Date(Date.now() - 60_000);
  ca.validity.notAfter = new Date(Date.now() + 86_400_000);
  ca.setSubject([{ name: 'commonName', value: cn }]);
  ca.setIssuer([{ name: 'commonName', value: cn }]);
  ca.setExtensions([{ name: 'basicConstraints', cA: true, critical: true }, { name: 'keyUsage', keyCertSign: true, critical: true }]);
  ca.sign(caKeys.privateKey, forge.md.sha256.create());
  const keys = forge.pki.rsa.generateKeyPair(2048);
  const leaf = forge.pki.createCertificate();
  leaf.publicKey = keys.publicKey;
  leaf.serialNumber = `7${Math.floor(Math.random() * 1e12).toString(16)}`;
  leaf.validity.notBefore = new Date(Date.now() - 60_000);
  leaf.validity.notAfter = new Date(Date.now() + 86_400_000);
  leaf.setSubject([{ name: 'commonName', value: caller }]);
  leaf.setIssuer(ca.subject.attributes);
  leaf.setExtensions([{ name: 'basicConstraints', cA: false, critical: true }, { name: 'extKeyUsage', clientAuth: true }, { name: 'subjectAltName', altNames: [{ type: 6, value: `${CALLER_URI_PREFIX}${caller}` }] }]);
  leaf.sign(caKeys.privateKey, forge.md.sha256.create());
  return { caPem: forge.pki.certificateToPem(ca), leaf: { cert: forge.pki.certificateToPem(leaf), key: forge.pki.privateKeyToPem(keys.privateKey) } };
}

describe('TLS listener files reloaded on change', () => {
  it('a listener certificate renewed in place (another pair, another CA): new connections get it, a connection made before keeps working; the TLS floor stays', async () => {
    const files = await listenerFiles();
    const port = await startListener(files.env);
    expect(await served(port)).toBe(fingerprintOf(pkiA.serverCert));
    const before = await open(port, svc);
    try {
      expect(statuses(await before.conn.request(GET))).toEqual([200]);
      // Renewed by renaming new files over the old ones (cert-manager, certbot's deploy hooks), key first.
      await writeFile(`${files.key}.tmp`, pkiB.serverKey, { mode: 0o600 });
      await rename(`${files.key}.tmp`, files.key);
      await writeFile(`${files.cert}.tmp`, pkiB.serverCert);
      await rename(`${files.cert}.tmp`, files.cert);
      await eventually(async () => (await served(port)) === fingerprintOf(pkiB.serverCert), 5_000, 'the renewed certificate on a new connection');
      // The connection made before the renewal is still served, on the certificate it was made with.
      expect(before.socket.getPeerCertificate().fingerprint256).toBe(fingerprintOf(pkiA.serverCert));
      expect(statuses(await before.conn.request(GET))).toEqual([200]);
    } finally {
      before.conn.close();
    }
    // The new context keeps the listener's TLS options: a caller certificate is asked for and
    // pinned, and TLS 1.2 suites without AEAD are still refused (setSecureContext puts back Node's
    // defaults for what it is not given, and those include CBC suites).
    expect(await callWith(port, svc)).toBe(200);
    await expect(open(port, undefined, { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2', ciphers: 'AES128-SHA:AES256-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA256' })).rejects.toThrow();
    await expect(open(port, undefined, { minVersion: 'TLSv1.1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0' })).rejects.toThrow();
    expect(proxy!.logs()).toContain('TLS listener files reloaded');
    expect(tlsAlerts()).toEqual([]);
    expect(proxy!.logs()).not.toContain('PRIVATE KEY');
  });

  it.each([['key first'], ['certificate first']])('a certificate and key written one after the other (%s, a pause between) never leave the listener on a mismatched pair', async (order) => {
    const files = await listenerFiles();
    const port = await startListener(files.env);
    const writes = [() => writeFile(files.key, pkiB.serverKey), () => writeFile(files.cert, pkiB.serverCert)];
    if (order === 'certificate first') writes.reverse();
    await writes[0]!();
    // Past the debounce: the half-written pair is read, refused, and the old one stays served.
    await pause(1_000);
    for (let i = 0; i < 3; i++) expect(await served(port)).toBe(fingerprintOf(pkiA.serverCert));
    expect(await callWith(port, svc)).toBe(200);
    await writes[1]!();
    await eventually(async () => (await served(port)) === fingerprintOf(pkiB.serverCert), 5_000, 'the new pair once both are written');
    expect(await callWith(port, svc)).toBe(200);
  });

  it('a second CA added to EGRESS_CLIENT_CA: its caller certificates are accepted without a restart; a CA taken out: its callers are refused', async () => {
    const next = clientCaWithLeaf('next client CA');
    const files = await listenerFiles();
    const port = await startListener(files.env);
    expect(await callWith(port, svc)).toBe(200);
    expect(await callWith(port, next.leaf)).not.toBe(200);
    // The change-over: the new CA added beside the old one.
    await writeFile(files.clientCa, `${egressCaPem}${next.caPem}`);
    await eventually(async () => (await callWith(port, next.leaf)) === 200, 5_000, 'the added CA\'s caller certificate accepted');
    expect(await callWith(port, svc)).toBe(200);
    const open1 = await open(port, svc);
    try {
      expect(statuses(await open1.conn.request(GET))).toEqual([200]);
      // The old CA taken out once its certificates are replaced.
      await writeFile(files.clientCa, next.caPem);
      await eventually(async () => (await callWith(port, svc)) !== 200, 5_000, 'the removed CA\'s caller refused on a new connection');
      expect([0, 401]).toContain(await callWith(port, svc));
      expect(await callWith(port, next.leaf)).toBe(200);
      // The CA no longer vouches for its caller on a connection made before either (the pinned list is checked at every request).
      const answer = await open1.conn.request(GET).catch(() => '');
      expect([[], [401]]).toContainEqual(statuses(answer));
    } finally {
      open1.conn.close();
    }
    expect(tlsAlerts()).toEqual([]);
  });

  it('a key that does not match, an unreadable or non-PEM file, a client CA that is not a CA: the last good files stay in use, reload_rejected (tls_listener) is raised without key material; a good change clears it', async () => {
    const files = await listenerFiles();
    const port = await startListener(files.env);
    const good = fingerprintOf(pkiA.serverCert);
    // A key that belongs to another certificate.
    await writeFile(files.key, pkiB.serverKey);
    await eventually(() => tlsAlerts().length === 1, 5_000, 'the reload_rejected alert');
    expect(tlsAlerts()[0]).toMatchObject({ severity: 'critical', facts: { tls_key: files.key } });
    expect(String(tlsAlerts()[0]!.facts.reason)).toContain(`EGRESS_TLS_KEY ${files.key} does not belong to the certificate in EGRESS_TLS_CERT ${files.cert}`);
    expect((await tlsStatus())?.last_reload_error?.errors.join('\n')).toContain('does not belong to the certificate');
    expect(await served(port)).toBe(good);
    expect(await callWith(port, svc)).toBe(200);
    // Other bad changes, each made and undone in turn: refused with the reason, the last good context kept.
    for (const [path, text, reason] of [
      [files.cert, 'not a certificate\n', `EGRESS_TLS_CERT ${files.cert} holds no PEM certificate`],
      [files.key, 'not a key\n', `EGRESS_TLS_KEY ${files.key} holds no PEM private key`],
      [files.clientCa, pkiA.serverCert, `EGRESS_CLIENT_CA ${files.clientCa}: certificate 1 of 1 (CN=localhost) is not a CA`],
      [files.clientCa, undefined, `EGRESS_CLIENT_CA ${files.clientCa} cannot be read (ENOENT)`],
    ] as const) {
      const before = await readFile(path, 'utf8');
      if (text === undefined) await rm(path);
      else await writeFile(path, text);
      await eventually(async () => ((await tlsStatus())?.last_reload_error?.errors.join('\n') ?? '').includes(reason), 5_000, reason);
      expect(await served(port)).toBe(good);
      expect(await callWith(port, svc)).toBe(200);
      await writeFile(path, before);
    }
    expect(proxy!.logs()).toContain('TLS listener files rejected; the last good certificate, key and client CAs stay in use');
    expect(proxy!.logs()).not.toContain('PRIVATE KEY');
    // Fixed: the pair matches again, the new certificate is served and the error is cleared.
    await writeFile(files.cert, pkiB.serverCert);
    await eventually(async () => (await served(port)) === fingerprintOf(pkiB.serverCert), 5_000, 'the fixed pair');
    await eventually(async () => (await tlsStatus())?.last_reload_error === undefined, 5_000, 'the reload error cleared');
    expect(await tlsStatus()).toMatchObject({ cert: files.cert });
  });

  it('egress serve: SIGHUP reloads the listener\'s files along with the routes; a rejected change is logged as an alert without key material', async () => {
    const files = await listenerFiles();
    const port = await freePort();
    serve = await startServe(envFor(dir, { ...files.env, EGRESS_TLS_LISTEN: `127.0.0.1:${port}` }));
    expect(await served(port)).toBe(fingerprintOf(pkiA.serverCert));
    await writeFile(files.key, pkiB.serverKey);
    await eventually(() => serve!.output().includes('"alert":"reload_rejected","severity":"critical","subject":"tls_listener"'), 5_000, 'the alert');
    expect(await served(port)).toBe(fingerprintOf(pkiA.serverCert));
    await writeFile(files.cert, pkiB.serverCert);
    await eventually(async () => (await served(port)) === fingerprintOf(pkiB.serverCert), 5_000, 'the fixed pair');
    const mark = serve.output().length;
    serve.child.kill('SIGHUP');
    await eventually(() => /"trigger":"SIGHUP".*TLS listener files reloaded/.test(serve!.output().slice(mark)), 5_000, 'the SIGHUP reload');
    await eventually(() => /"trigger":"SIGHUP".*routes reloaded/.test(serve!.output().slice(mark)), 5_000, 'the routes reloaded too');
    expect(serve.output()).not.toContain('PRIVATE KEY');
    // Token callers are served throughout.
    const c = await open(port);
    try {
      expect(statuses(await c.conn.request(`GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-Egress-Token: ${svcToken}\r\n\r\n`))).toEqual([403]);
    } finally {
      c.conn.close();
    }
  });
});

