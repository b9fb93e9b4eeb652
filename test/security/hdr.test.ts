import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CANARY, CLIENT_ID, rawRequest, startLab, statuses, type Lab } from './lab.ts';
import { RawConnection } from './raw-socket.ts';
import { eventually } from '../helpers/proxy.ts';

/**
 * HDR: header hygiene and injection. The standard plaid route injects PLAID-CLIENT-ID and
 * PLAID-SECRET; a second route /bearer (same U) injects Authorization: Bearer.
 */
let lab: Lab;

beforeAll(async () => {
  lab = await startLab({
    routes: (u) => ({
      bearer: `name: bearer
prefix: /bearer
upstream: ${u.url}
allow_private_addresses: true
credential: plaid
inject:
  scheme: bearer
  token: "{secret}"
allow:
  - caller: a
    methods: [POST, GET]
    paths: [/x]
`,
    }),
  });
}, 30_000);

afterAll(async () => {
  await lab?.close();
});

function count(raw: readonly string[], name: string): number {
  let n = 0;
  for (let i = 0; i < raw.length; i += 2) if (raw[i]!.toLowerCase() === name) n++;
  return n;
}

/** Raw request with caller a's token and the given header lines; returns the raw answer. */
async function send(path: string, headerLines: string[], body = '', method = 'POST'): Promise<string> {
  const lines = [`${method} ${path} HTTP/1.1`, 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, ...headerLines];
  if (!headerLines.some((l) => /^(content-length|transfer-encoding)\s*:/i.test(l))) lines.push(`Content-Length: ${Buffer.byteLength(body)}`);
  if (!headerLines.some((l) => /^connection\s*:/i.test(l))) lines.push('Connection: close');
  const raw = await rawRequest(lab.port, `${lines.join('\r\n')}\r\n\r\n${body}`);
  lab.seen(raw);
  return raw;
}

function noStack(raw: string): void {
  expect(raw).not.toMatch(/at .*\.(ts|js):\d+|TypeError|UND_ERR|Error: /);
}

describe('HDR: header hygiene and injection', () => {
  it('HDR-01 caller Authorization on a bearer route: U sees exactly one, the injected one', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/bearer/x', ['Authorization: Bearer attacker']);
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(count(r.rawHeaders, 'authorization')).toBe(1);
    expect(r.headers.authorization).toBe(`Bearer ${CANARY}`);
    expect(JSON.stringify(r.rawHeaders)).not.toContain('attacker');
    await lab.g0(mark, 1);
  });

  it('HDR-01c caller Authorization on the plaid route (its key goes in other headers): U sees none, only the injected key', async () => {
    const mark = lab.u.requests.length;
    for (const line of ['Authorization: Bearer attacker', 'authorization: Basic YXR0YWNrZXI6eA==', 'AUTHORIZATION: attacker']) {
      const raw = await send('/plaid/accounts/get', [line, 'Content-Type: application/json'], '{}');
      expect(statuses(raw), line).toEqual([200]);
      const r = lab.u.requests.at(-1)!;
      expect(count(r.rawHeaders, 'authorization'), line).toBe(0);
      expect(r.headers['plaid-secret']).toBe(CANARY);
      expect(JSON.stringify(r.rawHeaders), line).not.toMatch(/attacker|YXR0YWNrZXI6eA/);
    }
    await lab.g0(mark, 3);
  });

  it('HDR-01b caller copies of injected PLAID-SECRET / PLAID-CLIENT-ID never arrive', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/plaid/accounts/get', ['PLAID-SECRET: attacker-secret', 'plaid-client-id: attacker-id', 'Content-Type: application/json'], '{}');
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(count(r.rawHeaders, 'plaid-secret')).toBe(1);
    expect(count(r.rawHeaders, 'plaid-client-id')).toBe(1);
    expect(r.headers['plaid-secret']).toBe(CANARY);
    expect(r.headers['plaid-client-id']).toBe(CLIENT_ID);
    expect(JSON.stringify(r.rawHeaders)).not.toMatch(/attacker/);
    await lab.g0(mark, 1);
  });

  it('HDR-03 spelling variants and repeats: never two credentials at U', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/bearer/x', ['AUTHORIZATION: Basic YTpi', 'authorization: Bearer attacker-1', 'Authorization: Bearer attacker-2', 'aUtHoRiZaTiOn: x']);
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(count(r.rawHeaders, 'authorization')).toBe(1);
    expect(r.headers.authorization).toBe(`Bearer ${CANARY}`);
    expect(JSON.stringify(r.rawHeaders)).not.toMatch(/attacker|YTpi/);
    await lab.g0(mark, 1);
  });

  it('HDR-03b "Authorization :" (space before colon), tab before colon, and empty names → 400, nothing at U', async () => {
    const mark = lab.u.requests.length;
    for (const line of ['Authorization : Bearer attacker', 'Authorization\t: Bearer attacker', 'PLAID-SECRET : attacker', ': empty-name', ' Authorization: Bearer attacker']) {
      const raw = await send('/bearer/x', [line]);
      expect(statuses(raw), JSON.stringify(line)).toEqual([400]);
      noStack(raw);
    }
    await lab.g0(mark, 0);
  });

  it('HDR-04 Connection-listed headers are dropped, and Connection cannot unlist the injected credential', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/plaid/accounts/get', ['Connection: close, PLAID-SECRET, X-Private, plaid-client-id, authorization', 'X-Private: hop', 'Authorization: Bearer caller', 'Content-Type: application/json'], '{}');
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(r.headers['x-private']).toBeUndefined();
    expect(r.headers.authorization).toBeUndefined();
    // The credential is the proxy's, not the caller's hop-by-hop header: it still arrives, once.
    expect(count(r.rawHeaders, 'plaid-secret')).toBe(1);
    expect(r.headers['plaid-secret']).toBe(CANARY);
    expect(r.headers.connection ?? '').not.toMatch(/plaid|private/i);
    await lab.g0(mark, 1);
  });

  it('HDR-04b many Connection tokens (1000) and odd separators: no crash, listed headers dropped', async () => {
    const mark = lab.u.requests.length;
    const names = Array.from({ length: 1000 }, (_, i) => `x-h${i}`);
    const raw = await send('/plaid/accounts/get', [`Connection: ${names.join(',')}`, 'Connection: ,,, ,x-h1000 ,', 'x-h5: a', 'x-h1000: b', 'x-kept: c'], '');
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(r.headers['x-h5']).toBeUndefined();
    expect(r.headers['x-h1000']).toBeUndefined();
    expect(r.headers['x-kept']).toBe('c');
    await lab.g0(mark, 1);
  });

  it('HDR-05 headers undici refuses: a fast 400/417 or a clean forward without them; no stack trace, no 500', async () => {
    const cases: [string, string[], string][] = [
      ['Keep-Alive', ['Keep-Alive: timeout=5, max=1000'], ''],
      ['Upgrade: foo', ['Upgrade: foo'], ''],
      ['Connection: upgrade', ['Connection: upgrade', 'Upgrade: foo'], ''],
      ['Transfer-Encoding chunked', ['Transfer-Encoding: chunked'], '2\r\n{}\r\n0\r\n\r\n'],
      ['Expect: 100-continue', ['Expect: 100-continue'], '{}'],
      ['Expect: other', ['Expect: something-else'], '{}'],
      ['Trailer', ['Trailer: X-Foo'], '{}'],
      ['Trailer with chunked', ['Trailer: X-Foo', 'Transfer-Encoding: chunked'], '2\r\n{}\r\n0\r\nX-Foo: bar\r\n\r\n'],
      ['TE: gzip', ['TE: gzip, trailers'], ''],
      ['Proxy-Connection', ['Proxy-Connection: keep-alive'], ''],
      ['HTTP2-Settings', ['HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA'], ''],
    ];
    for (const [label, lines, body] of cases) {
      const mark = lab.u.requests.length;
      const started = Date.now();
      const raw = await send('/plaid/accounts/get', lines, body);
      const got = statuses(raw).filter((s) => s !== 100);
      expect(got.length, label).toBe(1);
      expect([200, 400, 417], `${label} -> ${got[0]}`).toContain(got[0]);
      expect(Date.now() - started, label).toBeLessThan(2_000);
      noStack(raw);
      if (got[0] === 200) {
        const r = lab.u.requests.at(-1)!;
        for (const h of ['keep-alive', 'upgrade', 'expect', 'trailer', 'te', 'proxy-connection', 'http2-settings']) expect(r.headers[h], `${label}: ${h}`).toBeUndefined();
        await lab.g0(mark, 1);
      } else {
        await lab.g0(mark, 0);
      }
    }
  });

  it('HDR-05b invalid Content-Length values → 400 from the parser; nothing at U', async () => {
    const mark = lab.u.requests.length;
    for (const cl of ['abc', '-1', '1.0', '', '0x2', '99999999999999999999999', '2 2']) {
      const raw = await send('/plaid/accounts/get', [`Content-Length: ${cl}`], '{}');
      expect(statuses(raw), `CL ${JSON.stringify(cl)}`).toEqual([400]);
      noStack(raw);
    }
    await lab.g0(mark, 0);
  });

  it('HDR-07 WebSocket and h2c upgrades on an API route → 400/403, never 101; nothing at U', async () => {
    const mark = lab.u.requests.length;
    const ws = ['Connection: Upgrade', 'Upgrade: websocket', 'Sec-WebSocket-Version: 13', 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=='];
    for (const [label, lines] of [
      ['websocket GET', ws],
      ['websocket mixed case', ['Connection: keep-alive, UPGRADE', 'Upgrade: WebSocket', 'Sec-WebSocket-Version: 13', 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==']],
      ['h2c', ['Connection: Upgrade, HTTP2-Settings', 'Upgrade: h2c', 'HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA']],
    ] as [string, string[]][]) {
      for (const method of ['GET', 'POST']) {
        const raw = await rawRequest(lab.port, [`${method} /plaid/accounts/get HTTP/1.1`, 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, 'Content-Length: 0', ...lines, '', ''].join('\r\n'));
        lab.seen(raw);
        expect(raw, label).not.toMatch(/^HTTP\/1\.1 101/m);
        const got = statuses(raw);
        expect(got.length, `${label} ${method}`).toBeGreaterThanOrEqual(1);
        expect([400, 403], `${label} ${method} -> ${got[0]}`).toContain(got[0]);
      }
    }
    await lab.g0(mark, 0);
  });

  it('HDR-09 forwarding claims (X-Forwarded-For/Host/Proto/Port/Prefix, Forwarded, X-Real-IP, Via) are stripped', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/plaid/accounts/get', [
      'X-Forwarded-For: 10.0.0.1', 'X-Forwarded-Host: evil.example', 'X-Forwarded-Proto: https', 'X-Forwarded-Port: 443', 'X-Forwarded-Prefix: /admin',
      'Forwarded: for=10.0.0.1;host=evil.example;proto=https', 'X-Real-IP: 10.0.0.1', 'Via: 1.1 evil', 'x-forwarded-for: 10.0.0.2',
    ]);
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    for (const h of ['x-forwarded-for', 'x-forwarded-host', 'x-forwarded-proto', 'x-forwarded-port', 'x-forwarded-prefix', 'forwarded', 'x-real-ip']) expect(r.headers[h], h).toBeUndefined();
    expect(r.headers.via ?? '').not.toContain('evil');
    expect(JSON.stringify(r.rawHeaders)).not.toMatch(/10\.0\.0\.[12]|evil\.example|\/admin/);
    await lab.g0(mark, 1);
  });

  it('HDR-10 CR, LF, NUL and other control bytes in header values or names → 400; nothing at U', async () => {
    const mark = lab.u.requests.length;
    for (const line of ['X-A: a\rInjected: 1', 'X-A: a\x00b', 'X-A: a\x0bb', 'X-A: a\x7fb', 'X\x00A: b', 'X A: b', 'X-A:\x01', 'X(A): b', 'X-A: a\r\n\rX: y']) {
      const raw = await send('/plaid/accounts/get', [line]);
      const got = statuses(raw);
      expect(got, JSON.stringify(line)).toEqual([400]);
      noStack(raw);
    }
    await lab.g0(mark, 0);
  });

  it('HDR-11 prototype header names (__proto__, constructor, prototype, toString, hasOwnProperty): no crash', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/plaid/accounts/get', ['__proto__: x', 'constructor: y', 'prototype: z', 'toString: t', 'hasOwnProperty: h', '__defineGetter__: g', 'valueOf: v', 'Connection: __proto__, constructor, close'], '');
    expect(statuses(raw)).toEqual([200]);
    // Twice, on keep-alive, in different order and case: still no crash.
    const raw2 = await rawRequest(lab.port, [
      'POST /plaid/accounts/get HTTP/1.1', 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, 'CONSTRUCTOR: 1', '__PROTO__: 2', '__proto__: 3', 'Content-Length: 0', '', '',
      'POST /plaid/accounts/get HTTP/1.1', 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, 'hasownproperty: 1', 'Content-Length: 0', 'Connection: close', '', ''].join('\r\n'));
    lab.seen(raw2);
    expect(statuses(raw2)).toEqual([200, 200]);
    await lab.g0(mark, 3);
  });

  it('HDR-11b prototype names as token, path segment or route prefix: 401/403/404, never 500', async () => {
    const mark = lab.u.requests.length;
    for (const token of ['__proto__', 'constructor', 'toString', 'egt___proto__']) {
      const raw = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      lab.seen(raw);
      expect(statuses(raw), token).toEqual([401]);
    }
    for (const path of ['/__proto__/accounts/get', '/constructor/x', '/prototype', '/plaid/__proto__', '/plaid/constructor/get', '/plaid/accounts/__proto__', '/hasOwnProperty/x', '/toString']) {
      const raw = await send(path, []);
      const got = statuses(raw);
      expect(got.length, path).toBe(1);
      expect([403, 404], `${path} -> ${got[0]}`).toContain(got[0]);
    }
    expect(({} as Record<string, unknown>).x).toBeUndefined();
    await lab.g0(mark, 0);
  });

  it('HDR-12 more headers than maxHeadersCount (2100) cannot frame a hidden body or smuggle a request', async () => {
    const mark = lab.u.requests.length;
    const filler = Array.from({ length: 2100 }, (_, i) => `x${i}: 1`);
    const smuggled = `POST /plaid/item/remove HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n`;
    const raw = await rawRequest(lab.port, [`POST /plaid/accounts/get HTTP/1.1`, 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, ...filler, `Content-Length: ${smuggled.length}`, '', ''].join('\r\n') + smuggled);
    lab.seen(raw);
    const got = statuses(raw);
    expect(got.length).toBeGreaterThanOrEqual(1);
    // Either the whole thing is refused, or the hidden Content-Length framed the body (one request);
    // the bytes after it are never a second request that reaches U.
    for (const s of got) expect([200, 400, 401, 403, 431], String(s)).toContain(s);
    expect(lab.u.requests.slice(mark).map((r) => r.url)).not.toContain('/item/remove');
    await lab.g0(mark, 1);
  });

  it('HDR-13 one 17 KiB header → 431 and the connection closed', async () => {
    const mark = lab.u.requests.length;
    const raw = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nX-Big: ${'a'.repeat(17 * 1024)}\r\nContent-Length: 0\r\n\r\nPOST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\n\r\n`, 1_000);
    lab.seen(raw);
    expect(statuses(raw)).toEqual([431]);
    await lab.g0(mark, 0);
  });

  it('HDR-13b 200 × 8 KiB headers, and many small headers over 16 KiB → 431', async () => {
    const mark = lab.u.requests.length;
    const big = Array.from({ length: 200 }, (_, i) => `X-H${i}: ${'b'.repeat(8 * 1024)}`).join('\r\n');
    const raw = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\n${big}\r\nContent-Length: 0\r\n\r\n`, 1_000).catch((e: Error) => `error ${e.message}`);
    lab.seen(raw);
    expect(statuses(raw)).toEqual([431]);
    const small = Array.from({ length: 1200 }, (_, i) => `X-S${i}: ${'c'.repeat(10)}`).join('\r\n');
    const raw2 = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\n${small}\r\nContent-Length: 0\r\n\r\n`, 1_000);
    lab.seen(raw2);
    expect(statuses(raw2)).toEqual([431]);
    // A long request line counts too.
    const raw3 = await rawRequest(lab.port, `POST /plaid/accounts/get?${'q'.repeat(17 * 1024)} HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\n\r\n`, 1_000);
    lab.seen(raw3);
    expect([400, 414, 431]).toContain(statuses(raw3)[0]);
    await lab.g0(mark, 0);
  });

  it('HDR-13d the 431 reaches a caller that is still sending: further parse errors do not cut the lingering close short (regression)', async () => {
    // Node's parser reports each later chunk of the refused request as another client error; the
    // socket, already answered and half-closed, was destroyed on the second one, and the reset made
    // the caller's kernel drop the 431 it had not read yet (about one attempt in four).
    const mark = lab.u.requests.length;
    const big = Array.from({ length: 200 }, (_, i) => `X-H${i}: ${'b'.repeat(8 * 1024)}`).join('\r\n');
    for (let i = 0; i < 20; i++) {
      const raw = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\n${big}\r\nContent-Length: 0\r\n\r\n`, 1_000).catch((e: Error) => `error ${e.message}`);
      lab.seen(raw);
      expect(statuses(raw), `attempt ${i + 1}: ${raw.slice(0, 80)}`).toEqual([431]);
    }
    await lab.g0(mark, 0);
  });

  it('HDR-13c just under the limit (12 KiB of headers) still works (control)', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/plaid/accounts/get', [`X-Big: ${'a'.repeat(12 * 1024)}`]);
    expect(statuses(raw)).toEqual([200]);
    await lab.g0(mark, 1);
  });

  it('HDR-14 Connection naming the injected Authorization, the token header or Host cannot remove or replace the credential', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/bearer/x', ['Connection: authorization, x-egress-token, host, close', 'Authorization: Bearer attacker']);
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(count(r.rawHeaders, 'authorization')).toBe(1);
    expect(r.headers.authorization).toBe(`Bearer ${CANARY}`);
    expect(r.headers.host).toBe(`127.0.0.1:${lab.u.port}`);
    expect(JSON.stringify(r.rawHeaders)).not.toMatch(/attacker|x-egress-token/i);
    await lab.g0(mark, 1);
  });

  it('HDR-15 Proxy-Authorization carrying another caller\'s token on the reverse port is neither forwarded nor used for identity', async () => {
    const mark = lab.u.requests.length;
    const raw = await send('/bearer/x', [`Proxy-Authorization: Bearer ${lab.tokens.b}`, `Proxy-Authorization: Basic ${Buffer.from(`b:${lab.tokens.b}`).toString('base64')}`]);
    // a's own token decides (a may call /bearer/x, b may not); b's token goes nowhere.
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(r.headers['proxy-authorization']).toBeUndefined();
    expect(JSON.stringify(r.rawHeaders)).not.toContain(lab.tokens.b);
    expect(JSON.stringify(r.rawHeaders)).not.toContain(Buffer.from(`b:${lab.tokens.b}`).toString('base64'));
    await lab.g0(mark, 1);
  });

  it('HDR-16 non-ASCII bytes in header names → 400, nothing at U; in a value → forwarded unchanged, no stack', async () => {
    // rawRequest writes strings as UTF-8: \xff goes out as C3 BF, \xe2\x80\x8b (a zero-width space) as C3 A2 C2 80 C2 8B.
    const mark = lab.u.requests.length;
    for (const line of ['X-\xc3\xbc: 1', 'X-\xff: 1', '\xe2\x80\x8bAuthorization: Bearer attacker']) {
      const raw = await send('/bearer/x', [line]);
      expect(statuses(raw), JSON.stringify(line)).toEqual([400]);
      noStack(raw);
    }
    await lab.g0(mark, 0);
    const raw = await send('/bearer/x', ['X-A: caf\xe9 \xff\x80']);
    // obs-text in a value is allowed (RFC 9110 §5.5): forwarded byte for byte, beside the one credential.
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(Buffer.from(String(r.headers['x-a']), 'latin1').equals(Buffer.from('caf\xe9 \xff\x80', 'utf8'))).toBe(true);
    expect(count(r.rawHeaders, 'authorization')).toBe(1);
    noStack(raw);
    await lab.g0(mark, 1);
  });
  it('HDR-19 an Expect other than 100-continue is the proxy\'s 417 (X-Egress-Error, X-Request-Id, JSON body, audited), not Node\'s bare 417; its body and what follows are not processed', async () => {
    const mark = lab.u.requests.length;
    for (const value of ['something-else', '100-continue, foo']) {
      const next = 'POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n';
      const raw = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nExpect: ${value}\r\nContent-Length: 2\r\n\r\n{}${next}`);
      lab.seen(raw);
      expect(statuses(raw), value).toEqual([417]);
      expect(raw, value).toMatch(/\r\nx-egress-error: expectation_failed\r\n/i);
      const id = /\r\nx-request-id: ([0-9a-f-]{36})\r\n/i.exec(raw)?.[1];
      expect(id, value).toBeDefined();
      expect(raw, value).toMatch(/\r\nconnection: close\r\n/i);
      expect(JSON.parse(raw.slice(raw.indexOf('\r\n\r\n') + 4)).error, value).toMatchObject({ code: 'expectation_failed', request_id: id });
      await eventually(async () => (await readFile(join(lab.dir, 'audit.log'), 'utf8')).includes(`"${id}"`), 3_000, `${value}: the refusal audited`);
    }
    await lab.g0(mark, 0);
  });

  it('HDR-18b Expect: 100-continue on an HTTP/1.0 request is ignored (RFC 9110 §10.1.1): no 100 Continue, which an HTTP/1.0 client would take for its answer', async () => {
    const mark = lab.u.requests.length;
    const raw = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.0\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nExpect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`);
    lab.seen(raw);
    expect(statuses(raw)).toEqual([200]);
    expect(lab.u.requests.at(-1)!.body.toString()).toBe('{}');
    await lab.g0(mark, 1);
  });

  it('HDR-18 Expect: 100-continue: no 100 Continue before the request is authenticated and allowed; an allowed one gets it and its body reaches U', async () => {
    // Node answers 100 Continue by itself as soon as the head arrives: a caller with no token, or
    // on a path it may not use, was invited to send its body before the 401/403.
    const mark = lab.u.requests.length;
    const head = (path: string, token: string | undefined) => `POST ${path} HTTP/1.1\r\nHost: p\r\n${token ? `X-Egress-Token: ${token}\r\n` : ''}Expect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n`;
    for (const [label, path, token, status] of [['no token', '/plaid/accounts/get', undefined, 401], ['forbidden path', '/plaid/item/remove', lab.tokens.a, 403]] as const) {
      const conn = await RawConnection.open(lab.port);
      const answer = await conn.exchange(head(path, token));
      conn.close();
      lab.seen(answer);
      expect(statuses(answer), label).toEqual([status]);
    }
    expect(lab.u.requests.length - mark).toBe(0);
    const conn = await RawConnection.open(lab.port);
    const interim = await conn.exchange(head('/plaid/accounts/get', lab.tokens.a));
    expect(statuses(interim), 'allowed: 100 Continue, then the body is read').toEqual([100]);
    const final = await conn.exchange('{}');
    conn.close();
    lab.seen(final);
    expect(statuses(final)).toEqual([200]);
    expect(lab.u.requests.length - mark).toBe(1);
    expect(lab.u.requests.at(-1)!.body.toString()).toBe('{}');
    await lab.g0(mark, 1);
  });
});
