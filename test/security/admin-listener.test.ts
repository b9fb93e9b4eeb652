import { connect } from 'node:net';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually } from '../helpers/proxy.ts';
import { startLab, type Lab } from './lab.ts';
import { statuses } from '../helpers/raw.ts';
import { closedAtAccept, RawConnection, rawExchange, servedBatch } from './raw-socket.ts';
import { dribbledHeaderLifetime } from './sec-helpers.ts';

/**
 * The admin listener (health, metrics, the admin API and the status page) under the same attacks
 * as the proxy listener: it is reachable by anything that reaches its port, before any token.
 */
let lab: Lab;
beforeAll(async () => {
  lab = await startLab();
}, 30_000);
afterAll(async () => {
  await lab?.close();
});

describe('DOS: the admin listener', () => {
  it('DOS-01e a dribbled header on the admin listener is cut within 14 s with a 408, as on the proxy listener', async () => {
    // Not right at a checking-interval boundary.
    await new Promise((r) => setTimeout(r, 3_000));
    const { ms, answer } = await dribbledHeaderLifetime(Number(new URL(lab.admin).port), 'GET /healthz HTTP/1.1\r\nHost: admin\r\n');
    // 10 s header timeout + 0.5 s check interval + 1 s lingering close + slack on a loaded 2-core machine.
    expect(ms, 'ms until the admin listener closed the slow connection').toBeLessThan(14_000);
    expect(answer.split('\r\n')[0]).toBe('HTTP/1.1 408 Request Timeout');
    await lab.g0();
  }, 60_000);

  it('SMUG-13c a CONNECT pipelined behind admin requests: their answers come first, then a 400, then the close', async () => {
    const { data, closed } = await rawExchange(Number(new URL(lab.admin).port), 'GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\nGET /readyz HTTP/1.1\r\nHost: admin\r\n\r\nCONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\n\r\n', 1_000);
    expect(statuses(data)).toEqual([200, 200, 400]);
    expect(data).toMatch(/x-egress-error: bad_request/i);
    expect(closed).toBe(true);
    await lab.g0();
  });
});

const auditLines = async (on: Lab) => (await readFile(join(on.dir, 'audit.log'), 'utf8').catch(() => '')).split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);

describe('AUTH: the status page', () => {
  it('AUTH-14 a refused request for the status page is audited, as a refused admin API request is', async () => {
    const created = await runCli(['admin-token', 'create', 'ops', '--json'], envFor(lab.dir));
    expect(created.code).toBe(0);
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    await eventually(async () => (await fetch(`${lab.admin}/`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'the admin token known');
    const before = (await auditLines(lab)).length;
    // Guessing the password of the page's Basic prompt, as a browser would send it.
    const guess = `ega_${'g'.repeat(43)}`;
    const res = await fetch(`${lab.admin}/`, { headers: { authorization: `Basic ${Buffer.from(`ops:${guess}`).toString('base64')}` } });
    lab.seen(await res.text());
    expect(res.status).toBe(401);
    await eventually(async () => (await auditLines(lab)).slice(before).some((l) => l.kind === 'admin' && l.decision === 'deny'), 2_000, 'an audit line for the refused request');
    const line = (await auditLines(lab)).slice(before).find((l) => l.kind === 'admin' && l.decision === 'deny')!;
    expect(line).toMatchObject({ actor: 'admin:unknown', action: 'GET /', reason: 'admin_unauthenticated' });
    expect(JSON.stringify(line)).not.toContain(guess);
    await lab.g0();
  });
});

describe('AUTH: guessing admin tokens', () => {
  it('AUTH-15 unknown admin tokens from one address raise the unknown_token alert, as unknown caller tokens do', async () => {
    const guesses = Array.from({ length: 10 }, (_, i) => `ega_${'u'.repeat(42)}${i}`);
    for (const [i, guess] of guesses.entries()) {
      // The API and the status page's Basic prompt both count.
      const res = i % 2
        ? await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${guess}` } })
        : await fetch(`${lab.admin}/`, { headers: { authorization: `Basic ${Buffer.from(`ops:${guess}`).toString('base64')}` } });
      lab.seen(await res.text());
      expect(res.status).toBe(401);
    }
    await eventually(() => lab.serve.output().includes('"alert":"unknown_token"'), 3_000, 'the unknown_token alert');
    const alert = lab.serve.output().split('\n').find((l) => l.includes('"alert":"unknown_token"'))!;
    expect(JSON.parse(alert)).toMatchObject({ severity: 'warning', subject: '127.0.0.1', listener: 'admin' });
    for (const guess of guesses) expect(lab.serve.output()).not.toContain(guess.slice(4));
    expect(await fetch(`${lab.admin}/metrics`).then((r) => r.text())).toMatch(/egress_alerts_total\{alert="unknown_token",severity="warning"\} 1/);
    await lab.g0();
  });
});

describe('DOS: idle connections on the admin listener', () => {
  it('DOS-09b connections that never send a byte are closed within 14 s, not kept for ever', async () => {
    const port = Number(new URL(lab.admin).port);
    const started = Date.now();
    const lifetimes = await Promise.all(Array.from({ length: 50 }, () => new Promise<number>((resolve) => {
      const socket = connect(port, '127.0.0.1');
      socket.on('error', () => {});
      socket.on('close', () => resolve(Date.now() - started));
      setTimeout(() => (socket.destroy(), resolve(Number.POSITIVE_INFINITY)), 30_000);
    })));
    // 10 s without a byte, and slack on a loaded 2-core machine.
    expect(Math.max(...lifetimes), 'ms until the last idle connection was closed').toBeLessThan(14_000);
    await lab.g0();
  }, 60_000);
});

describe('DOS: too many connections to the admin listener', () => {
  it('DOS-09d past 64 connections each request is answered 503 and its connection closed, past 128 new ones are closed unanswered; the 64 keep working, and once they close new ones are served', async () => {
    // Its own process: nothing else (no fetch keep-alive pool) holds connections to its admin port.
    const own = await startLab();
    const opened: RawConnection[] = [];
    try {
      const port = Number(new URL(own.admin).port);
      const get = (path: string) => `GET ${path} HTTP/1.1\r\nHost: admin\r\n\r\n`;
      const connections = async (n: number) => {
        const list = await Promise.all(Array.from({ length: n }, () => RawConnection.open(port)));
        opened.push(...list);
        return list;
      };
      // 64 monitoring clients, each on a keep-alive connection.
      const served = await connections(64);
      const first = await Promise.all(served.map((c) => c.request(get('/healthz'))));
      expect(first.map((a) => statuses(a)[0]), 'the first 64 connections are served').toEqual(first.map(() => 200));
      // 64 more are taken, to be told why they are refused.
      const refused = await connections(64);
      // Past those, a connection is closed as it is accepted: no descriptor is held for it.
      const dropped = await closedAtAccept(port, 5);
      expect(dropped, 'connections past 128: closed at once, unanswered').toEqual(dropped.map(() => ({ bytes: 0, closed: true })));
      const answers = await Promise.all(refused.map((c) => c.request(get('/metrics'))));
      for (const answer of answers) {
        own.seen(answer);
        expect(statuses(answer), 'a connection past 64').toEqual([503]);
        expect(answer).toMatch(/\r\nretry-after: 1\r\n/i);
        expect(answer).toMatch(/\r\nConnection: close\r\n/i);
        expect(answer).toContain('"code":"too_many_connections"');
      }
      expect(refused.every((c) => c.closed), 'refused connections are closed after their answer').toBe(true);
      // The 64 served connections still work: /metrics for monitoring.
      const again = await Promise.all(served.map((c) => c.request(get('/metrics'))));
      expect(again.map((a) => statuses(a)[0]), 'the first 64 connections still served').toEqual(again.map(() => 200));
      for (const c of served) c.close();
      // Once they have closed, new connections are served again, all 64 of them.
      const fresh = await servedBatch(port, 64, get('/healthz'));
      opened.push(...fresh.connections);
      for (const c of fresh.connections) c.close();
      // Once the server has seen them close (a moment after the client has), monitoring is served again.
      await eventually(async () => (await fetch(`${own.admin}/metrics`)).status === 200, 3_000, '/metrics served once the connections closed');
      await own.g0();
    } finally {
      for (const c of opened) c.close();
      await own.close();
    }
  }, 60_000);
});

describe('DOS: pipelined requests on the admin listener', () => {
  it('DOS-15 clients that pipeline GET /metrics and never read the answers are cut, and /healthz stays quick', async () => {
    // Its own process: the attack costs memory the other tests should not inherit.
    const own = await startLab();
    try {
      const port = Number(new URL(own.admin).port);
      const request = 'GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n';
      const sockets = Array.from({ length: 20 }, () => {
        const socket = connect(port, '127.0.0.1');
        socket.on('error', () => {});
        socket.pause();
        // What Node reads in one go: some 1,800 requests, each a registry walk and 10 kB of answer.
        socket.write(request.repeat(Math.floor(65_536 / request.length)));
        return socket;
      });
      await new Promise((r) => setTimeout(r, 3_000));
      const t0 = performance.now();
      const health = await fetch(`${own.admin}/healthz`, { signal: AbortSignal.timeout(10_000) }).then((r) => r.status, () => 0);
      const ms = performance.now() - t0;
      for (const socket of sockets) socket.destroy();
      expect(health).toBe(200);
      // Before: every pipelined request was rendered and held; /healthz waited 80 s behind them.
      // Now milliseconds; 5 s leaves room for a 2-core machine busy with other work.
      expect(ms, 'ms for /healthz during the attack').toBeLessThan(5_000);
      await own.g0();
    } finally {
      await own.close();
    }
  }, 60_000);
});

describe('RESP: what the admin listener answers with', () => {
  it('RESP-09 every admin answer says nosniff, and the status page may not be framed by anyone (CSP frame-ancestors)', async () => {
    const created = await runCli(['admin-token', 'create', 'headers', '--json'], envFor(lab.dir));
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    const bearer = { authorization: `Bearer ${admin}` };
    await eventually(async () => (await fetch(`${lab.admin}/v1/callers`, { headers: bearer }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'the admin token known');
    const answers = await Promise.all([
      fetch(`${lab.admin}/healthz`), fetch(`${lab.admin}/readyz`), fetch(`${lab.admin}/metrics`), fetch(`${lab.admin}/nothing`),
      fetch(`${lab.admin}/v1/callers`), fetch(`${lab.admin}/v1/callers`, { headers: bearer }), fetch(`${lab.admin}/`), fetch(`${lab.admin}/`, { headers: bearer }),
    ]);
    for (const res of answers) {
      lab.seen(await res.text());
      expect(res.headers.get('x-content-type-options'), res.url).toBe('nosniff');
      expect(res.headers.get('access-control-allow-origin'), res.url).toBeNull();
    }
    const page = answers.at(-1)!;
    expect(page.status).toBe(200);
    expect(page.headers.get('x-frame-options')).toBe('DENY');
    expect(page.headers.get('content-security-policy')).toMatch(/frame-ancestors 'none'/);
    expect(page.headers.get('cache-control')).toBe('no-store');
    await lab.g0();
  });
});

describe('AUTH: what an admin token was used for', () => {
  it('AUTH-16 reads with an admin token (API lists and shows, the status page) leave an audit line naming the token', async () => {
    const created = await runCli(['admin-token', 'create', 'reader', '--json'], envFor(lab.dir));
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    const bearer = { authorization: `Bearer ${admin}` };
    await eventually(async () => (await fetch(`${lab.admin}/healthz`).then((r) => r.status)) === 200 && (await fetch(`${lab.admin}/v1/callers`, { headers: bearer }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'the admin token known');
    const before = (await auditLines(lab)).length;
    for (const path of ['/v1/credentials', '/v1/credentials/plaid', '/v1/callers', '/']) {
      const res = await fetch(`${lab.admin}${path}`, { headers: bearer });
      lab.seen(await res.text());
      expect(res.status, path).toBe(200);
    }
    await eventually(async () => (await auditLines(lab)).slice(before).some((l) => l.actor === 'admin:reader' && l.action === 'GET /'), 2_000, 'the audit lines');
    // The last four: the wait for the token above may have left a line of its own just after `before`.
    const lines = (await auditLines(lab)).slice(before).filter((l) => l.actor === 'admin:reader').slice(-4);
    expect(lines.map((l) => [l.action, l.target, l.decision, l.reason])).toEqual([
      ['GET /v1/credentials', 'credentials', 'allow', 'read'],
      ['GET /v1/credentials/:id', 'credentials:plaid', 'allow', 'read'],
      ['GET /v1/callers', 'callers', 'allow', 'read'],
      ['GET /', 'status-page', 'allow', 'read'],
    ]);
    expect(JSON.stringify(lines)).not.toContain(admin.slice(4));
    await lab.g0();
  });
});

describe('AUTH: a revoked admin token presented again', () => {
  it('AUTH-17 raises retired_credential_used naming the admin token, as a revoked caller token does', async () => {
    const env = envFor(lab.dir);
    const admin = (JSON.parse((await runCli(['admin-token', 'create', 'gone', '--json'], env)).stdout) as { token: string }).token;
    const list = () => fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => (lab.seen(await r.text()), r.status));
    await eventually(async () => (await list()) === 200, 3_000, 'the admin token known');
    expect((await runCli(['admin-token', 'revoke', 'gone'], env)).code).toBe(0);
    await eventually(async () => (await list()) === 401, 3_000, 'the admin token revoked');
    await eventually(() => lab.serve.output().includes('"alert":"retired_credential_used"'), 3_000, 'the retired_credential_used alert');
    const alert = JSON.parse(lab.serve.output().split('\n').find((l) => l.includes('"alert":"retired_credential_used"'))!) as Record<string, unknown>;
    expect(alert).toMatchObject({ severity: 'warning', subject: 'admin:gone', admin_token: 'gone', remote: '127.0.0.1' });
    expect(lab.serve.output()).not.toContain(admin.slice(4));
    await lab.g0();
  });
});

describe('AUTH: two Authorization headers', () => {
  it('AUTH-18 two Authorization headers are refused (401) on the admin API and the status page, whichever comes first, as two caller tokens are on the proxy listener', async () => {
    const created = await runCli(['admin-token', 'create', 'twice', '--json'], envFor(lab.dir));
    expect(created.code).toBe(0);
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    await eventually(async () => (await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'the admin token known');
    const port = Number(new URL(lab.admin).port);
    const status = (path: string, lines: string[]) => new Promise<number>((resolve, reject) => {
      const socket = connect(port, '127.0.0.1', () => socket.write(`GET ${path} HTTP/1.1\r\nHost: admin\r\n${lines.map((l) => `${l}\r\n`).join('')}Connection: close\r\n\r\n`));
      let answer = '';
      socket.on('data', (d: Buffer) => (answer += d.toString('latin1')));
      socket.on('end', () => resolve(Number(answer.slice(9, 12))));
      socket.on('error', reject);
    });
    const good = `Authorization: Bearer ${admin}`;
    const other = 'Authorization: Bearer ega_not_a_real_token_0000000000000000000000';
    for (const path of ['/v1/callers', '/']) {
      expect(await status(path, [good]), `${path}: one header`).toBe(200);
      expect(await status(path, [good, other]), `${path}: valid, then another`).toBe(401);
      expect(await status(path, [other, good]), `${path}: another, then valid`).toBe(401);
      expect(await status(path, [good, good]), `${path}: the same twice`).toBe(401);
    }
    await lab.g0();
  });
});

describe('HDR: Expect: 100-continue on the admin API', () => {
  it('HDR-18b no 100 Continue before the admin token, the route, the method and the declared body are checked; an authorised request gets it, then its answer', async () => {
    // Node answers 100 Continue by itself as soon as the head arrives: a client with a wrong or no
    // admin token was invited to send its body (a credential's secret values) before the 401.
    const created = await runCli(['admin-token', 'create', 'continue', '--json'], envFor(lab.dir));
    expect(created.code).toBe(0);
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    await eventually(async () => (await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'the admin token known');
    const port = Number(new URL(lab.admin).port);
    const body = JSON.stringify({ name: 'continued' });
    const head = (method: string, path: string, token: string | undefined, extra: { length?: number; type?: string } = {}) =>
      `${method} ${path} HTTP/1.1\r\nHost: admin\r\n${token ? `Authorization: Bearer ${token}\r\n` : ''}Expect: 100-continue\r\nContent-Type: ${extra.type ?? 'application/json'}\r\nContent-Length: ${extra.length ?? body.length}\r\n\r\n`;
    const refused = [
      ['wrong token', head('POST', '/v1/callers', `ega_${'w'.repeat(43)}`), 401],
      ['no token', head('POST', '/v1/callers', undefined), 401],
      ['unknown route', head('POST', '/v1/nothing', admin), 404],
      ['unknown verb', head('POST', '/v1/credentials/plaid/destroy', admin), 404],
      ['wrong method', head('PUT', '/v1/callers', admin), 405],
      ['declared body over 128 KiB', head('POST', '/v1/callers', admin, { length: 200_000 }), 413],
      ['not JSON', head('POST', '/v1/callers', admin, { type: 'text/plain' }), 415],
    ] as const;
    for (const [label, request, status] of refused) {
      const conn = await RawConnection.open(port);
      const answer = await conn.exchange(request);
      const closed = conn.closed;
      conn.close();
      lab.seen(answer);
      expect(statuses(answer), label).toEqual([status]);
      // The body was never invited: whatever the client sends next is not read as a request.
      expect(closed, `${label}: connection closed`).toBe(true);
    }
    const conn = await RawConnection.open(port);
    const interim = await conn.exchange(head('POST', '/v1/callers', admin));
    expect(statuses(interim), 'authorised: 100 Continue, then the body is read').toEqual([100]);
    const final = await conn.exchange(body);
    conn.close();
    lab.seen(final);
    expect(statuses(final)).toEqual([201]);
    expect(final).toContain('"caller":"continued"');
    await lab.g0();
  });
});

describe('SMUG: requests pipelined behind an answer that closes the admin connection', () => {
  it('SMUG-09c are not processed (RFC 9112 §9.6): behind Connection: close, or a refused Expect: 100-continue whose body came anyway', async () => {
    const created = await runCli(['admin-token', 'create', 'pipeliner', '--json'], envFor(lab.dir));
    expect(created.code).toBe(0);
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    await eventually(async () => (await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'the admin token known');
    const port = Number(new URL(lab.admin).port);
    const add = (name: string) => {
      const body = JSON.stringify({ name });
      return `POST /v1/callers HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ${admin}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
    };
    const refusedBody = JSON.stringify({ name: 'never-invited' });
    for (const [label, first, status, name] of [
      ['Connection: close', 'GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n', 200, 'behind-close'],
      ['refused 100-continue', `POST /v1/callers HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ega_${'w'.repeat(43)}\r\nExpect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: ${refusedBody.length}\r\n\r\n${refusedBody}`, 401, 'behind-refused'],
    ] as const) {
      const { data, closed } = await rawExchange(port, `${first}${add(name)}`, 1_000);
      lab.seen(data);
      expect(statuses(data), label).toEqual([status]);
      expect(closed, `${label}: connection closed`).toBe(true);
      // The pipelined request would have been answered on a closed connection: never sent, but done.
      await new Promise((r) => setTimeout(r, 300));
      const callers = (await (await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } })).json()) as { callers: { name: string }[] };
      expect(callers.callers.map((c) => c.name), label).not.toContain(name);
    }
    await lab.g0();
  });
});

describe('HDR: an Expect other than 100-continue on the admin listener', () => {
  it('HDR-19b is the admin listener\'s own 417 (JSON body, audited on the API), not Node\'s bare 417; its body and what is pipelined behind it are not processed', async () => {
    const created = await runCli(['admin-token', 'create', 'expecting', '--json'], envFor(lab.dir));
    expect(created.code).toBe(0);
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    await eventually(async () => (await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'the admin token known');
    const port = Number(new URL(lab.admin).port);
    const before = (await auditLines(lab)).length;
    const body = JSON.stringify({ name: 'expected-once' });
    // Behind the refused request, one that would add a caller, on the same connection.
    const next = `POST /v1/callers HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ${admin}\r\nContent-Type: application/json\r\nContent-Length: ${JSON.stringify({ name: 'expected-twice' }).length}\r\n\r\n${JSON.stringify({ name: 'expected-twice' })}`;
    for (const [label, value, request] of [
      ['API', 'something-else', `POST /v1/callers HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ${admin}\r\nExpect: something-else\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}${next}`],
      ['API', '100-continue, foo', `POST /v1/callers HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ${admin}\r\nExpect: 100-continue, foo\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}${next}`],
      ['health', 'something-else', `GET /healthz HTTP/1.1\r\nHost: admin\r\nExpect: something-else\r\n\r\n${next}`],
    ] as const) {
      const { data, closed } = await rawExchange(port, request, 1_000);
      lab.seen(data);
      expect(statuses(data), `${label} ${value}`).toEqual([417]);
      expect(data, `${label} ${value}`).toMatch(/\r\ncontent-type: application\/json\r\n/i);
      expect(JSON.parse(data.slice(data.indexOf('\r\n\r\n') + 4)).error, `${label} ${value}`).toMatchObject({ code: 'expectation_failed' });
      expect(data, `${label} ${value}`).toMatch(/\r\nconnection: close\r\n/i);
      expect(closed, `${label} ${value}: connection closed`).toBe(true);
    }
    await eventually(async () => (await auditLines(lab)).slice(before).filter((l) => l.kind === 'admin' && l.reason === 'expectation_failed').length === 2, 3_000, 'the two API refusals audited');
    const refusals = (await auditLines(lab)).slice(before).filter((l) => l.kind === 'admin' && l.reason === 'expectation_failed');
    expect(refusals.every((l) => l.decision === 'deny' && l.action === 'POST /v1/callers')).toBe(true);
    const callers = (await (await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } })).json()) as { callers: { name: string }[] };
    expect(callers.callers.map((c) => c.name)).not.toContain('expected-once');
    expect(callers.callers.map((c) => c.name)).not.toContain('expected-twice');
    await lab.g0();
  });
});

/**
 * Send `head`, then `chunk` over and over (up to `limit` bytes) while the server takes them; the
 * answer, and whether the server closed the connection before the client gave up `graceMs` later.
 */
function streamBody(port: number, head: string, chunk: Buffer, limit: number, graceMs = 1_500): Promise<{ answer: string; sent: number; closedByServer: boolean }> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let answer = '';
    let sent = 0;
    let finished = false;
    const finish = (closedByServer: boolean) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      socket.destroy();
      resolve({ answer, sent, closedByServer });
    };
    let timer: NodeJS.Timeout | undefined;
    socket.on('data', (d: Buffer) => (answer += d.toString('latin1')));
    socket.on('error', () => finish(true));
    socket.on('end', () => finish(true));
    socket.on('close', () => finish(true));
    socket.write(head);
    const pump = () => {
      while (!finished && sent < limit) {
        sent += chunk.length;
        if (!socket.write(chunk)) return void socket.once('drain', pump);
      }
      if (!finished) timer = setTimeout(() => finish(false), graceMs);
    };
    pump();
  });
}

describe('DOS: a request body the admin listener refused without reading it', () => {
  it('DOS-03d is not read to its end: the refusal (401 before any token, 404, 405, 413 while streaming) says Connection: close and the connection closes, as on the proxy listener', async () => {
    const created = await runCli(['admin-token', 'create', 'streamer', '--json'], envFor(lab.dir));
    expect(created.code).toBe(0);
    const admin = (JSON.parse(created.stdout) as { token: string }).token;
    await eventually(async () => (await fetch(`${lab.admin}/v1/callers`, { headers: { authorization: `Bearer ${admin}` } }).then(async (r) => (await r.text(), r.status))) === 200, 3_000, 'the admin token known');
    const port = Number(new URL(lab.admin).port);
    const block = Buffer.alloc(64 * 1024, 'a');
    const chunked = Buffer.from(`${block.length.toString(16)}\r\n${block.toString('latin1')}\r\n`, 'latin1');
    const declared = 1024 * 1024 * 1024;
    for (const [label, head, chunk, status] of [
      ['no token', `POST /v1/callers HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: ${declared}\r\n\r\n`, block, 401],
      ['no such endpoint', `POST /v1/nothing HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ${admin}\r\nContent-Type: application/json\r\nContent-Length: ${declared}\r\n\r\n`, block, 404],
      ['wrong method', `PUT /v1/callers HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ${admin}\r\nContent-Type: application/json\r\nContent-Length: ${declared}\r\n\r\n`, block, 405],
      ['health check with a body', `POST /healthz HTTP/1.1\r\nHost: admin\r\nContent-Length: ${declared}\r\n\r\n`, block, 405],
      ['metrics with a body', `GET /metrics HTTP/1.1\r\nHost: admin\r\nContent-Length: ${declared}\r\n\r\n`, block, 200],
      ['chunked past 128 KiB', `POST /v1/callers HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ${admin}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`, chunked, 413],
    ] as const) {
      // Before: the answer said keep-alive and Node read (and dropped) all 64 MiB, and whatever came after.
      const { answer, sent, closedByServer } = await streamBody(port, head, chunk, 64 * 1024 * 1024);
      lab.seen(answer);
      expect(statuses(answer), label).toEqual([status]);
      expect(answer, label).toMatch(/\r\nconnection: close\r\n/i);
      expect(closedByServer, `${label}: closed by the server (${sent} bytes sent)`).toBe(true);
    }
    await lab.g0();
  }, 60_000);
});
