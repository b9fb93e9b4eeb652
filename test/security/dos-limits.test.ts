import type { IncomingMessage, ServerResponse } from 'node:http';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawRequest, startLab, statuses, type Lab } from './lab.ts';
import { eventually } from '../helpers/proxy.ts';
import { closedAtAccept, RawConnection, servedBatch } from './raw-socket.ts';
import { bankRoute, basic, connectTunnel, dribbledHeaderLifetime, makeCerts, tlsInTunnel } from './sec-helpers.ts';

/**
 * DOS-01 behaviour: the README promises "the listener cuts off slow headers after 10 s". A
 * connection dribbling header bytes (one every second, never finishing) must be closed within
 * about 10 s (14 s allowed, with the lingering close), not whenever Node's 30 s connectionsCheckingInterval next runs, and
 * not left half-open after the 408. Also DOS-03b (regression): a chunked body over max_body used to
 * crash the process when the audit step read the already-closed socket.
 */
let lab: Lab;
beforeAll(async () => {
  // /buffered: a route whose POST bodies are read whole before they go (json_body merges the
  // credential into them), under the same 64kb max_body as /plaid.
  lab = await startLab({
    routes: (u) => ({
      buffered: `name: buffered
prefix: /buffered
upstream: ${u.url}
allow_private_addresses: true
credential: plaid
inject:
  scheme: json_body
  fields:
    secret: "{secret}"
max_body: 64kb
allow:
  - caller: a
    methods: [POST]
    paths: [/accounts/get]
`,
    }),
  });
}, 30_000);
afterAll(async () => {
  await lab?.close();
});

/** An upstream that takes `ms` to answer /accounts/get and answers everything else at once. */
const slowAccounts = (ms: number) => (req: IncomingMessage, res: ServerResponse) => setTimeout(() => res.end('{}'), req.url!.includes('accounts') ? ms : 0);

const postAsA = (on: Lab) => fetch(`${on.url}/plaid/accounts/get`, { method: 'POST', headers: { 'x-egress-token': on.tokens.a, 'content-type': 'application/json' }, body: '{}' });

/** Caller b's request, and how long it took. */
async function timedCallAsB(on: Lab): Promise<{ status: number; ms: number }> {
  const t0 = performance.now();
  const res = await fetch(`${on.url}/plaid/institutions/x`, { headers: { 'x-egress-token': on.tokens.b } });
  await res.arrayBuffer();
  return { status: res.status, ms: performance.now() - t0 };
}

describe('DOS-03b / DOS-01 behaviour', () => {
  it('DOS-03b an oversized chunked body gets 413 and the proxy stays up', async () => {
    const mark = lab.u.requests.length;
    const chunks = Array.from({ length: 50 }, () => `1000\r\n${'y'.repeat(4096)}\r\n`).join('');
    const raw = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n${chunks}0\r\n\r\n`, 1_000);
    lab.seen(raw);
    expect(statuses(raw)).toEqual([413]);
    await new Promise((r) => setTimeout(r, 300));
    expect(lab.serve.child.exitCode, 'proxy process still running').toBeNull();
    await lab.g0(mark, 0);
  });

  it('DOS-03c a declared body over max_body with Expect: 100-continue gets 413 without a 100 Continue first, whether the route streams bodies or reads them whole', async () => {
    const mark = lab.u.requests.length;
    for (const prefix of ['/plaid', '/buffered']) {
      const raw = await rawRequest(lab.port, `POST ${prefix}/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nExpect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: ${64 * 1024 + 1}\r\n\r\n`, 1_000);
      lab.seen(raw);
      // A 100 would invite the caller to send the whole body the proxy is about to refuse.
      expect(statuses(raw), prefix).toEqual([413]);
    }
    // Within the limit, the body-reading route invites the body and sends it.
    const conn = await RawConnection.open(lab.port);
    const interim = await conn.exchange(`POST /buffered/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nExpect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n`);
    expect(statuses(interim)).toEqual([100]);
    const final = await conn.exchange('{}');
    conn.close();
    lab.seen(final);
    expect(statuses(final)).toEqual([200]);
    await lab.g0(mark, 1);
  });

  it('DOS-01c a dribbled header is cut within 14 s', async () => {
    // Wait a little so the connection does not start right at a checking-interval boundary.
    // Its own proxy: DOS-03b above kills the shared one.
    const lab = await startLab();
    await new Promise((r) => setTimeout(r, 3_000));
    const { ms: closedAfter } = await dribbledHeaderLifetime(lab.port, 'GET /plaid/institutions/x HTTP/1.1\r\nHost: p\r\n');
    // 10 s header timeout + 0.5 s check interval + 1 s lingering close + slack on a loaded 2-core machine.
    expect(closedAfter, 'ms until the proxy closed the slow connection').toBeLessThan(14_000);
    try {
      await lab.g0();
    } finally {
      await lab.close();
    }
  }, 60_000);

  it('DOS-01d the same inside a forward-mode tunnel: a dribbled header is cut within 14 s, with 408, and the tunnel with it', async () => {
    const { certs, caPem } = await makeCerts(['api.bank.test']);
    const lab = await startLab({ env: { EGRESS_CERTS: certs }, routes: (u) => ({ bank: bankRoute(u.url) }) });
    try {
      const t = await connectTunnel(lab.port, 'api.bank.test:443', basic('a', lab.tokens.a));
      const tls = await tlsInTunnel(t.socket, 'api.bank.test', caPem);
      tls.on('error', () => {});
      let answer = '';
      tls.on('data', (d: Buffer) => (answer += d.toString('latin1')));
      const started = Date.now();
      tls.write('GET /accounts HTTP/1.1\r\nHost: api.bank.test\r\n');
      const timer = setInterval(() => tls.writable && tls.write('X-a: b\r\n'), 1_000);
      const closedAfter = await new Promise<number>((resolve) => {
        tls.once('close', () => resolve(Date.now() - started));
        setTimeout(() => resolve(Number.POSITIVE_INFINITY), 20_000);
      });
      clearInterval(timer);
      tls.destroy();
      expect(closedAfter, 'ms until the proxy closed the slow request in the tunnel').toBeLessThan(14_000);
      expect(answer.split('\r\n')[0]).toBe('HTTP/1.1 408 Request Timeout');
      expect(lab.u.requests).toHaveLength(0);
    } finally {
      await lab.close();
    }
  }, 30_000);

  it('DOS-12 one caller\'s slow requests cannot take an upstream\'s whole pool: past EGRESS_CALLER_MAX_IN_FLIGHT they get 429, and another caller of the same upstream is answered at once', async () => {
    const lab = await startLab({ env: { EGRESS_CALLER_MAX_IN_FLIGHT: '4' }, upstream: slowAccounts(1_500) });
    try {
      const slow = Array.from({ length: 10 }, () => postAsA(lab).then(async (r) => ({ status: r.status, retry: r.headers.get('retry-after'), body: await r.text() })));
      await new Promise((r) => setTimeout(r, 400));
      const b = await timedCallAsB(lab);
      const answers = await Promise.all(slow);
      expect(b.status).toBe(200);
      expect(b.ms, 'ms b waited').toBeLessThan(1_000);
      expect(answers.filter((a) => a.status === 200)).toHaveLength(4);
      const refused = answers.filter((a) => a.status === 429);
      expect(refused).toHaveLength(6);
      for (const r of refused) {
        expect(r.retry).toBe('1');
        expect(r.body).toContain('Too many requests of this caller are in flight.');
      }
      expect(lab.u.requests.filter((r) => r.url === '/accounts/get')).toHaveLength(4);
      // The slots come back as requests end: a's next request is answered.
      expect((await postAsA(lab)).status).toBe(200);
    } finally {
      await lab.close();
    }
  }, 30_000);

  it('DOS-12b with the default limit, 300 slow requests of one caller leave the pool to the others', async () => {
    const lab = await startLab({ upstream: slowAccounts(2_500) });
    try {
      const slow = Array.from({ length: 300 }, () => postAsA(lab).then((r) => r.status, () => 0));
      await new Promise((r) => setTimeout(r, 500));
      const b = await timedCallAsB(lab);
      const statuses = await Promise.all(slow);
      expect(b.status).toBe(200);
      expect(b.ms, 'ms b waited behind a').toBeLessThan(1_000);
      expect(statuses.filter((s) => s === 200)).toHaveLength(128);
      expect(statuses.filter((s) => s === 429)).toHaveLength(172);
    } finally {
      await lab.close();
    }
  }, 60_000);
});

describe('DOS-09e the proxy listeners\' connection cap (EGRESS_MAX_CONNECTIONS)', () => {
  it('past the cap each request (and a CONNECT) is answered 503 and its connection closed, past twice the cap new ones are closed unanswered; the served ones keep working, and once they close new ones are served', async () => {
    const CAP = 8;
    const { certs } = await makeCerts(['api.bank.test']);
    const lab = await startLab({ env: { EGRESS_MAX_CONNECTIONS: String(CAP), EGRESS_CERTS: certs }, routes: (u) => ({ bank: bankRoute(u.url) }) });
    const opened: RawConnection[] = [];
    try {
      const post = `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`;
      const connections = async (n: number) => {
        const list = await Promise.all(Array.from({ length: n }, () => RawConnection.open(lab.port)));
        opened.push(...list);
        return list;
      };
      const served = await connections(CAP);
      const first = await Promise.all(served.map((c) => c.request(post)));
      expect(first.map((a) => statuses(a)[0]), 'connections within the cap are served').toEqual(first.map(() => 200));
      const mark = lab.u.requests.length;
      const refused = await connections(CAP);
      // Past twice the cap a connection is closed as it is accepted.
      const dropped = await closedAtAccept(lab.port, 3);
      expect(dropped, 'connections past twice the cap: closed at once, unanswered').toEqual(dropped.map(() => ({ bytes: 0, closed: true })));
      const connect_ = `CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: ${basic('a', lab.tokens.a)}\r\n\r\n`;
      const answers = await Promise.all(refused.map((c, i) => c.request(i === 0 ? connect_ : post)));
      for (const answer of answers) {
        lab.seen(answer);
        expect(statuses(answer), 'a connection past the cap').toEqual([503]);
        expect(answer).toMatch(/\r\nretry-after: 1\r\n/i);
        expect(answer).toMatch(/\r\nconnection: close\r\n/i);
        expect(answer).toMatch(/x-egress-error: too_many_connections/i);
      }
      expect(refused.every((c) => c.closed), 'refused connections are closed after their answer').toBe(true);
      expect(lab.u.requests.length, 'nothing from a refused connection reached the upstream').toBe(mark);
      // The served connections still work.
      const again = await Promise.all(served.map((c) => c.request(post)));
      expect(again.map((a) => statuses(a)[0]), 'served connections still served').toEqual(again.map(() => 200));
      for (const c of served) c.close();
      // Once they have closed, CAP new connections are served again.
      const fresh = await servedBatch(lab.port, CAP, post);
      opened.push(...fresh.connections);
      for (const c of fresh.connections) c.close();
      const refusals = CAP + fresh.refused;

      const metrics = await (await fetch(`${lab.admin}/metrics`)).text();
      expect(metrics).toMatch(new RegExp(`egress_connections_over_cap_total\\{listener="plain",outcome="answered"\\} ${refusals}\\b`));
      expect(Number(/egress_connections_over_cap_total\{listener="plain",outcome="closed"\} (\d+)/.exec(metrics)?.[1])).toBeGreaterThanOrEqual(3);
      await eventually(async () => ((await readFile(join(lab.dir, 'audit.log'), 'utf8')).match(/"reason":"too_many_connections"/g) ?? []).length === refusals, 3_000, 'each refusal audited');
      await lab.g0();
    } finally {
      for (const c of opened) c.close();
      await lab.close();
    }
  }, 60_000);
});
