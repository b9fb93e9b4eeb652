import { createHmac, randomBytes } from 'node:crypto';
import { brotliCompressSync, deflateSync, gzipSync, zstdCompressSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { rawRequest, statuses } from '../helpers/raw.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * ENC: a request body under a Content-Encoding. Every step that reads a caller's body (the form
 * check, json_body, strip_body_fields, snaptrade, kraken) reads the bytes as they arrive; an
 * upstream (or a front proxy before it) may inflate them first. So a step that must read the body
 * refuses one under any coding but identity, before anything is sent; a body no step reads goes
 * through byte for byte with its Content-Encoding.
 */
let upstream: Upstream;
let proxy: TestProxy;

const SECRET = 'plaid-secret-ENC-CANARY';

function route(name: string, inject: string, extra = ''): string {
  return `name: ${name}\nprefix: /${name}\nupstream: ${upstream.url}\nallow_private_addresses: true\ncredential: ${name}\n${extra}inject:\n${inject}\nallow:\n  - caller: svc\n    methods: [GET, POST, DELETE]\n    paths: ["/**"]\n`;
}

beforeAll(async () => {
  upstream = await startUpstream();
  proxy = await startTestProxy({
    routes: {
      hdr: route('hdr', '  scheme: headers\n  headers:\n    X-Key: "{secret}"'),
      json: route('json', '  scheme: json_body\n  fields:\n    secret: "{secret}"'),
      strip: route('strip', '  scheme: headers\n  headers:\n    X-Key: "{secret}"', 'strip_body_fields: [secret]\n'),
      snap: route('snap', '  scheme: snaptrade'),
      kraken: route('kraken', '  scheme: kraken'),
      hmac: route('hmac', '  scheme: hmac\n  key: "{secret}"\n  string_to_sign: [body]\n  into: {header: X-Sig}'),
    },
    credentials: {
      hdr: { secret: SECRET },
      json: { secret: SECRET },
      strip: { secret: SECRET },
      hmac: { secret: SECRET },
      snap: { client_id: 'SNAP-ENC', consumer_key: 'snap-consumer-ENC-CANARY' },
      kraken: { api_key: 'kraken-ENC', api_secret: randomBytes(64).toString('base64') },
    },
    callers: ['svc'],
  });
}, 30_000);

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

function post(path: string, type: string, encoding: string | undefined, body: Buffer | string, method = 'POST'): Promise<Response> {
  const headers: Record<string, string> = { 'x-egress-token': proxy.tokens.svc!, 'content-type': type };
  if (encoding !== undefined) headers['content-encoding'] = encoding;
  return fetch(`${proxy.url}${path}`, { method, headers, body });
}

/** A raw request from svc with these header lines and body, on its own connection. */
async function raw(path: string, lines: readonly string[], body = '', method = 'POST'): Promise<string> {
  const framing = body ? [`Content-Length: ${Buffer.byteLength(body, 'latin1')}`] : [];
  return rawRequest(Number(new URL(proxy.url).port), [`${method} ${path} HTTP/1.1`, 'Host: p', `X-Egress-Token: ${proxy.tokens.svc}`, ...lines, ...framing, 'Connection: close', '', body].join('\r\n'));
}

async function expectRefused(res: Response, coding: RegExp, what: string): Promise<string> {
  const text = await res.text();
  expect(res.status, `${what}: ${text}`).toBe(400);
  expect(res.headers.get('x-egress-error'), what).toBe('bad_request');
  expect(text, what).toMatch(/Content-Encoding/);
  expect(text, what).toMatch(coding);
  expect(text, what).not.toContain(SECRET);
  return text;
}

const FORM = 'application/x-www-form-urlencoded';

describe('ENC: request bodies under a Content-Encoding', () => {
  it('ENC-01 a compressed form body carrying _method is refused with 400 naming the coding, nothing sent (an upstream that inflates it would run DELETE)', async () => {
    const before = upstream.requests.length;
    const form = Buffer.from('a=1&_method=DELETE');
    for (const [coding, body] of [['gzip', gzipSync(form)], ['deflate', deflateSync(form)], ['br', brotliCompressSync(form)], ['zstd', zstdCompressSync(form)], ['GZip', gzipSync(form)], ['x-gzip', gzipSync(form)]] as const) {
      await expectRefused(await post('/hdr/x', FORM, coding, body), new RegExp(coding.toLowerCase()), coding);
    }
    // Multipart, and a POST with no Content-Type (Rack reads it as a form).
    const multipart = gzipSync('--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n');
    await expectRefused(await post('/hdr/x', 'multipart/form-data; boundary=b', 'gzip', multipart), /gzip/, 'multipart');
    const untyped = await raw('/hdr/x', ['Content-Encoding: gzip'], gzipSync(form).toString('latin1'));
    expect(statuses(untyped)).toEqual([400]);
    expect(untyped).toMatch(/Content-Encoding/);
    expect(upstream.requests.length - before, 'nothing reached the upstream').toBe(0);
  });

  it('ENC-02 stacked, unknown, repeated and underscore-spelled codings are refused where a form is read; identity in any spelling is read as no coding', async () => {
    const before = upstream.requests.length;
    const form = 'a=1&b=2';
    // Stacked with identity, unknown (the body is plain, but an upstream may know the coding), and a line that is no coding at all.
    for (const coding of ['gzip, identity', 'identity, gzip', 'identity,,br', 'x-custom', 'aes128gcm', '???']) {
      await expectRefused(await post('/hdr/x', FORM, coding, coding.includes('gzip') ? gzipSync(form) : Buffer.from(form)), /Content-Encoding/, coding);
    }
    // Sent twice (Node joins the lines; an upstream may read either), or spelled Content_Encoding (HTTP_CONTENT_ENCODING to CGI and WSGI).
    for (const lines of [['Content-Encoding: identity', 'Content-Encoding: gzip'], ['Content-Encoding: gzip', 'Content-Encoding: identity'], ['Content_Encoding: gzip']]) {
      const got = await raw('/hdr/x', [`Content-Type: ${FORM}`, ...lines], gzipSync(form).toString('latin1'));
      expect(statuses(got), lines.join(' | ')).toEqual([400]);
      expect(got, lines.join(' | ')).toMatch(/gzip/);
    }
    // Refused before the caller is invited to send its body.
    const waiting = await raw('/hdr/x', [`Content-Type: ${FORM}`, 'Content-Encoding: gzip', 'Content-Length: 20', 'Expect: 100-continue']);
    expect(statuses(waiting)).toEqual([400]);
    expect(upstream.requests.length - before, 'nothing reached the upstream').toBe(0);

    for (const coding of ['identity', ' IDENTITY ', 'identity, Identity', '']) {
      const res = await post('/hdr/x', FORM, coding, form);
      expect(res.status, `${JSON.stringify(coding)}: ${await res.text()}`).toBe(200);
      expect(upstream.requests.at(-1)!.body.toString(), coding).toBe(form);
    }
    // identity does not hide a form field.
    await expect(post('/hdr/x', FORM, 'identity', '_method=DELETE').then((r) => r.status)).resolves.toBe(400);
  });

  it('ENC-03 json_body refuses a compressed body with 400 naming the coding (not "not UTF-8"), and a plain body labelled gzip (the merged JSON would go out labelled gzip)', async () => {
    const before = upstream.requests.length;
    const json = Buffer.from('{"secret":"mine","account":"acc-1"}');
    await expectRefused(await post('/json/x', 'application/json', 'gzip', gzipSync(json)), /gzip/, 'gzip body');
    await expectRefused(await post('/json/x', 'application/json', 'gzip', json), /gzip/, 'plain body labelled gzip');
    await expectRefused(await post('/json/x', 'application/json', 'br', brotliCompressSync(json)), /\bbr\b/, 'br');
    // No body: json_body writes one, which must not go out under the caller's coding.
    const empty = await raw('/json/x', ['Content-Type: application/json', 'Content-Encoding: gzip', 'Content-Length: 0']);
    expect(statuses(empty)).toEqual([400]);
    expect(upstream.requests.length - before).toBe(0);
    const ok = await post('/json/x', 'application/json', 'identity', json);
    expect(ok.status).toBe(200);
    expect(JSON.parse(upstream.requests.at(-1)!.body.toString())).toEqual({ account: 'acc-1', secret: SECRET });
  });

  it('ENC-04 strip_body_fields refuses a compressed body it cannot look into, instead of sending the caller\'s copy of the field unseen', async () => {
    const before = upstream.requests.length;
    await expectRefused(await post('/strip/x', 'application/json', 'gzip', gzipSync('{"secret":"mine"}')), /gzip/, 'strip');
    await expectRefused(await post('/strip/x', 'application/json', 'deflate', deflateSync('{"secret":"mine"}')), /deflate/, 'strip');
    expect(upstream.requests.length - before).toBe(0);
    expect((await post('/strip/x', 'application/json', 'identity', '{"secret":"mine","a":1}')).status).toBe(200);
    expect(upstream.requests.at(-1)!.body.toString()).toBe('{"a":1}');
  });

  it('ENC-05 snaptrade and kraken refuse a compressed body with 400 naming the coding, not a "not UTF-8" message or a nonce appended to compressed bytes', async () => {
    const before = upstream.requests.length;
    const snap = await expectRefused(await post('/snap/trade?userId=u', 'application/json', 'gzip', gzipSync('{"units":1}')), /gzip/, 'snaptrade');
    expect(snap).not.toMatch(/UTF-8|not JSON/);
    await expectRefused(await post('/kraken/0/private/Balance', FORM, 'gzip', gzipSync('asset=XBT')), /gzip/, 'kraken');
    expect(upstream.requests.length - before).toBe(0);
    // A GET names a Content-Encoding but sends no body: nothing is read, it goes as before.
    const get = await raw('/snap/accounts?userId=u', ['Content-Encoding: gzip'], '', 'GET');
    expect(statuses(get)).toEqual([200]);
    expect((await post('/snap/trade?userId=u', 'application/json', 'identity', '{"units":1}')).status).toBe(200);
  });

  it('ENC-06 a body no step reads (JSON to a headers route, a body hmac signs as sent) goes through byte for byte with its Content-Encoding; a GET naming one is forwarded as it was', async () => {
    const before = upstream.requests.length;
    const json = gzipSync('{"_method":"DELETE","secret":"mine"}');
    for (const [type, coding] of [['application/json', 'gzip'], ['application/octet-stream', 'br'], ['text/plain', 'gzip, identity'], ['application/json', 'x-custom']] as const) {
      const res = await post('/hdr/x', type, coding, json);
      expect(res.status, `${type} ${coding}`).toBe(200);
      await res.text();
      const sent = upstream.requests.at(-1)!;
      expect(sent.body.equals(json), `${type} ${coding}`).toBe(true);
      expect(sent.headers['content-encoding']).toBe(coding);
    }
    const get = await raw('/hdr/x', ['Content-Encoding: gzip'], '', 'GET');
    expect(statuses(get)).toEqual([200]);
    expect(upstream.requests.at(-1)!.headers['content-encoding']).toBe('gzip');
    // A signer over the bytes as sent signs the compressed bytes, and they go as signed.
    const res = await post('/hmac/x', 'application/json', 'gzip', json);
    expect(res.status).toBe(200);
    const signed = upstream.requests.at(-1)!;
    expect(signed.body.equals(json)).toBe(true);
    expect(signed.headers['content-encoding']).toBe('gzip');
    expect(signed.headers['x-sig']).toBe(createHmac('sha256', SECRET).update(json).digest('hex'));
    expect(upstream.requests.length - before).toBe(6);
  });
});
