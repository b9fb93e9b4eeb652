import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect, type PeerCertificate, type TLSSocket } from 'node:tls';
import { expect } from 'vitest';
import { openVersion } from '../../src/store/credentials.ts';
import { readKeyring } from '../../src/store/keyring.ts';
import { openStore } from '../../src/store/open-store.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, makeTempDir } from '../helpers/proxy.ts';
import { freePort } from '../helpers/redis.ts';
import { makeTestPki } from '../helpers/tls.ts';

/** Shared helpers for the security suite (ssrf, mitm, dos, cred, flt). */

export const BANK_HOST = 'api.bank.test';

/** A bank route (forward mode host api.bank.test) pointing at `upstream`, carrying the plaid canary credential. */
export function bankRoute(upstream: string, extra = ''): string {
  return `name: bank
prefix: /bank
upstream: ${upstream}
allow_private_addresses: true
hosts: [${BANK_HOST}]
credential: plaid
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
timeouts: { connect: 2s, response: 3s }
allow:
  - caller: a
    methods: [GET, POST]
    paths: [/accounts]
${extra}`;
}

/**
 * The fault tests' route: /r to `upstream`, credential c injected as X-Api-Key, caller a may GET /x.
 * `route` goes before the allowlist (timeouts, …); `rule` is appended to a's rule (its rate).
 */
export function faultRoute(upstream: string, { route = '', rule = '' }: { route?: string; rule?: string } = {}): string {
  return `name: r
prefix: /r
upstream: ${upstream}
allow_private_addresses: true
credential: c
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
${route}allow:
  - caller: a
    methods: [GET]
    paths: [/x]
${rule}`;
}

/** A TLS listener for a lab: a test PKI's server certificate, with its CA as the client CA, on a free port. */
export interface TlsListenerSetup {
  /** EGRESS_TLS_LISTEN, EGRESS_TLS_CERT, EGRESS_TLS_KEY and EGRESS_CLIENT_CA. */
  readonly env: Record<string, string>;
  readonly port: number;
  /** The CA PEM that signed the listener's certificate (and the client CA). */
  readonly ca: string;
  readonly files: { readonly cert: string; readonly key: string; readonly ca: string };
}

export async function tlsListener(prefix: string): Promise<TlsListenerSetup> {
  const pki = makeTestPki();
  const dir = await makeTempDir(prefix);
  const files = { cert: join(dir, 'server.pem'), key: join(dir, 'server.key'), ca: join(dir, 'client-ca.pem') };
  await writeFile(files.cert, pki.serverCert);
  await writeFile(files.key, pki.serverKey, { mode: 0o600 });
  await writeFile(files.ca, pki.caCert);
  const port = await freePort();
  return { env: { EGRESS_TLS_LISTEN: `127.0.0.1:${port}`, EGRESS_TLS_CERT: files.cert, EGRESS_TLS_KEY: files.key, EGRESS_CLIENT_CA: files.ca }, port, ca: pki.caCert, files };
}

/** Run `egress certs init` for a folder whose routes name `hosts`; returns the EGRESS_CERTS path and the CA PEM. */
export async function makeCerts(hosts: readonly string[]): Promise<{ certs: string; caPem: string; dir: string }> {
  const dir = await makeTempDir('egress-sec-certs-');
  await mkdir(join(dir, 'routes'), { recursive: true });
  await writeFile(join(dir, 'routes', 'bank.yaml'), bankRoute('https://127.0.0.1:9').replace(`hosts: [${BANK_HOST}]`, `hosts: [${hosts.join(', ')}]`));
  const certs = join(dir, 'certs');
  const init = await runCli(['certs', 'init'], envFor(dir, { EGRESS_CERTS: certs }));
  expect(init.code, init.stderr + init.stdout).toBe(0);
  return { certs, caPem: await readFile(join(certs, 'ca.pem'), 'utf8'), dir };
}

export function basic(caller: string, token: string): string {
  return `Basic ${Buffer.from(`${caller}:${token}`).toString('base64')}`;
}

/** Send CONNECT; resolves with the status and the raw head; the socket stays open on 200. */
export function connectTunnel(port: number, target: string, auth: string | null, hostHeader = target): Promise<{ status: number; head: string; socket: Socket }> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => {
      socket.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${hostHeader}\r\n${auth ? `Proxy-Authorization: ${auth}\r\n` : ''}\r\n`);
    });
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`no CONNECT answer for ${target}: ${JSON.stringify(buf)}`)), 5_000);
    const onData = (d: Buffer) => {
      buf += d.toString('latin1');
      const end = buf.indexOf('\r\n\r\n');
      if (end === -1) return;
      socket.off('data', onData);
      clearTimeout(timer);
      resolve({ status: Number(buf.slice(9, 12)), head: buf, socket });
    };
    socket.on('data', onData);
    socket.on('error', (err) => {
      clearTimeout(timer);
      if (buf) resolve({ status: Number(buf.slice(9, 12)) || 0, head: buf, socket });
      else reject(err);
    });
    socket.on('close', () => {
      clearTimeout(timer);
      if (buf.indexOf('\r\n\r\n') === -1) resolve({ status: Number(buf.slice(9, 12)) || 0, head: buf, socket });
    });
  });
}

/** TLS inside an open tunnel; resolves the TLS socket after the handshake (rejects if it fails). */
export function tlsInTunnel(socket: Socket, servername: string | undefined, ca: string): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const tls = tlsConnect({ socket, ...(servername !== undefined ? { servername } : {}), ca }, () => resolve(tls));
    tls.on('error', reject);
    setTimeout(() => reject(new Error('tls handshake timed out')), 5_000).unref();
  });
}

/** Write raw bytes on a TLS socket and collect everything until it closes. */
export function exchange(tls: TLSSocket, bytes: string): Promise<string> {
  return new Promise((resolve) => {
    let buf = '';
    tls.on('data', (d: Buffer) => (buf += d.toString('latin1')));
    tls.on('end', () => resolve(buf));
    tls.on('close', () => resolve(buf));
    tls.on('error', () => resolve(buf));
    tls.write(bytes);
    setTimeout(() => {
      tls.destroy();
      resolve(buf);
    }, 5_000).unref();
  });
}

export function peer(tls: TLSSocket): PeerCertificate {
  return tls.getPeerCertificate(false);
}

/** RSS of a process in KiB, from /proc. */
export async function rssKb(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
}

export function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

/** Every data key in the store that the keyring at `keyPath` cannot unwrap, as "id vN (kek K)". */
export async function unopenable(storeSpec: string, keyPath: string): Promise<string[]> {
  const keyring = await readKeyring(keyPath);
  const store = openStore(storeSpec);
  const lost: string[] = [];
  try {
    for (const record of (await store.load()).credentials.values()) {
      for (const v of record.versions) {
        if (!v.dek) continue;
        try {
          openVersion(keyring, record.id, v);
        } catch {
          lost.push(`${record.id} v${v.version} (kek ${v.kek})`);
        }
      }
    }
  } finally {
    await store.close();
  }
  return lost;
}

/** How long a listener keeps a connection that sends `head` and then a header line a second, without end (up to 45 s), and what it answered. */
export async function dribbledHeaderLifetime(port: number, head: string): Promise<{ ms: number; answer: string }> {
  const started = Date.now();
  const socket = connect(port, '127.0.0.1');
  socket.on('error', () => {});
  let answer = '';
  socket.on('data', (d: Buffer) => (answer += d.toString('latin1')));
  socket.write(head);
  const timer = setInterval(() => socket.writable && socket.write('X-a: b\r\n'), 1_000);
  const ms = await new Promise<number>((resolve) => {
    socket.once('close', () => resolve(Date.now() - started));
    setTimeout(() => resolve(Date.now() - started), 45_000);
  });
  clearInterval(timer);
  socket.destroy();
  return { ms, answer };
}
