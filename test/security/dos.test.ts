import { readFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { createServer, type Server } from 'node:http';
import { connect as h2connect } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LISTENER_LIMITS } from '../../src/server/reverse.ts';
import { freePort } from '../helpers/redis.ts';
import { rawRequest, startLab, statuses, type Lab } from './lab.ts';
import { exchangeOn } from '../helpers/raw.ts';
import { rawExchange } from './raw-socket.ts';
import { bankRoute, basic, connectTunnel, exchange, makeCerts, percentile, rssKb, tlsInTunnel, tlsListener } from './sec-helpers.ts';

/** DOS: slow clients, big bodies, bucket evasion, connection floods and back-pressure. */
let lab: Lab;
let big: Server;
let bigPort: number;
let bigBytesSent = 0;
/** When the big upstream's last response closed (ms since the epoch), however it ended. */
let bigClosedAt = 0;
/** The TLS listener (EGRESS_TLS_LISTEN) and the CA its certificate chains to. */
let tlsPort: number;
let tlsCa: string;
/** The TLS listener's certificate, key and client CA files, for a test that starts its own proxy. */
let tlsFiles: { cert: string; key: string; ca: string };

beforeAll(async () => {
  // An upstream that streams up to 256 MiB, honouring back-pressure, so only the proxy can buffer it.
  big = createServer((req, res) => {
    if (req.url === '/chunks') {
      // How many pieces the proxy sent the body in.
      let pieces = 0;
      let bytes = 0;
      req.on('data', (d: Buffer) => {
        pieces++;
        bytes += d.length;
      });
      req.on('end', () => res.end(JSON.stringify({ pieces, bytes })));
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    const chunk = Buffer.alloc(64 * 1024, 0x61);
    let sent = 0;
    const pump = () => {
      while (sent < 256 * 1024 * 1024) {
        sent += chunk.length;
        bigBytesSent += chunk.length;
        if (!res.write(chunk)) return void res.once('drain', pump);
      }
      res.end();
    };
    res.on('close', () => void (bigClosedAt = Date.now()));
    pump();
  });
  await new Promise<void>((r) => big.listen(0, '127.0.0.1', r));
  bigPort = (big.address() as AddressInfo).port;
  const tls = await tlsListener('egress-dos-tls-');
  tlsCa = tls.ca;
  tlsFiles = tls.files;
  tlsPort = tls.port;
  lab = await startLab({
    env: tls.env,
    routes: (u) => ({
      rl: `name: rl
prefix: /rl
upstream: ${u.url}
allow_private_addresses: true
credential: plaid
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
allow:
  - caller: a
    methods: [GET]
    paths: [/x]
    rate: { rate: 1/h, burst: 3 }
  - caller: b
    methods: [GET]
    paths: [/x]
    rate: { rate: 1/h, burst: 3 }
`,
      big: `name: big
prefix: /big
upstream: http://127.0.0.1:${bigPort}
allow_private_addresses: true
credential: plaid
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
timeouts: { connect: 2s, response: 30s }
allow:
  - caller: a
    methods: [GET]
    paths: [/stream]
`,
      stall: `name: stall
prefix: /stall
upstream: http://127.0.0.1:${bigPort}
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
    paths: [/stream]
  - caller: b
    methods: [POST]
    paths: [/chunks]
`,
    }),
  });
}, 30_000);

afterAll(async () => {
  await lab?.close();
  big?.closeAllConnections();
  await new Promise((r) => big?.close(r));
});

/** CPU time (user + system) a process has used, in ms, from /proc (clock ticks of 10 ms). */
async function cpuMs(pid: number): Promise<number> {
  const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

async function timedB(): Promise<number> {
  const t0 = performance.now();
  const res = await fetch(`${lab.url}/plaid/institutions/x`, { headers: { 'x-egress-token': lab.tokens.b } });
  await res.arrayBuffer();
  expect(res.status).toBe(200);
  return performance.now() - t0;
}

/** HTTP/2 bytes by hand (RFC 9113 §3.4, §4.1): the connection preface and frames. */
const H2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1');
function h2frame(type: number, flags: number, stream: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(9);
  head.writeUIntBE(payload.length, 0, 3);
  head[3] = type;
  head[4] = flags;
  head.writeUInt32BE(stream & 0x7fffffff, 5);
  return Buffer.concat([head, payload]);
}
const H2 = { HEADERS: 0x1, RST_STREAM: 0x3, SETTINGS: 0x4, WINDOW_UPDATE: 0x8, CONTINUATION: 0x9 } as const;
/** SETTINGS: MAX_CONCURRENT_STREAMS 100, INITIAL_WINDOW_SIZE 65535. */
const SETTINGS = h2frame(H2.SETTINGS, 0, 0, Buffer.from([0, 3, 0, 0, 0, 100, 0, 4, 0, 0, 0xff, 0xff]));
/** HPACK: :method GET, :scheme http, :path / (static table), :authority "p". */
const HPACK_GET = Buffer.from([0x82, 0x86, 0x84, 0x41, 0x01, 0x70]);
const h2Attacks: Record<string, Buffer> = {
  'preface + SETTINGS': Buffer.concat([H2_PREFACE, SETTINGS]),
  // CVE-2023-44487: HEADERS then RST_STREAM(CANCEL), thousands of streams in one write.
  'Rapid Reset (5,000 HEADERS + RST_STREAM)': Buffer.concat([H2_PREFACE, SETTINGS, ...Array.from({ length: 5_000 }, (_, i) => Buffer.concat([h2frame(H2.HEADERS, 0x5, 2 * i + 1, HPACK_GET), h2frame(H2.RST_STREAM, 0, 2 * i + 1, Buffer.from([0, 0, 0, 8]))]))]),
  'stream-0 WINDOW_UPDATE overflow': Buffer.concat([H2_PREFACE, SETTINGS, h2frame(H2.WINDOW_UPDATE, 0, 0, Buffer.from([0x7f, 0xff, 0xff, 0xff])), h2frame(H2.WINDOW_UPDATE, 0, 0, Buffer.from([0x7f, 0xff, 0xff, 0xff]))]),
  'bad HPACK (index past the tables)': Buffer.concat([H2_PREFACE, SETTINGS, h2frame(H2.HEADERS, 0x5, 1, Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]))]),
  // CVE-2024-27983 class: HEADERS without END_HEADERS, then endless CONTINUATION frames.
  'CONTINUATION flood': Buffer.concat([H2_PREFACE, SETTINGS, h2frame(H2.HEADERS, 0x1, 1, HPACK_GET), ...Array.from({ length: 2_000 }, () => h2frame(H2.CONTINUATION, 0, 1, Buffer.from([0x40, 0x01, 0x78, 0x01, 0x79])))]),
};

/** A raw TLS exchange with the TLS listener: what it answered until it closed or went quiet. */
function tlsExchange(bytes: string, idleMs = 600): Promise<string> {
  return exchangeOn((ready) => tlsConnect({ host: '127.0.0.1', port: tlsPort, servername: 'localhost', ca: tlsCa, ALPNProtocols: ['http/1.1'] }, ready), bytes, idleMs);
}

/** A TLS handshake offering `protocols` by ALPN: the protocol the listener chose, or the handshake error. */
function alpnOffer(protocols: string[]): Promise<{ chosen: string | false | null; error?: string }> {
  return new Promise((resolve) => {
    const socket = tlsConnect({ host: '127.0.0.1', port: tlsPort, servername: 'localhost', ca: tlsCa, ALPNProtocols: protocols }, () => {
      resolve({ chosen: socket.alpnProtocol ?? null });
      socket.destroy();
    });
    socket.on('error', (err: NodeJS.ErrnoException) => resolve({ chosen: null, error: err.code ?? err.message }));
  });
}

/** node:http2's own client: how its request ended ("response 200" would mean the proxy speaks HTTP/2). */
function h2Request(authority: string, token: string): Promise<string> {
  return new Promise((resolve) => {
    const session = h2connect(authority, { ca: tlsCa, servername: 'localhost' });
    const timer = setTimeout(() => done('timeout'), 5_000);
    const done = (how: string) => {
      clearTimeout(timer);
      session.destroy();
      resolve(how);
    };
    session.on('error', (err: NodeJS.ErrnoException) => done(`error ${err.code ?? err.message}`));
    session.on('close', () => done('closed'));
    const req = session.request({ ':method': 'GET', ':path': '/plaid/institutions/x', 'x-egress-token': token });
    req.on('response', (headers) => done(`response ${String(headers[':status'])}`));
    req.on('error', (err: NodeJS.ErrnoException) => done(`error ${err.code ?? err.message}`));
    req.end();
  });
}

describe('DOS', () => {
  it('DOS-01 slowloris: header and request timeouts are set well under Node\'s defaults, and the parser is strict', async () => {
    expect(LISTENER_LIMITS.headersTimeoutMs).toBeLessThanOrEqual(10_000);
    expect(LISTENER_LIMITS.requestTimeoutMs).toBeLessThanOrEqual(60_000);
    expect(LISTENER_LIMITS.maxHeaderSize).toBeLessThanOrEqual(16 * 1024);
    const argv = (await import('node:fs/promises')).readFile(`/proc/${lab.serve.child.pid}/cmdline`, 'latin1');
    expect(await argv).not.toContain('insecure-http-parser');
    await lab.g0();
  });

  it('DOS-01b oversized headers are refused with 431 and the connection closed', async () => {
    const raw = await rawRequest(lab.port, `GET /plaid/institutions/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.b}\r\nX-Big: ${'a'.repeat(17 * 1024)}\r\n\r\n`);
    expect(statuses(raw)).toEqual([431]);
    await lab.g0();
  });

  it('DOS-14 a chunked body written one byte per chunk is sent upstream in a few large pieces, not 100,000 tiny ones', async () => {
    // Each chunk used to go through the proxy and out to the upstream on its own: a 600 kB upload
    // of 1-byte chunks cost the proxy some ten times the CPU Node's parser spends on it, and made
    // the upstream parse every chunk too.
    const count = 100_000;
    const body = `${'1\r\nx\r\n'.repeat(count)}0\r\n\r\n`;
    const before = await cpuMs(lab.serve.child.pid!);
    const t0 = performance.now();
    const answer = await rawRequest(lab.port, `POST /stall/chunks HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.b}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${body}`, 2_000);
    const spent = (await cpuMs(lab.serve.child.pid!)) - before;
    expect(statuses(answer)).toEqual([200]);
    const { pieces, bytes } = JSON.parse(answer.slice(answer.indexOf('{'), answer.lastIndexOf('}') + 1)) as { pieces: number; bytes: number };
    console.log(`DOS-14: ${count} one-byte chunks reached the upstream in ${pieces} pieces; the proxy spent ${spent} ms of CPU (${Math.round(performance.now() - t0)} ms wall)`);
    expect(bytes).toBe(count);
    expect(pieces, 'pieces at the upstream').toBeLessThan(count / 100);
    await lab.g0();
  }, 30_000);

  it('DOS-01e the header-count limit holds on every listener: 150 small headers get 431 on the plain and the TLS listener alike', async () => {
    const mark = lab.u.requests.length;
    const request = `GET /plaid/institutions/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.b}\r\n${Array.from({ length: LISTENER_LIMITS.maxHeadersCount + 50 }, (_, i) => `X-H${i}: v`).join('\r\n')}\r\nConnection: close\r\n\r\n`;
    expect(Buffer.byteLength(request), 'well under maxHeaderSize').toBeLessThan(LISTENER_LIMITS.maxHeaderSize / 4);
    expect(statuses(await rawRequest(lab.port, request)), 'plain').toEqual([431]);
    expect(statuses(await tlsExchange(request)), 'tls').toEqual([431]);
    await lab.g0(mark, 0);
  });

  it('DOS-03 oversized body (max_body 64kb) with Content-Length, declared or huge: 413, nothing forwarded whole', async () => {
    const mark = lab.u.requests.length;
    const body = 'x'.repeat(64 * 1024 + 1);
    const headers = { 'x-egress-token': lab.tokens.a, 'content-type': 'application/json' };
    const cl = await fetch(`${lab.url}/plaid/accounts/get`, { method: 'POST', headers, body });
    lab.seen(await cl.text());
    expect(cl.status).toBe(413);
    // A huge declared length is refused before any body arrives.
    const huge = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 1099511627776\r\n\r\n`, 1_000);
    expect(statuses(huge)).toEqual([413]);
    // (Chunked oversized bodies: see dos-limits.test.ts, DOS-03b.)
    for (const r of lab.u.requests.slice(mark)) expect(r.body.length).toBeLessThanOrEqual(64 * 1024);
    await lab.g0(mark, 0);
  });

  it('DOS-05 bucket evasion: X-Forwarded-For, Host, query, path case and trailing slash all land in the same bucket', async () => {
    const variants: [string, Record<string, string>][] = [
      ['/rl/x', { 'x-forwarded-for': '1.1.1.1' }],
      ['/rl/x?a=1', { 'x-forwarded-for': '2.2.2.2', 'x-real-ip': '2.2.2.2' }],
      ['/rl/x?b=2', { forwarded: 'for=3.3.3.3' }],
      ['/rl/x', { 'x-forwarded-for': '4.4.4.4' }],
      ['/rl/x?c=3', { 'x-forwarded-for': '5.5.5.5' }],
      ['/rl/x/', {}],
      ['/RL/x', {}],
      ['/rl/X', {}],
      ['/rl/%78', { 'x-forwarded-for': '6.6.6.6' }],
      ['/rl/x?', { 'x-forwarded-for': '7.7.7.7' }],
    ];
    const got: number[] = [];
    for (const [path, extra] of variants) {
      const raw = await rawRequest(lab.port, `GET ${path} HTTP/1.1\r\nHost: ${extra['x-forwarded-for'] ?? 'p'}\r\nX-Egress-Token: ${lab.tokens.a}\r\n${Object.entries(extra).map(([k, v]) => `${k}: ${v}\r\n`).join('')}Connection: close\r\n\r\n`);
      lab.seen(raw);
      got.push(statuses(raw)[0] ?? 0);
    }
    // Exactly the burst (3) succeeds across every variant; the rest are 429 or not this route/path.
    expect(got.filter((s) => s === 200)).toHaveLength(3);
    expect(got.slice(0, 3)).toEqual([200, 200, 200]);
    for (const s of got.slice(3)) expect([400, 403, 404, 429]).toContain(s);
    expect(got[3]).toBe(429);
    expect(got[4]).toBe(429);
    // Caller b has its own bucket.
    const b = await fetch(`${lab.url}/rl/x`, { headers: { 'x-egress-token': lab.tokens.b } });
    await b.arrayBuffer();
    expect(b.status).toBe(200);
    await lab.g0();
  });

  it('DOS-06 one rate-limit bucket whichever way the caller arrives: reverse, absolute-form (Basic or Bearer) and a CONNECT tunnel', async () => {
    // Its own proxy, in forward mode: a's bank rule allows 3 requests an hour, counted across the entry paths.
    const { certs, caPem } = await makeCerts(['api.bank.test']);
    const fwd = await startLab({ env: { EGRESS_CERTS: certs }, routes: (u) => ({ bank: bankRoute(u.url).replace('paths: [/accounts]', 'paths: [/accounts]\n    rate: { rate: 1/h, burst: 3 }') }) });
    const authA = basic('a', fwd.tokens.a);
    try {
      const mark = fwd.u.requests.length;
      const got: number[] = [];
      for (let i = 0; i < 2; i++) {
        const res = await fetch(`${fwd.url}/bank/accounts`, { headers: { 'x-egress-token': fwd.tokens.a } });
        fwd.seen(await res.text());
        got.push(res.status);
      }
      for (const auth of [authA, `Bearer ${fwd.tokens.a}`]) {
        const raw = await rawRequest(fwd.port, `GET http://api.bank.test/accounts HTTP/1.1\r\nHost: api.bank.test\r\nProxy-Authorization: ${auth}\r\nConnection: close\r\n\r\n`);
        fwd.seen(raw);
        got.push(statuses(raw)[0] ?? 0);
      }
      for (let i = 0; i < 2; i++) {
        const t = await connectTunnel(fwd.port, 'api.bank.test:443', authA);
        expect(t.status).toBe(200);
        const out = await exchange(await tlsInTunnel(t.socket, 'api.bank.test', caPem), 'GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n');
        fwd.seen(out);
        got.push(statuses(out)[0] ?? 0);
      }
      expect(got).toEqual([200, 200, 200, 429, 429, 429]);
      await fwd.g0(mark, 3);
      expect(fwd.u.requests.length - mark).toBe(3);
    } finally {
      await fwd.close();
    }
  }, 30_000);

  it('DOS-09 connection flood: 500 idle TCP connections; b still succeeds with bounded latency; FDs bounded', async () => {
    const baseline: number[] = [];
    for (let i = 0; i < 10; i++) baseline.push(await timedB());
    const sockets: Socket[] = [];
    await Promise.all(Array.from({ length: 500 }, () => new Promise<void>((resolve) => {
      const s = connect(lab.port, '127.0.0.1', () => resolve());
      s.on('error', () => resolve());
      sockets.push(s);
    })));
    // Half of them start a request and never finish it.
    sockets.forEach((s, i) => i % 2 === 0 && s.writable && s.write('GET /plaid/institutions/x HTTP/1.1\r\nHost: p\r\n'));
    const latencies: number[] = [];
    for (let i = 0; i < 30; i++) latencies.push(await timedB());
    const fds = (await (await import('node:fs/promises')).readdir(`/proc/${lab.serve.child.pid}/fd`)).length;
    console.log(`DOS-09: b p50 ${percentile(baseline, 50).toFixed(1)} ms before, p99 ${percentile(latencies, 99).toFixed(1)} ms during 500 idle connections; proxy fds ${fds}`);
    expect(percentile(latencies, 99), 'b p99 ms').toBeLessThan(500);
    expect(fds).toBeLessThan(2_000);
    for (const s of sockets) s.destroy();
    await lab.g0();
  });

  it('DOS-10 back-pressure: a caller that stops reading a large response does not grow the proxy\'s RSS without bound', async () => {
    const before = await rssKb(lab.serve.child.pid!);
    bigBytesSent = 0;
    const socket = connect(lab.port, '127.0.0.1');
    socket.on('error', () => {});
    await new Promise<void>((r) => socket.once('connect', () => r()));
    socket.write(`GET /big/stream HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\n\r\n`);
    // Read the first bytes (the response started), then stop reading.
    await new Promise<void>((r) => socket.once('data', () => r()));
    socket.pause();
    let peak = before;
    for (let i = 0; i < 12; i++) {
      await new Promise((r) => setTimeout(r, 250));
      peak = Math.max(peak, await rssKb(lab.serve.child.pid!));
    }
    console.log(`DOS-10: proxy RSS ${before} KiB before, peak ${peak} KiB while the caller did not read; upstream had sent ${(bigBytesSent / 1048576).toFixed(1)} MiB of 256`);
    expect(bigBytesSent, 'upstream was throttled by back-pressure').toBeLessThan(64 * 1024 * 1024);
    expect(peak - before, 'RSS growth KiB').toBeLessThan(64 * 1024);
    socket.destroy();
    await lab.g0();
  });

  it('DOS-10j back-pressure behind a pipelined answer: a second large response queued behind the first, which the caller stops reading, is not read into the proxy\'s memory', async () => {
    // The queued answer's first write reported it full (nothing takes a queued answer's bytes until
    // the one before it is done) while the upstream was not paused: its whole body went into memory.
    const before = await rssKb(lab.serve.child.pid!);
    bigBytesSent = 0;
    const socket = connect(lab.port, '127.0.0.1');
    socket.on('error', () => {});
    await new Promise<void>((r) => socket.once('connect', () => r()));
    socket.write(`GET /big/stream HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\n\r\n`.repeat(2));
    await new Promise<void>((r) => socket.once('data', () => r()));
    socket.pause();
    let peak = before;
    for (let i = 0; i < 12; i++) {
      await new Promise((r) => setTimeout(r, 250));
      peak = Math.max(peak, await rssKb(lab.serve.child.pid!));
    }
    console.log(`DOS-10j: proxy RSS ${before} KiB before, peak ${peak} KiB; the upstream had sent ${(bigBytesSent / 1048576).toFixed(1)} MiB of the two 256 MiB bodies`);
    expect(bigBytesSent, 'upstream was throttled by back-pressure').toBeLessThan(64 * 1024 * 1024);
    expect(peak - before, 'RSS growth KiB').toBeLessThan(64 * 1024);
    socket.destroy();
    await lab.g0();
  });

  it('DOS-10c a caller that pipelines without reading loses the connection once 64 answers wait behind the first; the upstream streams are released', async () => {
    bigBytesSent = 0;
    const socket = connect(lab.port, '127.0.0.1');
    socket.on('error', () => {});
    const closed = new Promise<number>((r) => socket.once('close', () => r(performance.now())));
    await new Promise<void>((r) => socket.once('connect', () => r()));
    socket.pause();
    const t0 = performance.now();
    // Each answer is a 256 MiB stream the caller never reads: every one behind the first waits in Node's queue.
    socket.write(`GET /big/stream HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\n\r\n`.repeat(300));
    const closedAfter = await Promise.race([closed.then((t) => t - t0), new Promise<number>((r) => setTimeout(() => r(Infinity), 5_000))]);
    socket.destroy();
    expect(closedAfter, 'ms until the proxy closed the connection').toBeLessThan(5_000);
    // What was on the way upstream was aborted with it: the upstream stops being asked for bytes.
    await new Promise((r) => setTimeout(r, 500));
    const sentThen = bigBytesSent;
    await new Promise((r) => setTimeout(r, 500));
    expect(bigBytesSent - sentThen, 'upstream bytes sent after the close').toBeLessThan(1024 * 1024);
    await new Promise((r) => setTimeout(r, 100));
    const audit = await readFile(join(lab.dir, 'audit.log'), 'utf8');
    expect(audit).toContain('"reason":"pipeline_overflow"');
    await lab.g0();
  });

  it('DOS-10b a caller that stops reading is cut off after the route\'s response timeout, and the upstream connection is let go', async () => {
    // With back-pressure alone, a caller that never reads held its in-flight slot and a connection
    // of the upstream's pool for as long as it liked (undici's bodyTimeout does not run while the
    // proxy has paused the upstream): a few such callers took a whole pool.
    bigClosedAt = 0;
    const socket = connect(lab.port, '127.0.0.1');
    socket.on('error', () => {});
    await new Promise<void>((r) => socket.once('connect', () => r()));
    socket.write(`GET /stall/stream HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\n\r\n`);
    await new Promise<void>((r) => socket.once('data', () => r()));
    socket.pause();
    const t0 = Date.now();
    while (bigClosedAt === 0 && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 100));
    const heldMs = bigClosedAt === 0 ? Infinity : bigClosedAt - t0;
    console.log(`DOS-10b: the upstream response was let go ${heldMs} ms after the caller stopped reading (route response timeout 2 s)`);
    expect(heldMs, 'upstream connection released').toBeLessThan(6_000);
    // The caller's connection is closed too: what it reads now ends before 256 MiB.
    socket.resume();
    const ended = await new Promise<boolean>((r) => {
      socket.on('close', () => r(true));
      setTimeout(() => r(false), 5_000);
    });
    expect(ended, 'caller connection closed').toBe(true);
    socket.destroy();
    await lab.g0();
  }, 30_000);

  it('DOS-07 HTTP/2 is not served: h2c preface and frame attacks get 400 and a close, h2c upgrades no 101, TLS never selects h2; a burst leaves the process bounded', async () => {
    const mark = lab.u.requests.length;
    // Prior-knowledge h2c on the plain listener: an HTTP/1.1 parser sees "PRI * HTTP/2.0" and refuses it.
    for (const [what, bytes] of Object.entries(h2Attacks)) {
      const answer = await rawExchange(lab.port, bytes, 2_000);
      lab.seen(answer.data);
      expect(answer.data, what).toMatch(/^HTTP\/1\.1 400 /);
      expect(statuses(answer.data), what).toEqual([400]);
      expect(answer.closed, `${what}: connection closed`).toBe(true);
    }
    // Upgrade: h2c with HTTP2-Settings (RFC 7540 §3.2) on both listeners, with and without a caller token.
    const settings64 = SETTINGS.subarray(9).toString('base64url');
    for (const [path, token] of [['/plaid/institutions/x', lab.tokens.b], ['/plaid/accounts/get', lab.tokens.a], ['/', ''], ['*', '']] as const) {
      const request = [`${path === '*' ? 'OPTIONS' : 'GET'} ${path} HTTP/1.1`, 'Host: p', ...(token ? [`X-Egress-Token: ${token}`] : []), 'Connection: Upgrade, HTTP2-Settings', 'Upgrade: h2c', `HTTP2-Settings: ${settings64}`, '', ''].join('\r\n');
      for (const [listener, answer] of [['plain', await rawRequest(lab.port, request)], ['tls', await tlsExchange(request)]] as const) {
        lab.seen(answer);
        expect(answer, `${listener} ${path}`).not.toMatch(/^HTTP\/1\.1 101/m);
        const got = statuses(answer);
        expect(got.length, `${listener} ${path}: answered`).toBeGreaterThanOrEqual(1);
        expect([400, 401, 403, 404], `${listener} ${path} -> ${got[0]}`).toContain(got[0]);
      }
    }
    // ALPN: offered only h2, the listener picks nothing (or fails the handshake); offered both, http/1.1.
    const onlyH2 = await alpnOffer(['h2']);
    expect(onlyH2.chosen, JSON.stringify(onlyH2)).not.toBe('h2');
    if (onlyH2.error === undefined) expect([false, null]).toContain(onlyH2.chosen);
    const both = await alpnOffer(['h2', 'http/1.1']);
    expect(both).toEqual({ chosen: 'http/1.1' });
    // node:http2's client, on TLS (ALPN h2) and as prior-knowledge h2c on the plain listener: no response.
    const h2Outcomes: string[] = [];
    for (const authority of [`https://127.0.0.1:${tlsPort}`, `http://127.0.0.1:${lab.port}`]) {
      const how = await h2Request(authority, lab.tokens.b);
      h2Outcomes.push(how);
      expect(how, authority).toMatch(/^(error|closed)/);
    }
    console.log(`DOS-07: ALPN [h2] -> ${JSON.stringify(onlyH2)}; node:http2 client (TLS, h2c) -> ${h2Outcomes.join(', ')}`);
    // A burst: rapid-reset and flood payloads, h2 clients on both listeners; then b still gets through.
    const before = await rssKb(lab.serve.child.pid!);
    const payloads = Object.values(h2Attacks);
    let refused = 0;
    for (let round = 0; round < 5; round++) {
      const results = await Promise.all([
        ...Array.from({ length: 40 }, (_, i) => rawExchange(lab.port, payloads[i % payloads.length]!, 2_000).then((a) => statuses(a.data)[0] === 400 && a.closed, () => true)),
        ...Array.from({ length: 10 }, (_, i) => h2Request(i % 2 ? `https://127.0.0.1:${tlsPort}` : `http://127.0.0.1:${lab.port}`, lab.tokens.b).then((how) => !how.startsWith('response'))),
      ]);
      refused += results.filter(Boolean).length;
    }
    expect(refused, 'every h2 attempt refused').toBe(5 * 50);
    const after = await rssKb(lab.serve.child.pid!);
    console.log(`DOS-07: proxy RSS ${before} KiB before, ${after} KiB after 250 HTTP/2 attempts`);
    expect(after - before, 'RSS growth KiB').toBeLessThan(64 * 1024);
    expect(await timedB()).toBeLessThan(2_000);
    await lab.g0(mark, 1);
  }, 60_000);

  it('DOS-13 a client that resets its connection while a CONNECT or an upgrade is answered does not take the process down', async () => {
    // After 'connect' and 'upgrade' Node hands over the socket without its error listener: a reset
    // (ECONNRESET) while the refusal or the tunnel's 200 was being written was an unhandled 'error'
    // event, and one unauthenticated client stopped the proxy for everyone.
    const { certs } = await makeCerts(['api.bank.test']);
    const fwdTlsPort = await freePort();
    const fwd = await startLab({
      env: { EGRESS_CERTS: certs, EGRESS_TLS_LISTEN: `127.0.0.1:${fwdTlsPort}`, EGRESS_TLS_CERT: tlsFiles.cert, EGRESS_TLS_KEY: tlsFiles.key, EGRESS_CLIENT_CA: tlsFiles.ca },
      routes: (u) => ({ bank: bankRoute(u.url) }),
    });
    try {
      const requests: Record<string, string> = {
        'CONNECT to an unlisted host': 'CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n',
        'CONNECT without credentials': 'CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\n\r\n',
        'CONNECT with credentials': `CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: ${basic('a', fwd.tokens.a)}\r\n\r\n`,
        'WebSocket upgrade': 'GET /plaid/institutions/x HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n',
      };
      /** Send `bytes` (over TLS to the TLS listener when `tls`), then reset the TCP connection after `afterMs`. */
      const reset = (tls: boolean, bytes: string, afterMs: number) => new Promise<void>((resolve) => {
        const raw = connect(tls ? fwdTlsPort : fwd.port, '127.0.0.1');
        raw.on('error', () => resolve());
        const send = (socket: Socket) => {
          socket.write(bytes);
          setTimeout(() => {
            raw.resetAndDestroy();
            resolve();
          }, afterMs);
        };
        raw.once('connect', () => {
          if (!tls) return send(raw);
          const secure = tlsConnect({ socket: raw, servername: 'localhost', ca: tlsCa }, () => send(secure));
          secure.on('error', () => resolve());
        });
      });
      for (const [what, bytes] of Object.entries(requests)) {
        for (const afterMs of [0, 5, 50]) {
          for (let i = 0; i < 3; i++) await reset(false, bytes, afterMs);
          if (what === 'WebSocket upgrade') for (let i = 0; i < 3; i++) await reset(true, bytes, afterMs);
          await new Promise((r) => setTimeout(r, 50));
          expect(fwd.serve.child.exitCode, `${what}, reset after ${afterMs} ms: process alive`).toBeNull();
        }
      }
      await fwd.g0();
    } finally {
      await fwd.close();
    }
  });
  it('DOS-13b resets at every stage (before and during the TLS handshake in a tunnel, mid inner request, mid body, mid streamed answer, in absolute form, on bad bytes) leave the process up', async () => {
    const { certs, caPem } = await makeCerts(['api.bank.test']);
    // U streams its answer in pieces, so a reset can land while the proxy is relaying.
    const fwd = await startLab({
      env: { EGRESS_CERTS: certs },
      routes: (u) => ({ bank: bankRoute(u.url) }),
      upstream: (_req, res) => {
        res.writeHead(200, { 'content-type': 'application/octet-stream' });
        let n = 0;
        const timer = setInterval(() => {
          res.write(Buffer.alloc(64 * 1024, 0x61));
          if (++n >= 20) {
            clearInterval(timer);
            res.end();
          }
        }, 5);
        res.on('close', () => clearInterval(timer));
      },
    });
    const auth = basic('a', fwd.tokens.a);
    /** Through a tunnel: reset `afterMs` after the CONNECT, after the ClientHello starts, or after `inner` is written. */
    const viaTunnel = (stage: 'connect' | 'hello' | 'inner', inner: string, afterMs: number) => new Promise<void>((resolve) => {
      const raw = connect(fwd.port, '127.0.0.1');
      raw.on('error', () => resolve());
      const resetLater = () => setTimeout(() => {
        raw.resetAndDestroy();
        resolve();
      }, afterMs);
      raw.once('connect', () => {
        raw.write(`CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: ${auth}\r\n\r\n`);
        if (stage === 'connect') return void resetLater();
        raw.once('data', () => {
          const secure = tlsConnect({ socket: raw, servername: 'api.bank.test', ca: caPem });
          secure.on('error', () => resolve());
          if (stage === 'hello') return void resetLater();
          secure.once('secureConnect', () => {
            secure.write(inner);
            resetLater();
          });
        });
      });
    });
    const plain = (bytes: string, afterMs: number) => new Promise<void>((resolve) => {
      const socket = connect(fwd.port, '127.0.0.1', () => {
        socket.write(bytes);
        setTimeout(() => {
          socket.resetAndDestroy();
          resolve();
        }, afterMs);
      });
      socket.on('error', () => resolve());
    });
    const token = `X-Egress-Token: ${fwd.tokens.a}`;
    try {
      for (const afterMs of [0, 2, 10, 40]) {
        await viaTunnel('connect', '', afterMs);
        await viaTunnel('hello', '', afterMs);
        await viaTunnel('inner', 'GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\n\r\n', afterMs);
        await viaTunnel('inner', 'POST /accounts HTTP/1.1\r\nHost: api.bank.test\r\nContent-Length: 100000\r\n\r\nabc', afterMs);
        await plain(`GET /bank/accounts HTTP/1.1\r\nHost: p\r\n${token}\r\n\r\n`, afterMs);
        await plain(`POST /bank/accounts HTTP/1.1\r\nHost: p\r\n${token}\r\nContent-Length: 100000\r\n\r\nabc`, afterMs);
        await plain(`POST /bank/accounts HTTP/1.1\r\nHost: p\r\n${token}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n`, afterMs);
        await plain(`POST /bank/accounts HTTP/1.1\r\nHost: p\r\n${token}\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n`, afterMs);
        await plain(`GET http://api.bank.test/accounts HTTP/1.1\r\nHost: api.bank.test\r\nProxy-Authorization: ${auth}\r\n\r\n`, afterMs);
        await plain('GARBAGE\r\n\r\n', afterMs);
        await new Promise((r) => setTimeout(r, 30));
        expect(fwd.serve.child.exitCode, `resets after ${afterMs} ms: process alive`).toBeNull();
      }
      await fwd.g0();
    } finally {
      await fwd.close();
    }
  }, 30_000);
});
