import { readFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually } from '../helpers/proxy.ts';
import { startLab, statuses, type Lab } from './lab.ts';
import { RawConnection } from './raw-socket.ts';
import { bankRoute, basic, connectTunnel, exchange, makeCerts, tlsInTunnel, tlsListener } from './sec-helpers.ts';

/**
 * DOS-09f: EGRESS_MAX_CONNECTIONS on the paths DOS-09e does not take: the TLS listener (the cap
 * counts its connections with the plain listener's, once their handshake is done), and CONNECT
 * tunnels, whose connections must leave the count when they close.
 */
const CAP = 3;
let lab: Lab;
let tlsPort: number;
let tlsCa: string;
let caPem: string;

beforeAll(async () => {
  const tls = await tlsListener('egress-cap-tls-');
  tlsCa = tls.ca;
  tlsPort = tls.port;
  const made = await makeCerts(['api.bank.test']);
  caPem = made.caPem;
  lab = await startLab({
    env: {
      EGRESS_MAX_CONNECTIONS: String(CAP),
      EGRESS_CERTS: made.certs,
      ...tls.env,
    },
    routes: (u) => ({ bank: bankRoute(u.url) }),
  });
}, 60_000);
afterAll(async () => {
  await lab?.close();
});

const post = () => `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`;

/** A TLS connection to the TLS listener, after its handshake. */
function tlsOpen(): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ port: tlsPort, host: '127.0.0.1', servername: 'localhost', ca: tlsCa }, () => resolve(s));
    s.once('error', reject);
  });
}

/** Write on an open TLS connection and collect what arrives until it is quiet for `idleMs` (or closes). */
function tlsExchange(s: TLSSocket, bytes: string, idleMs = 300): Promise<{ text: string; closed: boolean }> {
  return new Promise((resolve) => {
    let text = '';
    let closed = false;
    let timer = setTimeout(done, idleMs * 4);
    function done() {
      s.off('data', onData);
      resolve({ text, closed });
    }
    const onData = (d: Buffer) => {
      text += d.toString('latin1');
      clearTimeout(timer);
      timer = setTimeout(done, idleMs);
    };
    s.on('data', onData);
    s.once('close', () => {
      closed = true;
      clearTimeout(timer);
      setTimeout(done, 10);
    });
    s.on('error', () => {});
    s.write(bytes);
  });
}

/** Until a fresh plain connection is served 200 (the count let go of the ones closed before). */
async function servedAgain(): Promise<void> {
  await eventually(async () => {
    const probe = await RawConnection.open(lab.port);
    const status = statuses(await probe.exchange(post(), 100))[0];
    probe.close();
    return status === 200;
  }, 3_000, 'a new plain connection served');
  await new Promise((r) => setTimeout(r, 200));
}

describe('DOS-09f the connection cap on the TLS listener and on tunnels', () => {
  it('the TLS listener shares the cap: past it a TLS request is answered 503 too_many_connections and nothing reaches the upstream; failed handshakes never count', async () => {
    // Handshakes that fail (plain bytes to the TLS port) take nothing from the cap.
    for (let i = 0; i < CAP * 2; i++) {
      await new Promise<void>((resolve) => {
        const s = connect(tlsPort, '127.0.0.1', () => s.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
        s.on('error', () => {});
        s.once('close', () => resolve());
        s.resume();
      });
    }
    const served: TLSSocket[] = [];
    const extra: TLSSocket[] = [];
    try {
      for (let i = 0; i < CAP; i++) served.push(await tlsOpen());
      const first = await Promise.all(served.map((s) => tlsExchange(s, post())));
      expect(first.map((a) => statuses(a.text)[0]), 'TLS connections within the cap are served').toEqual(first.map(() => 200));
      const mark = lab.u.requests.length;
      // One more TLS connection, and one more plain one: both are past the shared cap.
      extra.push(await tlsOpen());
      const overTls = await tlsExchange(extra[0]!, post());
      lab.seen(overTls.text);
      expect(statuses(overTls.text), 'a TLS connection past the cap').toEqual([503]);
      expect(overTls.text).toMatch(/x-egress-error: too_many_connections/i);
      expect(overTls.text).toMatch(/\r\nconnection: close\r\n/i);
      const plain = await RawConnection.open(lab.port);
      const overPlain = await plain.exchange(post(), 100);
      plain.close();
      expect(statuses(overPlain), 'a plain connection past the cap the TLS ones fill').toEqual([503]);
      expect(lab.u.requests.length, 'nothing from a connection past the cap reached the upstream').toBe(mark);
      for (const s of served) s.destroy();
      await servedAgain();
      // Once they have closed, TLS connections are served again: the count let go of them.
      const again: TLSSocket[] = [];
      for (let i = 0; i < CAP; i++) again.push(await tlsOpen());
      extra.push(...again);
      const later = await Promise.all(again.map((s) => tlsExchange(s, post())));
      expect(later.map((a) => statuses(a.text)[0]), 'TLS connections served after the first closed').toEqual(later.map(() => 200));
      for (const s of again) s.destroy();
      const metrics = await (await fetch(`${lab.admin}/metrics`)).text();
      expect(metrics).toMatch(/egress_connections_over_cap_total\{listener="tls",outcome="answered"\} 1\b/);
      await lab.g0();
    } finally {
      for (const s of [...served, ...extra]) s.destroy();
    }
  }, 60_000);

  it('tunnels leave the count when they close: many more tunnels than the cap, one after another, then the cap\'s worth of plain connections is served', async () => {
    await servedAgain();
    for (let i = 0; i < CAP * 3; i++) {
      const { status, socket } = await connectTunnel(lab.port, 'api.bank.test:443', basic('a', lab.tokens.a));
      expect(status, `tunnel ${i}`).toBe(200);
      const tls = await tlsInTunnel(socket, 'api.bank.test', caPem);
      const answer = await exchange(tls, 'GET /v1/accounts HTTP/1.1\r\nHost: api.bank.test\r\nConnection: close\r\n\r\n');
      expect(statuses(answer)[0], `request in tunnel ${i}`).toBeLessThan(500);
      socket.destroy();
      await new Promise<void>((r) => (socket.destroyed && socket.closed ? r() : socket.once('close', () => r())));
    }
    // A tunnel whose caller goes away before the TLS handshake, and one that sends garbage instead.
    for (const bytes of ['', 'not tls at all\r\n\r\n']) {
      const { status, socket } = await connectTunnel(lab.port, 'api.bank.test:443', basic('a', lab.tokens.a));
      expect(status).toBe(200);
      if (bytes) socket.write(bytes);
      await new Promise((r) => setTimeout(r, 100));
      socket.destroy();
    }
    await servedAgain();
    const fresh = await Promise.all(Array.from({ length: CAP }, () => RawConnection.open(lab.port)));
    try {
      const answers = await Promise.all(fresh.map((c) => c.exchange(post(), 100)));
      expect(answers.map((a) => statuses(a)[0]), 'the cap\'s worth of connections, after the tunnels closed').toEqual(answers.map(() => 200));
    } finally {
      for (const c of fresh) c.close();
    }
    await lab.g0();
  }, 60_000);

  it('a connection in its lingering close (a refusal answered while the caller still uploads) counts until the proxy closes it, about a second later', async () => {
    await servedAgain();
    const held = await Promise.all(Array.from({ length: CAP - 1 }, () => RawConnection.open(lab.port)));
    const uploader = connect({ port: lab.port, host: '127.0.0.1', allowHalfOpen: true });
    await new Promise<void>((r) => uploader.once('connect', () => r()));
    try {
      const served = await Promise.all(held.map((c) => c.exchange(post(), 100)));
      expect(served.map((a) => statuses(a)[0])).toEqual(served.map(() => 200));
      // No token, a 1 GiB body sent without pause: answered 401 at once, then the linger.
      let answer = '';
      let closedAt: number | undefined;
      uploader.on('data', (d: Buffer) => (answer += d.toString('latin1')));
      uploader.on('error', () => {});
      uploader.once('close', () => (closedAt = performance.now()));
      const block = Buffer.alloc(64 * 1024, 'a');
      uploader.write(`POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nContent-Length: ${1024 ** 3}\r\n\r\n`);
      const pump = () => {
        while (uploader.writable) if (!uploader.write(block)) return void uploader.once('drain', pump);
      };
      pump();
      await eventually(() => statuses(answer).length === 1, 3_000, 'the refusal');
      const answeredAt = performance.now();
      expect(statuses(answer)).toEqual([401]);
      expect(closedAt, 'still lingering').toBeUndefined();
      const probe = await RawConnection.open(lab.port);
      const over = await probe.exchange(post(), 100);
      probe.close();
      expect(closedAt, 'the probe was answered during the linger').toBeUndefined();
      expect(statuses(over), 'the lingering connection still counts').toEqual([503]);
      await eventually(() => closedAt !== undefined, 3_000, 'the linger ended by the proxy');
      expect(closedAt! - answeredAt).toBeLessThan(2_500);
    } finally {
      uploader.destroy();
      for (const c of held) c.close();
    }
    await servedAgain();
    await lab.g0();
  }, 30_000);
});
