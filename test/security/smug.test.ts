import { readFile } from 'node:fs/promises';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually } from '../helpers/proxy.ts';
import { startLab, statuses, type Lab } from './lab.ts';
import { RawConnection, rawExchange } from './raw-socket.ts';

/**
 * SMUG: framing. Every case is raw bytes on one keep-alive socket, with a smuggled request for
 * /plaid/item/remove (which no caller may call) behind the first one. The outcome is either 400 and
 * the connection closed, or exactly one normalised request at U; /item/remove never reaches U, and
 * any request after the first is authorised on its own.
 */
let lab: Lab;

beforeAll(async () => {
  lab = await startLab();
}, 30_000);

afterAll(async () => {
  await lab?.close();
});

const HEAD = () => `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Type: application/json\r\n`;
/** The smuggled request: no token, a forbidden path. */
const SMUGGLED = 'POST /plaid/item/remove HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n';
/** The smuggled request carrying a's token: must be refused by the allowlist on its own. */
const SMUGGLED_A = () => `POST /plaid/item/remove HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\n\r\n`;

/** The proxy's own refusal of a transfer coding: its error and message, and no header text of the caller's. */
function expectCodingRefusal(data: string, label: string): void {
  expect(data, label).toMatch(/\r\nx-egress-error: bad_request\r\n/i);
  expect(data, label).toMatch(/\r\nx-request-id: [0-9a-f-]{36}\r\n/i);
  expect(data, label).toMatch(/\r\nconnection: close\r\n/i);
  const body = data.slice(data.indexOf('\r\n\r\n') + 4);
  expect(body, label).toContain('Transfer-Encoding may name only chunked');
  expect(body.toLowerCase(), `${label}: the coding not echoed`).not.toMatch(/gzip|deflate|x-private-coding|identity/);
}

function neverSmuggled(mark: number): void {
  const urls = lab.u.requests.slice(mark).map((r) => r.url);
  for (const url of urls) expect(url, 'only the allowed path reaches U').toBe('/accounts/get');
}

/** The strict outcome: 400 and the connection closed; nothing at U. */
async function expect400Closed(bytes: string, label: string): Promise<void> {
  const mark = lab.u.requests.length;
  const { data, closed } = await rawExchange(lab.port, bytes);
  lab.seen(data);
  expect(statuses(data), label).toEqual([400]);
  expect(closed, `${label}: connection closed`).toBe(true);
  // Every response carries X-Request-Id, also one written on the raw socket.
  expect(data, label).toMatch(/\r\nx-request-id: [0-9a-f-]{36}\r\n/i);
  expect(data, label).not.toMatch(/at .*\.(ts|js):\d+/);
  neverSmuggled(mark);
  await lab.g0(mark, 0);
}

/**
 * The lenient but safe outcome: 400 and closed, or the first request answered 200 with exactly one
 * request at U carrying `body` (when given); anything after it is refused on its own (400/401/403).
 */
async function expectSafe(bytes: string, label: string, body?: string): Promise<void> {
  const mark = lab.u.requests.length;
  const { data, closed } = await rawExchange(lab.port, bytes);
  lab.seen(data);
  const got = statuses(data);
  expect(got.length, `${label}: answered`).toBeGreaterThanOrEqual(1);
  if (got[0] === 400) {
    expect(closed, `${label}: connection closed after 400`).toBe(true);
    expect(got, label).toEqual([400]);
    await lab.g0(mark, 0);
  } else {
    expect(got[0], label).toBe(200);
    expect(lab.u.requests.length - mark, `${label}: exactly one request at U`).toBe(1);
    if (body !== undefined) expect(lab.u.requests.at(-1)!.body.toString('latin1'), `${label}: normalised body`).toBe(body);
    for (const s of got.slice(1)) expect([400, 401, 403], `${label}: follow-up ${s}`).toContain(s);
    await lab.g0(mark, 1);
  }
  neverSmuggled(mark);
}

describe('SMUG: request framing', () => {
  it('SMUG-00 a well-framed keep-alive pair is answered twice and reaches U twice (control)', async () => {
    const mark = lab.u.requests.length;
    const { data } = await rawExchange(lab.port, `${HEAD()}Content-Length: 2\r\n\r\n{}${HEAD()}Content-Length: 2\r\nConnection: close\r\n\r\n{}`);
    lab.seen(data);
    expect(statuses(data)).toEqual([200, 200]);
    expect(lab.u.requests.length - mark).toBe(2);
    neverSmuggled(mark);
    await lab.g0(mark, 2);
  });

  it('SMUG-01 CL.TE: Content-Length and Transfer-Encoding together → 400, closed', async () => {
    await expect400Closed(`${HEAD()}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n${SMUGGLED}`, 'CL.TE');
    await expect400Closed(`${HEAD()}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n${SMUGGLED_A()}`, 'CL.TE with token');
  });

  it('SMUG-01b TE.CL: Transfer-Encoding first, then a short Content-Length → 400, closed', async () => {
    const chunk = SMUGGLED.length.toString(16);
    await expect400Closed(`${HEAD()}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n${chunk}\r\n${SMUGGLED}\r\n0\r\n\r\n`, 'TE.CL');
  });

  it('SMUG-02 Transfer-Encoding variants: xchunked, chunked;ext, duplicates, lists, obs-fold, whitespace', async () => {
    const body0 = `0\r\n\r\n${SMUGGLED}`;
    for (const [label, te] of [
      ['xchunked', 'Transfer-Encoding: xchunked'],
      ['chunked;ext', 'Transfer-Encoding: chunked;a=b'],
      ['duplicate TE', 'Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked'],
      ['chunked, identity', 'Transfer-Encoding: chunked, identity'],
      ['TE obs-fold', 'Transfer-Encoding:\r\n chunked'],
      ['TE space before colon', 'Transfer-Encoding : chunked'],
      ['TE vertical tab', 'Transfer-Encoding:\x0bchunked'],
      ['TE with CL 0', 'Transfer-Encoding: chunked\r\nContent-Length: 0'],
      ['TE "chunked" quoted', 'Transfer-Encoding: "chunked"'],
      ['TE unknown coding', 'Transfer-Encoding: foo'],
    ] as const) {
      await expect400Closed(`${HEAD()}${te}\r\n\r\n${body0}`, label);
    }
  });

  it('SMUG-02b valid but unusual chunked spellings are framed once, correctly', async () => {
    for (const [label, te] of [
      ['CHUNKED upper case', 'Transfer-Encoding: CHUNKED'],
      ['tab before value', 'Transfer-Encoding:\tchunked'],
      ['trailing space', 'Transfer-Encoding: chunked '],
    ] as const) {
      await expectSafe(`${HEAD()}${te}\r\n\r\n2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`, label, '{}');
    }
  });

  it('SMUG-02c a transfer coding other than chunked before the final chunked (gzip, chunked): the proxy\'s own 400, audited, closed; nothing reaches U', async () => {
    // Node de-chunks such a body and hands over the still-coded bytes; Transfer-Encoding is not
    // forwarded, so U would take compressed bytes for the body itself (RFC 9112 §6.1).
    const gzipped = '\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00\x43\xbf\xa6\xa3\x02\x00\x00\x00';
    const chunked = `${gzipped.length.toString(16)}\r\n${gzipped}\r\n0\r\n\r\n`;
    for (const [label, te] of [
      ['gzip, chunked', 'Transfer-Encoding: gzip, chunked'],
      ['deflate, chunked', 'Transfer-Encoding: deflate, chunked'],
      ['GZIP, CHUNKED', 'Transfer-Encoding: GZIP, CHUNKED'],
      ['an unregistered coding, chunked', 'Transfer-Encoding: x-private-coding, chunked'],
      ['identity, chunked', 'Transfer-Encoding: identity, chunked'],
      ['gzip then chunked on two lines', 'Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked'],
      ['identity then chunked on two lines', 'Transfer-Encoding: identity\r\nTransfer-Encoding: chunked'],
    ] as const) {
      const mark = lab.u.requests.length;
      const { data, closed } = await rawExchange(lab.port, `${HEAD()}${te}\r\n\r\n${chunked}${SMUGGLED_A()}`);
      lab.seen(data);
      expect(statuses(data), label).toEqual([400]);
      expect(closed, `${label}: connection closed`).toBe(true);
      expectCodingRefusal(data, label);
      expect(lab.u.requests.length - mark, `${label}: nothing at U`).toBe(0);
      const id = /\r\nx-request-id: ([0-9a-f-]{36})\r\n/i.exec(data)![1]!;
      await eventually(async () => (await readFile(join(lab.dir, 'audit.log'), 'utf8')).split('\n').some((line) => line.includes(id) && line.includes('"reason":"bad_request"')), 3_000, `${label}: the refusal audited`);
    }
    // Chunked alone, in any case and with whitespace, still goes through (control).
    const mark = lab.u.requests.length;
    const { data } = await rawExchange(lab.port, `${HEAD()}Transfer-Encoding:  Chunked \r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n`);
    expect(statuses(data)).toEqual([200]);
    expect(lab.u.requests.slice(mark).map((r) => r.body.toString())).toEqual(['{}']);
    await lab.g0(mark, 1);
  });

  it('SMUG-03 Content-Length variants: two values, +4, 4,4, 0x4, -4, 4.0, empty → 400, closed', async () => {
    for (const [label, cl] of [
      ['two different CLs', 'Content-Length: 2\r\nContent-Length: 40'],
      ['two different CLs reversed', 'Content-Length: 40\r\nContent-Length: 2'],
      ['+2', 'Content-Length: +2'],
      ['2,40', 'Content-Length: 2,40'],
      ['0x2', 'Content-Length: 0x2'],
      ['-2', 'Content-Length: -2'],
      ['2.0', 'Content-Length: 2.0'],
      ['empty', 'Content-Length: '],
      ['2 2', 'Content-Length: 2 2'],
      ['CL space before colon', 'Content-Length : 2'],
      ['CL obs-fold', 'Content-Length:\r\n 2'],
      ['overflow', 'Content-Length: 18446744073709551618'],
    ] as const) {
      await expect400Closed(`${HEAD()}${cl}\r\n\r\n{}${SMUGGLED}`, label);
    }
  });

  it('SMUG-03b Content-Length spellings that are valid: framed once, the rest refused on its own', async () => {
    for (const [label, cl] of [
      ['same CL twice', 'Content-Length: 2\r\nContent-Length: 2'],
      ['2,2', 'Content-Length: 2,2'],
      ['trailing space', 'Content-Length: 2 '],
      ['leading zeros', 'Content-Length: 002'],
      ['tab', 'Content-Length:\t2'],
    ] as const) {
      await expectSafe(`${HEAD()}${cl}\r\n\r\n{}${SMUGGLED}`, label, '{}');
    }
  });

  it('SMUG-03c a GET with Content-Length and a body: the body is consumed, never a second request', async () => {
    const mark = lab.u.requests.length;
    const { data } = await rawExchange(lab.port, `GET /plaid/institutions/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.b}\r\nContent-Length: ${SMUGGLED.length}\r\n\r\n${SMUGGLED}`);
    lab.seen(data);
    const got = statuses(data);
    expect(got.length).toBe(1);
    expect([200, 400]).toContain(got[0]);
    expect(lab.u.requests.slice(mark).map((r) => r.url)).not.toContain('/item/remove');
    expect(lab.u.requests.length - mark).toBeLessThanOrEqual(1);
    await lab.g0(mark, 1);
  });

  it('SMUG-05 line terminators: bare LF request, bare LF header end, bare CR, \\r\\n\\rX → 400, closed', async () => {
    const t = lab.tokens.a;
    await expect400Closed(`POST /plaid/accounts/get HTTP/1.1\nHost: p\nX-Egress-Token: ${t}\nContent-Length: 0\n\n${SMUGGLED}`, 'bare LF everywhere');
    await expect400Closed(`${HEAD()}Content-Length: 0\n\n${SMUGGLED}`, 'bare LF at header end');
    await expect400Closed(`${HEAD()}X-A: b\nContent-Length: 0\r\n\r\n${SMUGGLED}`, 'bare LF inside headers');
    await expect400Closed(`${HEAD()}X-A: b\rContent-Length: 40\r\nContent-Length: 0\r\n\r\n${SMUGGLED}`, 'bare CR in a header');
    await expect400Closed(`${HEAD()}Content-Length: 0\r\n\rX\r\n\r\n${SMUGGLED}`, '\\r\\n\\rX header end');
    await expect400Closed(`POST /plaid/accounts/get HTTP/1.1\rHost: p\r\nX-Egress-Token: ${t}\r\nContent-Length: 0\r\n\r\n`, 'bare CR after request line');
  });

  it('SMUG-05b obs-fold and space before colon on ordinary headers → 400, closed', async () => {
    await expect400Closed(`${HEAD()}X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n${SMUGGLED}`, 'obs-fold space');
    await expect400Closed(`${HEAD()}X-A: a\r\n\tb\r\nContent-Length: 0\r\n\r\n${SMUGGLED}`, 'obs-fold tab');
    await expect400Closed(`${HEAD()}Host : q\r\nContent-Length: 0\r\n\r\n${SMUGGLED}`, 'Host space before colon');
    await expect400Closed(`${HEAD()}X-Egress-Token : x\r\nContent-Length: 0\r\n\r\n`, 'token space before colon');
  });

  it('SMUG-05c bad request lines: HTTP/0.9, HTTP/2 preface, bad versions → no request at U', async () => {
    for (const [label, bytes] of [
      ['HTTP/0.9', 'GET /plaid/accounts/get\r\n\r\n'],
      ['h2 preface', 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'],
      ['HTTP/1.2', `POST /plaid/accounts/get HTTP/1.2\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\n\r\n`],
      ['HTTP/3.0', `POST /plaid/accounts/get HTTP/3.0\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\n\r\n`],
      ['lower-case version', `POST /plaid/accounts/get http/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\n\r\n`],
    ] as const) {
      const mark = lab.u.requests.length;
      const { data, closed } = await rawExchange(lab.port, bytes);
      lab.seen(data);
      const got = statuses(data);
      // HTTP/0.9 carries no headers, so no token: Node parses it and the proxy refuses it (401).
      for (const s of got) expect([400, 401, 505], `${label}: ${s}`).toContain(s);
      expect(closed, `${label}: closed`).toBe(true);
      await lab.g0(mark, 0);
    }
  });

  it('SMUG-07 funky chunks: bare LF after size or data, LF in extension, NUL in extension, bad sizes → 400, closed', async () => {
    for (const [label, body] of [
      ['4\\n', `2\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['data\\n', `2\r\n{}\n0\r\n\r\n${SMUGGLED}`],
      ['ext LF', `2;a\nb\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['ext NUL', `2;\x00\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['ext CR', `2;a\rb\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['0x size', `0x2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['negative size', `-2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['size overflow', `fffffffffffffffff2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['leading space size', ` 2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['missing CRLF after data', `2\r\n{}X\r\n0\r\n\r\n${SMUGGLED}`],
      ['last chunk bare LF', `2\r\n{}\r\n0\n\n${SMUGGLED}`],
      ['not hex', `g\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
    ] as const) {
      await expect400Closed(`${HEAD()}Transfer-Encoding: chunked\r\n\r\n${body}`, label);
    }
  });

  it('SMUG-07b valid chunk extensions and trailers are framed once; a trailer Content-Length changes nothing', async () => {
    await expectSafe(`${HEAD()}Transfer-Encoding: chunked\r\n\r\n2;name=value\r\n{}\r\n0\r\n\r\n${SMUGGLED}`, 'extension', '{}');
    await expectSafe(`${HEAD()}Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n1\r\n}\r\n0\r\nContent-Length: 40\r\nX-Trailer: t\r\n\r\n${SMUGGLED}`, 'trailers', '{}');
  });

  it('SMUG-07c chunk-extension flood (20 KiB of extension) is refused, not buffered forever', async () => {
    const mark = lab.u.requests.length;
    const started = Date.now();
    const { data, closed } = await rawExchange(lab.port, `${HEAD()}Transfer-Encoding: chunked\r\n\r\n2;${'a=b;'.repeat(5 * 1024)}\r\n{}\r\n0\r\n\r\n`, 1_500);
    lab.seen(data);
    expect(statuses(data)).toEqual([400]);
    expect(closed).toBe(true);
    expect(Date.now() - started).toBeLessThan(3_000);
    await lab.g0(mark, 0);
  });

  it('SMUG-09 pipelined second request is authorised on its own: no token → 401, forbidden path → 403', async () => {
    const mark = lab.u.requests.length;
    const { data } = await rawExchange(lab.port, `${HEAD()}Content-Length: 0\r\n\r\n${SMUGGLED}${SMUGGLED_A()}${HEAD()}Content-Length: 0\r\nConnection: close\r\n\r\n`);
    lab.seen(data);
    const got = statuses(data);
    expect(got[0]).toBe(200);
    expect(got[1]).toBe(401);
    // After a 401 the proxy may close; if it kept going, the next ones are judged on their own.
    if (got.length > 2) expect(got.slice(2)).toEqual([403, 200]);
    neverSmuggled(mark);
    await lab.g0(mark, 2);
  });

  it('SMUG-09b the token of a previous request on the same connection is not inherited', async () => {
    const conn = await RawConnection.open(lab.port);
    try {
      const mark = lab.u.requests.length;
      const first = await conn.exchange(`${HEAD()}Content-Length: 2\r\n\r\n{}`);
      lab.seen(first);
      expect(statuses(first)).toEqual([200]);
      const second = await conn.exchange('POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\n{}');
      lab.seen(second);
      expect(statuses(second)).toEqual([401]);
      const third = await conn.exchange(`POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.b}\r\nContent-Length: 0\r\n\r\n`);
      lab.seen(third);
      // b's own request on this connection is judged as b (403 on a's path), or the proxy closed after the 401.
      if (third) expect(statuses(third)).toEqual([403]);
      else expect(conn.closed).toBe(true);
      expect(lab.u.requests.length - mark).toBe(1);
      await lab.g0(mark, 1);
    } finally {
      conn.close();
    }
  });

  it('SMUG-09c 0.CL: a body on a request that declared none becomes a separate request, refused on its own', async () => {
    const mark = lab.u.requests.length;
    const { data } = await rawExchange(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\n\r\n${SMUGGLED}`);
    lab.seen(data);
    const got = statuses(data);
    expect(got[0]).toBe(200);
    for (const s of got.slice(1)) expect([400, 401]).toContain(s);
    expect(lab.u.requests.at(-1)!.body.length).toBe(0);
    neverSmuggled(mark);
    await lab.g0(mark, 1);
  });

  it('SMUG-09d a body shorter than its Content-Length is not completed by the next caller\'s bytes', async () => {
    // a declares 40 bytes but sends 2 and waits; the proxy must not forward a request with a body from elsewhere.
    const conn = await RawConnection.open(lab.port);
    const mark = lab.u.requests.length;
    try {
      await conn.exchange(`${HEAD()}Content-Length: 40\r\n\r\n{}`, 200);
      // Another caller's request on another connection is unaffected.
      const { data } = await rawExchange(lab.port, `GET /plaid/institutions/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.b}\r\nConnection: close\r\n\r\n`);
      lab.seen(data);
      expect(statuses(data)).toEqual([200]);
      const bReq = lab.u.requests.slice(mark).find((r) => r.url === '/institutions/x');
      expect(bReq?.body.length).toBe(0);
      expect(lab.u.requests.slice(mark).every((r) => !r.body.toString('latin1').includes('institutions'))).toBe(true);
    } finally {
      conn.close();
    }
    await new Promise((r) => setTimeout(r, 200));
    // a's truncated request never completes at U with a body of the wrong length.
    for (const r of lab.u.requests.slice(mark)) if (r.url === '/accounts/get') expect(r.body.length).toBe(40);
    await lab.g0(mark, 2);
  });

  it('SMUG-15 chunk sizes with leading zeros and HTTP/1.0 keep-alive are framed once, and what follows is judged on its own', async () => {
    for (const [label, bytes] of [
      ['chunk size with leading zeros', `${HEAD()}Transfer-Encoding: chunked\r\n\r\n0002\r\n{}\r\n0000\r\n\r\n${SMUGGLED}`],
      ['chunk size with 30 leading zeros', `${HEAD()}Transfer-Encoding: chunked\r\n\r\n${'0'.repeat(30)}2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['HTTP/1.0 keep-alive', `${HEAD().replace('HTTP/1.1', 'HTTP/1.0')}Connection: keep-alive\r\nContent-Length: 2\r\n\r\n{}${SMUGGLED}`],
    ] as const) {
      const mark = lab.u.requests.length;
      const { data } = await rawExchange(lab.port, bytes);
      lab.seen(data);
      const got = statuses(data);
      expect(got[0], label).toBe(200);
      for (const s of got.slice(1)) expect([400, 401], `${label}: follow-up ${s}`).toContain(s);
      expect(lab.u.requests.length - mark, label).toBe(1);
      expect(lab.u.requests.at(-1)!.body.toString(), label).toBe('{}');
      neverSmuggled(mark);
      await lab.g0(mark, 1);
    }
  });

  it('SMUG-15c Transfer-Encoding on an HTTP/1.0 request is faulty framing (RFC 9112 §6.1) → 400, closed; nothing reaches U', async () => {
    // An HTTP/1.0 recipient may not know chunked and read the chunks as the body and then as requests.
    const head = HEAD().replace('HTTP/1.1', 'HTTP/1.0');
    for (const [label, bytes] of [
      ['HTTP/1.0 chunked', `${head}Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['HTTP/1.0 keep-alive chunked', `${head}Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['HTTP/1.0 chunked with Content-Length', `${head}Transfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
    ] as const) {
      await expect400Closed(bytes, label);
    }
  });

  it('SMUG-15b chunked listed twice, chunked then identity, identity alone, framing fields in a trailer → 400, closed', async () => {
    for (const [label, bytes] of [
      ['chunked, chunked', `${HEAD()}Transfer-Encoding: chunked, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['chunked then identity on two lines', `${HEAD()}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
      ['identity alone, with Content-Length', `${HEAD()}Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\n{}${SMUGGLED}`],
      ['trailer with framing and credential fields', `${HEAD()}Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nTransfer-Encoding: chunked\r\nHost: evil\r\nPLAID-SECRET: attacker\r\n\r\n${SMUGGLED}`],
    ] as const) {
      await expect400Closed(bytes, label);
    }
  });

  it('SMUG-20 an HTTP/1.1 request without Host (RFC 9112 §3.2) → the proxy\'s own 400 (X-Request-Id, bad_request, audited); the request behind it is authorised on its own', async () => {
    // Node's own answer was a bare 400: no X-Request-Id, no error body, no audit line.
    const before = lab.u.requests.length;
    const pair = await rawExchange(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\n\r\n${SMUGGLED_A()}`);
    lab.seen(pair.data);
    expect(statuses(pair.data)).toEqual([400, 403]);
    expect(pair.data).toMatch(/^HTTP\/1\.1 400 [^]*?\r\nx-request-id: [0-9a-f-]{36}\r\n/i);
    neverSmuggled(before);
    expect(lab.u.requests.length).toBe(before);
    const { data } = await rawExchange(lab.port, `GET /plaid/institutions/x HTTP/1.1\r\nX-Egress-Token: ${lab.tokens.b}\r\n\r\n`);
    expect(data).toMatch(/\r\nx-egress-error: bad_request\r\n/i);
    expect(data).toContain('Host');
    const id = /\r\nx-request-id: ([0-9a-f-]{36})\r\n/i.exec(data)![1]!;
    // HTTP/1.0 needs no Host (control).
    const mark = lab.u.requests.length;
    const old = await rawExchange(lab.port, `GET /plaid/institutions/x HTTP/1.0\r\nX-Egress-Token: ${lab.tokens.b}\r\n\r\n`);
    lab.seen(old.data);
    expect(statuses(old.data)).toEqual([200]);
    expect(lab.u.requests.length - mark).toBe(1);
    await eventually(async () => (await readFile(join(lab.dir, 'audit.log'), 'utf8')).includes(id), 3_000, 'the refusal audited');
  });

  it('SMUG-19 content on GET, HEAD or TRACE (Content-Length or chunked) → 400, closed; it never rides to U on a pooled connection', async () => {
    // An upstream that ignores the content of a GET (CL.0, RFC 9110 §9.3.1) would read it as the
    // next request on a connection the proxy shares between callers: the prefix of a request that
    // swallows the next caller's credentials. So the content is refused, not forwarded.
    const get = (method: string) => `${method} /plaid/institutions/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.b}\r\n`;
    const prefix = 'GET /plaid/item/remove HTTP/1.1\r\nX-Ignore: ';
    for (const method of ['GET', 'HEAD', 'TRACE']) {
      await expect400Closed(`${get(method)}Content-Length: ${prefix.length}\r\n\r\n${prefix}`, `${method} with Content-Length`);
      await expect400Closed(`${get(method)}Transfer-Encoding: chunked\r\n\r\n${prefix.length.toString(16)}\r\n${prefix}\r\n0\r\n\r\n`, `${method} chunked`);
    }
    // An empty body is no body: Content-Length: 0 (or 00) on a GET is still served (control).
    for (const length of ['0', '00']) {
      const mark = lab.u.requests.length;
      const { data } = await rawExchange(lab.port, `${get('GET')}Content-Length: ${length}\r\nConnection: close\r\n\r\n`);
      expect(statuses(data), `Content-Length: ${length}`).toEqual([200]);
      expect(lab.u.requests.length - mark).toBe(1);
    }
  });
});

/**
 * After an answer that closes the connection, nothing pipelined behind it is processed (RFC 9112
 * §9.6), and bytes that do not parse behind a request still in flight do not take its answer's place.
 */
describe('SMUG: requests behind a closing answer', () => {
  let slow: Lab;
  beforeAll(async () => {
    slow = await startLab({
      upstream: (req, res) => {
        const answer = () => {
          res.writeHead(200, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ url: req.url }));
        };
        if (req.url === '/slow') setTimeout(answer, 500);
        else answer();
      },
      routes: (u) => ({
        any: `name: any\nprefix: /any\nupstream: ${u.url}\nallow_private_addresses: true\ncredential: plaid\ninject:\n  scheme: headers\n  headers:\n    PLAID-SECRET: "{secret}"\nmax_body: 64kb\nallow:\n  - caller: a\n    methods: [POST]\n    paths: [/**]\n`,
      }),
    });
  }, 30_000);
  afterAll(async () => {
    await slow?.close();
  });
  const A = () => `X-Egress-Token: ${slow.tokens.a}\r\n`;

  it('SMUG-11 after a 413 that closes the connection, a request pipelined behind the refused body never reaches U (with the upstream pool warm)', async () => {
    for (let i = 0; i < 3; i++) {
      // A warm pool: the pipelined request would otherwise lose the race to the close by itself.
      expect(statuses((await rawExchange(slow.port, `POST /any/warm HTTP/1.1\r\nHost: p\r\n${A()}Content-Length: 0\r\nConnection: close\r\n\r\n`)).data)).toEqual([200]);
      const mark = slow.u.requests.length;
      const { data, closed } = await rawExchange(slow.port, `POST /any/x HTTP/1.1\r\nHost: p\r\n${A()}Content-Length: 70000\r\n\r\n${'x'.repeat(70000)}POST /any/ghost HTTP/1.1\r\nHost: p\r\n${A()}Content-Length: 0\r\n\r\n`, 800);
      slow.seen(data);
      expect(statuses(data)).toEqual([413]);
      expect(closed).toBe(true);
      await new Promise((r) => setTimeout(r, 300));
      expect(slow.u.requests.slice(mark).map((r) => r.url)).toEqual([]);
    }
  });

  it('SMUG-11b after a request that asked to close (Connection: close, or HTTP/1.0), a pipelined one is not processed', async () => {
    for (const first of [`POST /any/one HTTP/1.1\r\nHost: p\r\n${A()}Content-Length: 0\r\nConnection: close\r\n\r\n`, `POST /any/one HTTP/1.0\r\nHost: p\r\n${A()}Content-Length: 0\r\n\r\n`]) {
      const mark = slow.u.requests.length;
      const { data, closed } = await rawExchange(slow.port, `${first}POST /any/two HTTP/1.1\r\nHost: p\r\n${A()}Content-Length: 0\r\n\r\n`, 800);
      slow.seen(data);
      expect(statuses(data)).toEqual([200]);
      expect(closed).toBe(true);
      await new Promise((r) => setTimeout(r, 200));
      expect(slow.u.requests.slice(mark).map((r) => r.url)).toEqual(['/one']);
    }
    await eventually(async () => (await readFile(join(slow.dir, 'audit.log'), 'utf8')).includes('"reason":"connection_closing"'), 2_000, 'the skipped request audited');
  });

  it('SMUG-13 bytes that do not parse behind a request in flight: its answer comes first, then the 400, then the close', async () => {
    for (const bad of ['POST /any/x HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n', 'GARBAGE\r\n\r\n', 'POST /any/x HTTP/1.1\nHost: p\n\n']) {
      const mark = slow.u.requests.length;
      const { data, closed } = await rawExchange(slow.port, `POST /any/slow HTTP/1.1\r\nHost: p\r\n${A()}Content-Length: 2\r\n\r\n{}${bad}`, 1_500);
      slow.seen(data);
      expect(slow.u.requests.slice(mark).map((r) => r.url), JSON.stringify(bad)).toEqual(['/slow']);
      expect(statuses(data), JSON.stringify(bad)).toEqual([200, 400]);
      expect(data).toContain('{"url":"/slow"}');
      expect(closed).toBe(true);
    }
  });

  it('SMUG-13b a protocol upgrade or a CONNECT behind a request in flight: its answer comes first, whole, then the refusal, then the close', async () => {
    const behind = {
      websocket: ['GET /any/ws HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n', 400],
      h2c: ['GET /any/h2 HTTP/1.1\r\nHost: p\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n', 400],
      // This lab has no CA: forward mode is off.
      connect: ['CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n', 403],
    } as const;
    for (const [label, [bytes, status]] of Object.entries(behind)) {
      const mark = slow.u.requests.length;
      const { data, closed } = await rawExchange(slow.port, `POST /any/slow HTTP/1.1\r\nHost: p\r\n${A()}Content-Length: 2\r\n\r\n{}${bytes}`, 1_500);
      slow.seen(data);
      expect(slow.u.requests.slice(mark).map((r) => r.url), label).toEqual(['/slow']);
      expect(statuses(data), label).toEqual([200, status]);
      expect(data, label).toMatch(/\{"url":"\/slow"\}(?:\r\n0\r\n\r\n)?HTTP\/1\.1 /);
      expect(closed, label).toBe(true);
    }
  });
});


/**
 * An upstream that answers before it has read the request body (route /early, a raw TCP server
 * that sends 401 as soon as a request head arrives): the caller's remaining body bytes are still
 * body, never a request of their own.
 */
describe('SMUG: an upstream that answers early', () => {
  let early: Lab;
  let server: Server;
  const sockets = new Set<Socket>();
  /** Request lines of the heads the raw upstream received. */
  const lines: string[] = [];
  beforeAll(async () => {
    server = createServer((socket) => {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => undefined);
      let head = '';
      const onData = (d: Buffer) => {
        head += d.toString('latin1');
        const end = head.indexOf('\r\n\r\n');
        if (end === -1) return;
        lines.push(head.slice(0, end).split('\r\n')[0]!);
        // Answer at once, then read (and discard) whatever else comes on this connection.
        socket.off('data', onData);
        socket.on('data', () => undefined);
        socket.write('HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope');
      };
      socket.on('data', onData);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as AddressInfo).port;
    early = await startLab({
      routes: () => ({
        early: `name: early\nprefix: /early\nupstream: http://127.0.0.1:${port}\nallow_private_addresses: true\ncredential: plaid\ninject:\n  scheme: headers\n  headers:\n    PLAID-SECRET: "{secret}"\ntimeouts: { connect: 2s, response: 3s }\nallow:\n  - caller: a\n    methods: [POST]\n    paths: [/**]\n`,
      }),
    });
  }, 30_000);
  afterAll(async () => {
    await early?.close();
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server?.close(() => r()));
  });

  it('SMUG-17 an upstream that answers while the chunked body is still arriving: the rest is framed as body, never a request', async () => {
    const conn = await RawConnection.open(early.port);
    const mark = early.u.requests.length;
    try {
      // A typed body: one with no Content-Type is a form to Rack, read whole before it goes (form-body.ts), and would not stream.
      const first = await conn.exchange(`POST /early/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${early.tokens.a}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n${'a'.repeat(1000)}\r\n`, 300);
      early.seen(first);
      expect(statuses(first)).toEqual([401]);
      // The rest of the body carries a request a may make (it would reach the raw upstream); then a's own next request.
      const embedded = `POST /early/embedded HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${early.tokens.a}\r\nContent-Length: 0\r\n\r\n`;
      const rest = await conn.exchange(`${embedded.length.toString(16)}\r\n${embedded}\r\n0\r\n\r\nPOST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${early.tokens.a}\r\nContent-Length: 2\r\n\r\n{}`, 400);
      early.seen(rest);
      // a's next request is answered on its own (or the proxy closed the connection); the embedded one never runs.
      if (rest) expect(statuses(rest)).toEqual([200]);
      else expect(conn.closed).toBe(true);
    } finally {
      conn.close();
    }
    expect(lines).toEqual(['POST /x HTTP/1.1']);
    expect(early.u.requests.slice(mark).map((r) => r.url)).toEqual(['/accounts/get']);
    await early.g0(mark, 1);
  });

  it('SMUG-17b the same with a Content-Length body: the early answer comes once the body is in, the rest of the body is never a request, and the caller\'s next request is answered', async () => {
    const conn = await RawConnection.open(early.port);
    const mark = early.u.requests.length;
    const before = lines.length;
    try {
      // Half the body: the upstream has answered already, the caller has not finished sending.
      const early401 = await conn.exchange(`POST /early/y HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${early.tokens.a}\r\nContent-Length: 2000\r\n\r\n${'a'.repeat(1000)}`, 300);
      // The second half of the body looks like a request a may make; then a's own next request.
      const embedded = `POST /early/embedded HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${early.tokens.a}\r\nContent-Length: 0\r\n\r\n`;
      const answers = await conn.exchange(`${embedded}${'b'.repeat(1000 - embedded.length)}POST /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${early.tokens.a}\r\nContent-Length: 2\r\n\r\n{}`, 600);
      early.seen(early401 + answers);
      expect(statuses(early401 + answers)).toEqual([401, 200]);
    } finally {
      conn.close();
    }
    expect(lines.slice(before)).toEqual(['POST /y HTTP/1.1']);
    expect(early.u.requests.slice(mark).map((r) => r.url)).toEqual(['/accounts/get']);
    await early.g0(mark, 1);
  });
});
