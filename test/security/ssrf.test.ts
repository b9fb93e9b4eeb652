import { connect as tlsConnect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawRequest, startLab, statuses, type Lab } from './lab.ts';
import { TUNNEL_LIMITS } from '../../src/server/forward.ts';
import { bankRoute, basic, connectTunnel, makeCerts, percentile } from './sec-helpers.ts';

const TUNNELS_PER_CALLER = TUNNEL_LIMITS.perCaller;

/** SSRF: the forward proxy (CONNECT and absolute-form) only ever reaches hosts a route names, on its port. */
let lab: Lab;
let authA: string;
let caPem: string;

beforeAll(async () => {
  const made = await makeCerts(['api.bank.test', 'api.other.test']);
  const certs = made.certs;
  caPem = made.caPem;
  lab = await startLab({
    // SSRF-11b opens and closes hundreds of tunnels in a row to see each give its slot back: far
    // past the rate a caller may open them at (EGRESS_CALLER_CONNECT_RATE), which is not under test here.
    env: { EGRESS_CERTS: certs, EGRESS_CALLER_CONNECT_RATE: '100000/s' },
    routes: (u) => ({
      bank: bankRoute(u.url),
      // A second listed host, so that a Host header naming another route's host means something (SSRF-12).
      other: bankRoute(u.url).replace('name: bank', 'name: other').replace('prefix: /bank', 'prefix: /other').replace(/api\.bank\.test/g, 'api.other.test'),
      // A route to a loopback upstream by name and by IP, without the opt-in for private addresses.
      priv: `name: priv
prefix: /priv
upstream: http://localhost:${u.port}
credential: plaid
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
allow:
  - caller: a
    methods: [GET]
    paths: [/x]
`,
      privip: `name: privip
prefix: /privip
upstream: http://127.0.0.1:${u.port}
credential: plaid
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
allow:
  - caller: a
    methods: [GET]
    paths: [/x]
`,
    }),
  });
  authA = basic('a', lab.tokens.a);
}, 30_000);

afterAll(async () => {
  await lab?.close();
});

async function status(target: string, auth: string | null = authA, hostHeader?: string): Promise<number> {
  const t = await connectTunnel(lab.port, target, auth, hostHeader);
  lab.seen(t.head);
  t.socket.destroy();
  return t.status;
}

/** Absolute-form proxy request (no CONNECT) with Proxy-Authorization; the Host header is the URL's unless given. */
async function absolute(url: string, host = new URL(url).host): Promise<number> {
  const raw = await rawRequest(lab.port, `GET ${url} HTTP/1.1\r\nHost: ${host}\r\nProxy-Authorization: ${authA}\r\nConnection: close\r\n\r\n`);
  lab.seen(raw);
  return statuses(raw)[0] ?? 0;
}

describe('SSRF', () => {
  it('SSRF-00 control: the listed host on 443 opens a tunnel (so the refusals below mean something)', async () => {
    expect(await status('api.bank.test:443')).toBe(200);
    await lab.g0();
  });

  it('SSRF-01 a host no route names: CONNECT and absolute-form are refused, nothing reaches U or E', async () => {
    const mark = lab.u.requests.length;
    expect(await status('evil.example:443')).toBe(403);
    expect(await status(`localhost:${lab.e.port}`)).toBe(403);
    expect(await absolute(`http://evil.example/steal`)).toBe(400);
    expect(await absolute(`http://localhost:${lab.e.port}/steal`)).toBe(400);
    expect(lab.e.requests).toHaveLength(0);
    await lab.g0(mark, 0);
  });

  it('SSRF-01b without credentials a CONNECT to an unlisted host is refused too (407 or 403, never 200)', async () => {
    for (const target of ['evil.example:443', 'api.bank.test:443']) {
      const s = await status(target, null);
      expect([403, 407]).toContain(s);
    }
    expect(await status('api.bank.test:443', basic('a', 'egt_not_a_real_token'))).toBe(407);
    await lab.g0();
  });

  it('SSRF-03 ports other than the route\'s, and metadata / IP-literal targets, get 403', async () => {
    const mark = lab.u.requests.length;
    // (The route's own port is its upstream's port, or 443.)
    for (const port of [22, 80, 6379, 8080, 8443, 9090, lab.port, lab.e.port, 1, 65535].filter((p) => p !== lab.u.port)) expect(await status(`api.bank.test:${port}`), `port ${port}`).toBe(403);
    for (const target of ['169.254.169.254:80', '169.254.169.254:443', '[::ffff:169.254.169.254]:443', '[fd00:ec2::254]:80', '127.0.0.1:6379', '10.0.0.5:443', '0.0.0.0:443', '[::]:443']) {
      expect(await status(target), target).toBe(403);
    }
    // Integer, hex and short forms of 127.0.0.1 / 169.254.169.254 are names to the proxy, and no route names them.
    for (const target of ['2852039166:443', '0xa9fea9fe:443', '0x7f.1:443', '127.1:443', '017700000001:443', 'metadata.google.internal:80']) {
      expect([400, 403], target).toContain(await status(target));
    }
    // Out-of-range or malformed ports.
    for (const target of ['api.bank.test:99999', 'api.bank.test:0443x', 'api.bank.test', 'api.bank.test:']) expect([400, 403], target).toContain(await status(target));
    await lab.g0(mark, 0);
  });

  it('SSRF-05 a route whose upstream resolves to a private address without the opt-in gets 403 and no connection', async () => {
    const mark = lab.u.requests.length;
    for (const path of ['/priv/x', '/privip/x']) {
      const res = await fetch(`${lab.url}${path}`, { headers: { 'x-egress-token': lab.tokens.a } });
      lab.seen(await res.text());
      expect(res.status, path).toBe(403);
      expect(res.headers.get('x-egress-error')).toBe('route_forbidden');
    }
    await lab.g0(mark, 0);
  });

  it('SSRF-07 self-connection: CONNECT or absolute-form to the proxy\'s own listeners is refused; no loop', async () => {
    const mark = lab.u.requests.length;
    const adminPort = Number(new URL(lab.admin).port);
    for (const target of [`127.0.0.1:${lab.port}`, `localhost:${lab.port}`, `[::1]:${lab.port}`, `127.0.0.1:${adminPort}`, `localhost:${adminPort}`, `api.bank.test:${lab.port}`]) {
      expect(await status(target), target).toBe(403);
    }
    expect(await absolute(`http://127.0.0.1:${lab.port}/plaid/accounts/get`)).toBe(400);
    expect(await absolute(`http://localhost:${adminPort}/metrics`)).toBe(400);
    await lab.g0(mark, 0);
  });

  it('SSRF-09 host normalisation: only the exact listed name (after IDNA and lower-casing) is intercepted', async () => {
    const mark = lab.u.requests.length;
    // Same host after lower-casing: allowed (exact match after normalisation).
    expect(await status('API.Bank.TEST:443')).toBe(200);
    for (const target of [
      'api.bank.test.:443', // trailing dot
      'api.bank.test..:443',
      '\u0430pi.bank.test:443', // Cyrillic a
      'xn--pi-7kc.bank.test:443', // punycode of the look-alike
      'api.bank.test.evil.example:443',
      'evilapi.bank.test:443',
      'x.api.bank.test:443',
      'bank.test:443',
      'api-bank.test:443',
      'api.bank.tes:443',
      'api.bank.test%00.evil.example:443',
      'api.bank.test@evil.example:443',
      'evil.example#api.bank.test:443',
      'api.bank.test\\.evil.example:443',
      '*.bank.test:443',
    ]) {
      expect([400, 403], JSON.stringify(target)).toContain(await status(target));
    }
    // The Host header of the CONNECT is not what decides: the request-target does.
    expect(await status('evil.example:443', authA, 'api.bank.test:443')).toBe(403);
    await lab.g0(mark, 0);
  });

  it('SSRF-09b absolute-form host variants: trailing dot, look-alike, suffix tricks get 400; nothing reaches U', async () => {
    const mark = lab.u.requests.length;
    for (const url of ['http://api.bank.test./accounts', 'http://api.bank.test.evil.example/accounts', 'http://evilapi.bank.test/accounts', 'http://xn--pi-7kc.bank.test/accounts', 'http://api.bank.test:6379/accounts', 'http://169.254.169.254/latest/meta-data/']) {
      expect(await absolute(url), url).toBe(400);
    }
    await lab.g0(mark, 0);
  });

  it('SSRF-10 CONNECT targets with a path, userinfo, a scheme, a signed or zero-led port, percent-escapes, IPv4-mapped IPv6, localhost. and *.localhost are refused; a lower-case connect is not CONNECT', async () => {
    const mark = lab.u.requests.length;
    for (const target of ['api.bank.test:443/x', 'user:pw@api.bank.test:443', 'http://api.bank.test:443', 'api.bank.test:+443', '[::ffff:127.0.0.1]:443', '[::ffff:7f00:1]:443', '[0:0:0:0:0:ffff:127.0.0.1]:443', `[::ffff:127.0.0.1]:${lab.e.port}`, 'localhost.:443', 'foo.localhost:443', `localhost:${lab.e.port}`, 'API.BANK.TEST.:443', 'api%2ebank.test:443', 'api%2Ebank%2Etest:443', 'api.bank.test:0443', 'api.bank.test:00443']) {
      expect([400, 403], target).toContain(await status(target));
    }
    const raw = await rawRequest(lab.port, `connect api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: ${authA}\r\n\r\n`);
    lab.seen(raw);
    expect(statuses(raw)).toEqual([400]);
    expect(lab.e.requests).toHaveLength(0);
    await lab.g0(mark, 0);
  });

  it('SSRF-11 tunnel exhaustion: 64 idle tunnels per caller, the next is 429 with Retry-After, b is unaffected, the handshake timeout frees them', async () => {
    const mark = lab.u.requests.length;
    const idle = [];
    for (let i = 0; i < 64; i++) {
      const t = await connectTunnel(lab.port, 'api.bank.test:443', authA);
      expect(t.status).toBe(200);
      idle.push(t.socket); // never sends a ClientHello
    }
    const refused = await connectTunnel(lab.port, 'api.bank.test:443', authA);
    refused.socket.destroy();
    expect(refused.status).toBe(429);
    // A 429 says when to come back, as every rate_limited answer does.
    expect(refused.head).toMatch(/\r\nretry-after: 1\r\n/i);
    expect(refused.head).toMatch(/\r\nx-egress-error: rate_limited\r\n/i);
    // Caller b has its own allowance, and b's reverse-mode requests stay fast.
    const tb = await connectTunnel(lab.port, 'api.bank.test:443', basic('b', lab.tokens.b));
    expect(tb.status).toBe(200);
    tb.socket.destroy();
    const latencies: number[] = [];
    for (let i = 0; i < 20; i++) {
      const t0 = performance.now();
      const res = await fetch(`${lab.url}/plaid/institutions/x`, { headers: { 'x-egress-token': lab.tokens.b } });
      await res.arrayBuffer();
      expect(res.status).toBe(200);
      latencies.push(performance.now() - t0);
    }
    expect(percentile(latencies, 99), 'b p99 ms').toBeLessThan(500);
    // The 10 s handshake timeout closes tunnels that never start TLS.
    const started = Date.now();
    const closed = await Promise.all(idle.map((s) => new Promise<number>((resolve) => (s.destroyed ? resolve(0) : s.once('close', () => resolve(Date.now() - started))))));
    expect(Math.max(...closed), 'idle tunnels closed by the handshake timeout').toBeLessThan(12_500);
    await new Promise((r) => setTimeout(r, 100));
    expect(await status('api.bank.test:443')).toBe(200);
    await lab.g0(mark, 20);
  }, 30_000);

  it('SSRF-11b a tunnel that ends at any stage (reset or FIN, before or during the handshake, mid request) gives its slot back: 70 of each in a row all open', async () => {
    const mark = lab.u.requests.length;
    const stages = ['after 200', 'during handshake', 'mid request'] as const;
    for (const stage of stages) {
      for (const how of ['reset', 'fin'] as const) {
        const got: number[] = [];
        for (let i = 0; i < TUNNELS_PER_CALLER + 6; i++) {
          const t = await connectTunnel(lab.port, 'api.bank.test:443', authA);
          got.push(t.status);
          const end = () => (how === 'reset' ? t.socket.resetAndDestroy() : t.socket.end());
          if (t.status !== 200 || stage === 'after 200') {
            end();
            continue;
          }
          await new Promise<void>((resolve) => {
            const tls = tlsConnect({ socket: t.socket, servername: 'api.bank.test', ca: caPem });
            tls.on('error', () => resolve());
            if (stage === 'during handshake') {
              setImmediate(() => {
                end();
                resolve();
              });
              return;
            }
            tls.once('secureConnect', () => {
              tls.write('POST /accounts HTTP/1.1\r\nHost: api.bank.test\r\nContent-Length: 1000\r\n\r\nabc');
              setTimeout(() => {
                end();
                resolve();
              }, 5);
            });
          });
        }
        await new Promise((r) => setTimeout(r, 50));
        expect(got.filter((s) => s !== 200), `${stage}, ${how}: every tunnel opened`).toEqual([]);
      }
    }
    expect(await status('api.bank.test:443')).toBe(200);
    await lab.g0(mark, 0);
  }, 30_000);

  it('SSRF-12 absolute-form: a Host header other than the target (even another listed host) gets 421; https://, userinfo, other ports and integer IPs get 400; nothing reaches U or E', async () => {
    // Control: the same request with the target's own Host header is served.
    expect(await absolute('http://api.other.test/accounts')).toBe(200);
    const mark = lab.u.requests.length;
    expect(await absolute('http://api.other.test/accounts', 'evil.example')).toBe(421);
    expect(await absolute('http://api.other.test/accounts', `127.0.0.1:${lab.e.port}`)).toBe(421);
    expect(await absolute('http://api.other.test/accounts', 'api.bank.test')).toBe(421);
    expect(await absolute('https://api.other.test/accounts')).toBe(400);
    expect(await absolute('http://x@api.other.test/accounts', 'api.other.test')).toBe(400);
    expect(await absolute('http://api.other.test:8080/accounts')).toBe(400);
    expect(await absolute('http://api.other.test:080/accounts', 'api.other.test:080')).toBe(400);
    expect(await absolute('http://2130706433/accounts', '2130706433')).toBe(400);
    expect(lab.e.requests).toHaveLength(0);
    await lab.g0(mark, 0);
  });
});
