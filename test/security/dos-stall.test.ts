import { readFile, readdir, readlink, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually } from '../helpers/proxy.ts';
import { startLab, type Lab } from './lab.ts';
import { BANK_HOST, bankRoute, basic, connectTunnel, makeCerts, tlsInTunnel, tlsListener } from './sec-helpers.ts';

/**
 * DOS-10d..f: answers the caller never reads. A23e7b2 (DOS-10b) bounded a streamed body's wait for
 * 'drain'; these are the answers written in one go: a redacted upstream error body (up to 1 MiB),
 * a small 2xx collected whole before it is sent, the admin listener's answers. The loopback kernel
 * takes about 4 MiB of a connection nobody reads, so each case first fills it with answers the
 * caller pipelines and never reads; what is left sits in the proxy.
 */
let lab: Lab;
/** Caller a may have this many requests in flight (EGRESS_CALLER_MAX_IN_FLIGHT). */
const MAX_IN_FLIGHT = 48;
/** Just under the 1 MiB the proxy reads of an error body to redact it. */
const ERROR_BODY = 1_000_000;
/** A 2xx small enough to be collected whole before it is relayed (see HOLD_BYTES). */
const SMALL_OK = 48 * 1024;
/** The TLS listener (EGRESS_TLS_LISTEN) and the CA its certificate chains to. */
let tlsPort: number;
let tlsCa: string;
/** The forward-mode CA (EGRESS_CERTS), for tunnels to the bank route's host. */
let forwardCa: string;

beforeAll(async () => {
  const tls = await tlsListener('egress-stall-tls-');
  tlsCa = tls.ca;
  tlsPort = tls.port;
  const forward = await makeCerts([BANK_HOST]);
  forwardCa = forward.caPem;
  lab = await startLab({
    env: {
      EGRESS_CALLER_MAX_IN_FLIGHT: String(MAX_IN_FLIGHT),
      ...tls.env,
      EGRESS_CERTS: forward.certs,
    },
    upstream: (req, res) => {
      if (req.url === '/err') {
        // A provider error that quotes the key it was sent: the proxy reads it whole and redacts it.
        const body = `${'e'.repeat(ERROR_BODY - 200)} key=${String(req.headers['x-api-key'])}`;
        res.writeHead(400, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
        return void res.end(body);
      }
      if (req.url === '/ok') {
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': SMALL_OK });
        return void res.end(Buffer.alloc(SMALL_OK, 0x6f));
      }
      if (req.url === '/slow') {
        return void setTimeout(() => res.end('{"ok":true}'), 300);
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ method: req.method, url: req.url }));
    },
    routes: (u) => ({
      // Forward mode (CONNECT api.bank.test:443), response timeout 3 s.
      bank: bankRoute(u.url).replace('paths: [/accounts]', 'paths: [/accounts, /err]'),
      stall: `name: stall
prefix: /stall
upstream: ${u.url}
allow_private_addresses: true
credential: plaid
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
timeouts: { connect: 2s, response: 2s }
allow:
  - caller: a
    methods: [GET]
    paths: [/err, /ok, /slow]
  - caller: b
    methods: [GET]
    paths: [/ok]
`,
    }),
  });
}, 30_000);

afterAll(async () => {
  await lab?.close();
});

/**
 * Does process `pid` still hold its end of the TCP connection between its `port` and the peer's
 * `peerPort`? Read from /proc: the connection's socket inode, then the process's descriptors.
 */
async function holdsConnection(pid: number, port: number, peerPort: number): Promise<boolean> {
  const hex = (p: number) => p.toString(16).toUpperCase().padStart(4, '0');
  let inode: string | undefined;
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    const rows = (await readFile(file, 'utf8').catch(() => '')).split('\n').slice(1);
    for (const row of rows) {
      const f = row.trim().split(/\s+/);
      if (f.length > 9 && f[1]!.endsWith(`:${hex(port)}`) && f[2]!.endsWith(`:${hex(peerPort)}`) && f[9] !== '0') inode = f[9];
    }
  }
  if (!inode) return false;
  const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
  const links = await Promise.all(fds.map((fd) => readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
  return links.includes(`socket:[${inode}]`);
}

interface Stalled {
  readonly socket: Socket;
  /** When the requests were sent (performance.now()). */
  readonly sentAt: number;
}

/** Open a connection to `port` (over TLS with `tls`), pipeline `requests` on it and never read an answer. */
async function neverRead(port: number, requests: string, tls = false): Promise<Stalled> {
  let socket: Socket;
  await new Promise<void>((r) => {
    socket = tls ? tlsConnect({ host: '127.0.0.1', port, servername: 'localhost', ca: tlsCa }, r) : connect(port, '127.0.0.1', r);
  });
  socket!.on('error', () => {});
  socket!.pause();
  socket!.write(requests);
  return { socket: socket!, sentAt: performance.now() };
}

/** Ms from the requests until the proxy let go of the connection (Infinity when it still holds it after `withinMs`). */
async function heldFor(port: number, stalled: Stalled, withinMs: number): Promise<number> {
  const pid = lab.serve.child.pid!;
  // The proxy must have taken the connection first.
  expect(await holdsConnection(pid, port, stalled.socket.localPort!), 'the proxy holds the connection').toBe(true);
  while (performance.now() - stalled.sentAt < withinMs) {
    if (!(await holdsConnection(pid, port, stalled.socket.localPort!))) return performance.now() - stalled.sentAt;
    await new Promise((r) => setTimeout(r, 100));
  }
  return Infinity;
}

/** What the caller can still read, and whether the connection ends (it was closed) within `ms`. */
function drain(socket: Socket, ms: number): Promise<{ bytes: number; closed: boolean }> {
  return new Promise((resolve) => {
    let bytes = 0;
    socket.on('data', (d: Buffer) => void (bytes += d.length));
    const timer = setTimeout(() => resolve({ bytes, closed: false }), ms);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve({ bytes, closed: true });
    });
    socket.resume();
  });
}

async function auditLines(): Promise<Record<string, unknown>[]> {
  await new Promise((r) => setTimeout(r, 50));
  const text = await readFile(join(lab.dir, 'audit.log'), 'utf8').catch(() => '');
  return text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
}

/**
 * The proxy lets go of the stalled connection (`port`, the listener it came in on) within
 * `bounds.below` ms of the requests, and not before `bounds.above`; the caller then sees it closed.
 * Returns what the caller could still read on `reader` (the connection, or the TLS inside a tunnel).
 */
async function expectCut(label: string, port: number, stalled: Stalled, bounds: { readonly below: number; readonly above?: number }, reader: Socket = stalled.socket): Promise<number> {
  const held = await heldFor(port, stalled, 15_000);
  console.log(`${label}: let go of the connection ${Math.round(held)} ms after the requests`);
  expect(held, `${label}: ms the connection was held`).toBeLessThan(bounds.below);
  if (bounds.above !== undefined) expect(held, `${label}: not before the route's response timeout`).toBeGreaterThan(bounds.above);
  const read = await drain(reader, 5_000);
  expect(read.closed, `${label}: the caller sees its connection closed`).toBe(true);
  reader.destroy();
  return read.bytes;
}

/** The audit lines since `before` that `pick` selects: `count` of them, and some cut (aborted/caller_stalled). */
async function expectAuditedCut(before: number, pick: (line: Record<string, unknown>) => boolean, count: number): Promise<void> {
  const lines = (await auditLines()).slice(before).filter(pick);
  expect(lines.length, 'audited requests').toBe(count);
  expect(lines.filter((l) => l.decision === 'aborted' && l.reason === 'caller_stalled').length, 'requests cut').toBeGreaterThan(0);
}

/** Every request of caller a can be in flight at once again: none of its slots was kept by a cut connection. */
async function allSlotsFree(): Promise<void> {
  const answers = await Promise.all(Array.from({ length: MAX_IN_FLIGHT }, () => fetch(`${lab.url}/stall/slow`, { headers: { 'x-egress-token': lab.tokens.a } }).then(async (r) => (await r.text(), r.status))));
  expect(answers.filter((s) => s !== 200), 'requests refused (slots still held)').toEqual([]);
}

async function otherCallerAnswered(): Promise<void> {
  const t0 = performance.now();
  const r = await fetch(`${lab.url}/stall/ok`, { headers: { 'x-egress-token': lab.tokens.b } });
  expect((await r.arrayBuffer()).byteLength).toBe(SMALL_OK);
  expect(r.status).toBe(200);
  expect(performance.now() - t0, 'ms for another caller\'s answer').toBeLessThan(2_000);
}

const get = (path: string, token: string) => `GET ${path} HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${token}\r\n\r\n`;

describe('DOS: answers the caller never reads', () => {
  it('DOS-10d a caller that never reads large redacted error bodies loses the connection after the route\'s response timeout; every request is audited and its slot freed', async () => {
    const before = (await auditLines()).length;
    const count = 8;
    // 8 MB of answers: the kernel takes about half, the rest waits in the proxy.
    const stalled = await neverRead(lab.port, get('/stall/err', lab.tokens.a).repeat(count));
    await otherCallerAnswered();
    // Route response timeout 2 s.
    const bytes = await expectCut('DOS-10d', lab.port, stalled, { below: 8_000, above: 1_500 });
    expect(bytes, 'bytes the caller could still read').toBeLessThan(count * ERROR_BODY);
    // Nothing of the connection is left in flight: every request has its audit line, the ones
    // whose answers never left as aborted/caller_stalled; and caller a has all its slots.
    await expectAuditedCut(before, (l) => l.route === 'stall' && l.path === '/stall/err', count);
    await allSlotsFree();
    const metrics = await (await fetch(`${lab.admin}/metrics`)).text();
    expect(metrics).toMatch(/egress_requests_total\{[^}]*route="stall"[^}]*decision="aborted"[^}]*\} [1-9]/);
    await lab.g0();
  }, 40_000);

  it('DOS-10e a 2xx collected whole and sent in one write is bounded the same way: the requests waiting on it do not stay in flight', async () => {
    const before = (await auditLines()).length;
    // Three error bodies fill most of what the kernel takes; the small 2xx answers behind them do not fit.
    const oks = 30;
    const stalled = await neverRead(lab.port, get('/stall/err', lab.tokens.a).repeat(3) + get('/stall/ok', lab.tokens.a).repeat(oks));
    await otherCallerAnswered();
    const bytes = await expectCut('DOS-10e', lab.port, stalled, { below: 8_000 });
    expect(bytes, 'bytes the caller could still read').toBeLessThan(3 * ERROR_BODY + oks * SMALL_OK);
    await expectAuditedCut(before, (l) => l.route === 'stall' && l.path === '/stall/ok' && l.caller === 'a', oks);
    await allSlotsFree();
    await lab.g0();
  }, 40_000);

  it('DOS-10g the same on the TLS listener: redacted error bodies nobody reads cost the connection after the route\'s response timeout', async () => {
    const before = (await auditLines()).length;
    const count = 8;
    const stalled = await neverRead(tlsPort, get('/stall/err', lab.tokens.a).repeat(count), true);
    await otherCallerAnswered();
    await expectCut('DOS-10g', tlsPort, stalled, { below: 8_000, above: 1_500 });
    await expectAuditedCut(before, (l) => l.route === 'stall' && l.path === '/stall/err', count);
    await allSlotsFree();
    await lab.g0();
  }, 40_000);

  it('DOS-10h the same inside a forward-mode tunnel: the tunnel and the caller\'s connection are cut after the route\'s response timeout', async () => {
    const before = (await auditLines()).length;
    const count = 8;
    const tunnel = await connectTunnel(lab.port, `${BANK_HOST}:443`, basic('a', lab.tokens.a));
    expect(tunnel.status).toBe(200);
    const tls = await tlsInTunnel(tunnel.socket, BANK_HOST, forwardCa);
    tls.on('error', () => {});
    tls.pause();
    tls.write(`GET /err HTTP/1.1\r\nHost: ${BANK_HOST}\r\n\r\n`.repeat(count));
    const sentAt = performance.now();
    await otherCallerAnswered();
    // Route response timeout 3 s.
    await expectCut('DOS-10h', lab.port, { socket: tunnel.socket, sentAt }, { below: 10_000, above: 2_500 }, tls);
    await expectAuditedCut(before, (l) => l.route === 'bank' && String(l.path).endsWith('/err'), count);
    await lab.g0();
  }, 40_000);

  it('DOS-10f the admin listener: a caller that pipelines /metrics and never reads loses the connection (64 answers waiting, or 30 s without taking a byte)', async () => {
    const adminPort = Number(new URL(lab.admin).port);
    // Each answer is a few KiB; a thousand of them are more than the kernel takes. The pipelining
    // cap (64 answers waiting, DOS-15) is reached before the 30 s stall limit (DOS-10i reaches that).
    const stalled = await neverRead(adminPort, 'GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n'.repeat(1_000));
    // The listener still answers others meanwhile.
    expect((await fetch(`${lab.admin}/healthz`)).status).toBe(200);
    const closed = await new Promise<boolean>((resolve) => {
      if (stalled.socket.destroyed) return resolve(true);
      const timer = setTimeout(() => resolve(false), 60_000);
      stalled.socket.once('close', () => {
        clearTimeout(timer);
        resolve(true);
      });
      // Nothing is read: 'close' comes from the listener ending the connection.
      stalled.socket.once('end', () => stalled.socket.destroy());
    });
    const held = performance.now() - stalled.sentAt;
    console.log(`DOS-10f: the admin listener let go of the connection ${Math.round(held)} ms after the requests`);
    expect(closed, 'the caller sees its connection closed').toBe(true);
    expect(held, 'ms the admin listener held the connection').toBeLessThan(60_000);
    stalled.socket.destroy();
    expect((await fetch(`${lab.admin}/healthz`)).status).toBe(200);
    await lab.g0();
  }, 120_000);

  it('DOS-10i the admin listener\'s stall limit itself: large admin answers, fewer than the pipelining cap, left unread cost the connection after 30 s, and not before', async () => {
    const env = envFor(lab.dir);
    const admin = (JSON.parse((await runCli(['admin-token', 'create', 'stall', '--json'], env)).stdout) as { token: string }).token;
    // GET /v1/credentials lists every credential with its field names: three credentials of 2,000
    // 64-character field names make each answer about 400 kB. 32 of them (13 MB) are far more than
    // the loopback kernel takes of a connection nobody reads (about 4 MiB), and at most 31 wait
    // behind the one being sent: the pipelining cap (64, DOS-10f) never cuts here.
    const fieldsFile = join(lab.dir, 'many-fields.json');
    await writeFile(fieldsFile, JSON.stringify(Object.fromEntries(Array.from({ length: 2_000 }, (_, i) => [`f${String(i).padStart(5, '0')}_${'n'.repeat(57)}`, 'v']))), { mode: 0o600 });
    for (const id of ['wide-1', 'wide-2', 'wide-3']) expect((await runCli(['keys', 'put', id, '--from-file', fieldsFile], env)).code).toBe(0);
    const list = () => fetch(`${lab.admin}/v1/credentials`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => ({ status: r.status, bytes: (await r.arrayBuffer()).byteLength }));
    await eventually(async () => (await list()).status === 200, 3_000, 'the admin token known');
    await eventually(async () => (await list()).bytes > 390_000, 3_000, 'the credentials listed');
    const answer = (await list()).bytes;
    const count = 32;
    const adminPort = Number(new URL(lab.admin).port);
    const stalled = await neverRead(adminPort, `GET /v1/credentials HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ${admin}\r\n\r\n`.repeat(count));
    // The listener answers others meanwhile.
    expect((await fetch(`${lab.admin}/healthz`)).status).toBe(200);
    const held = await heldFor(adminPort, stalled, 60_000);
    console.log(`DOS-10i: the admin listener let go of the connection ${Math.round(held)} ms after ${count} requests for ${(count * answer / 1e6).toFixed(1)} MB of answers (stall limit 30 s)`);
    // 30 s without a byte taken, found by a check every 7.5 s. The watch usually starts while the
    // kernel is still taking its 4 MiB (a later answer, rendered first, waits behind one not yet
    // written): its first check counts that as progress and starts the 30 s over, so 37.5 s is
    // usual, and a second restart has been seen once. Not before 30 s: neither the pipelining cap
    // nor anything else cut it.
    expect(held, 'ms the admin listener held the connection').toBeLessThan(55_000);
    expect(held, 'not before the stall limit').toBeGreaterThan(29_000);
    const read = await drain(stalled.socket, 5_000);
    expect(read.closed, 'the client sees its connection closed').toBe(true);
    expect(read.bytes, 'bytes the client could still read').toBeLessThan(count * answer);
    stalled.socket.destroy();
    expect((await fetch(`${lab.admin}/healthz`)).status).toBe(200);
    await lab.g0();
  }, 120_000);
});

describe('DOS-09c silent connections', () => {
  it('a connection that never sends a byte is closed after about 10 s, on the plain listener and on the TLS listener after its handshake', async () => {
    const closedAfter = (socket: Socket, since: number) => new Promise<number>((resolve) => {
      const timer = setTimeout(() => resolve(Infinity), 30_000);
      socket.on('error', () => {});
      socket.once('close', () => {
        clearTimeout(timer);
        resolve(performance.now() - since);
      });
    });
    const plain = connect(lab.port, '127.0.0.1');
    await new Promise<void>((r) => plain.once('connect', () => r()));
    const plainClosed = closedAfter(plain, performance.now());
    const tls = tlsConnect({ host: '127.0.0.1', port: tlsPort, servername: 'localhost', ca: tlsCa });
    await new Promise<void>((r) => tls.once('secureConnect', () => r()));
    const tlsClosed = closedAfter(tls, performance.now());
    const [p, t] = await Promise.all([plainClosed, tlsClosed]);
    console.log(`DOS-09c: silent connections closed after ${Math.round(p)} ms (plain), ${Math.round(t)} ms (TLS)`);
    for (const [label, ms] of [['plain', p], ['TLS', t]] as const) {
      expect(ms, `${label}: closed`).toBeLessThan(20_000);
      expect(ms, `${label}: not before the header timeout`).toBeGreaterThan(9_000);
    }
    // A connection that sends its request slowly is not cut by this: the header timeout rules it.
    expect((await fetch(`${lab.url}/stall/slow`, { headers: { 'x-egress-token': lab.tokens.a } })).status).toBe(200);
    await lab.g0();
  }, 60_000);
});
