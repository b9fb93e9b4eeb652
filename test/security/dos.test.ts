import { connect, type Socket } from 'node:net';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LISTENER_LIMITS } from '../../src/server/reverse.ts';
import { rawRequest, startLab, statuses, type Lab } from './lab.ts';
import { percentile, rssKb } from './sec-helpers.ts';

/** DOS: slow clients, big bodies, bucket evasion, connection floods and back-pressure. */
let lab: Lab;
let big: Server;
let bigPort: number;
let bigBytesSent = 0;

beforeAll(async () => {
  // An upstream that streams up to 256 MiB, honouring back-pressure, so only the proxy can buffer it.
  big = createServer((_req, res) => {
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
    res.on('close', () => undefined);
    pump();
  });
  await new Promise<void>((r) => big.listen(0, '127.0.0.1', r));
  bigPort = (big.address() as AddressInfo).port;
  lab = await startLab({
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
    }),
  });
}, 30_000);

afterAll(async () => {
  await lab?.close();
  big?.closeAllConnections();
  await new Promise((r) => big?.close(r));
});

async function timedB(): Promise<number> {
  const t0 = performance.now();
  const res = await fetch(`${lab.url}/plaid/institutions/x`, { headers: { 'x-egress-token': lab.tokens.b } });
  await res.arrayBuffer();
  expect(res.status).toBe(200);
  return performance.now() - t0;
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
});
