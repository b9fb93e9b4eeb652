import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually, startTestProxy } from '../helpers/proxy.ts';
import { startUpstream } from '../helpers/upstream.ts';
import { asA, rawRequest, startLab, statuses, type Lab } from './lab.ts';

/**
 * ROUTE: the allowlist authorises exactly the bytes that are forwarded. Caller a may only
 * POST /plaid/transactions/get and /plaid/accounts/get. A second route, /plaid-admin, points at E
 * and names no rule for a, so anything that reaches E through it is a bypass.
 */
let lab: Lab;

beforeAll(async () => {
  lab = await startLab({
    routes: (u, e) => ({
      // Wildcard rules: a dot segment that a pattern would match must still never be forwarded.
      wild: `name: wild
prefix: /wild
upstream: ${u.url}/base
allow_private_addresses: true
credential: plaid
inject:
  scheme: headers
  headers:
    X-K: "{secret}"
allow:
  - caller: a
    methods: [GET]
    paths: [/items/*, /files/**]
`,
      'plaid-admin': `name: plaid-admin
prefix: /plaid-admin
upstream: ${e.url}
allow_private_addresses: true
credential: plaid
inject:
  scheme: headers
  headers:
    X-Admin: "{client_id}"
allow:
  - caller: b
    methods: [GET]
    paths: [/only-b]
`,
    }),
  });
}, 30_000);

afterAll(async () => {
  await lab?.close();
});

/** One raw request from caller a on its own connection; the status codes it got. */
async function send(target: string, method = 'POST', extra: string[] = [], token = lab.tokens.a): Promise<number[]> {
  // GET, HEAD and TRACE carry no content (content on them is refused: SMUG-19).
  const body = ['GET', 'HEAD', 'TRACE'].includes(method) ? [] : ['Content-Type: application/json', 'Content-Length: 2'];
  const lines = [`${method} ${target} HTTP/1.1`, 'Host: p', `X-Egress-Token: ${token}`, ...body, ...extra, 'Connection: close', '', body.length ? '{}' : ''];
  const raw = await rawRequest(lab.port, lines.join('\r\n'));
  lab.seen(raw);
  return statuses(raw);
}

async function refused(targets: readonly string[], allowed: readonly number[], method = 'POST'): Promise<void> {
  for (const t of targets) {
    const got = await send(t, method);
    expect(got.length, t).toBe(1);
    expect(allowed, `${method} ${t} -> ${got[0]}`).toContain(got[0]);
  }
}

describe('ROUTE: allowlist and paths', () => {
  it('ROUTE-00 the allowed request is forwarded with exactly the matched path (control)', async () => {
    const mark = lab.u.requests.length;
    expect(await send('/plaid/accounts/get')).toEqual([200]);
    expect(lab.u.requests.at(-1)!.url).toBe('/accounts/get');
    expect(lab.u.requests.at(-1)!.method).toBe('POST');
    await lab.g0(mark, 1);
  });

  it('ROUTE-01 prefix confusion: matched on whole segments', async () => {
    const mark = lab.u.requests.length;
    await refused(['/plaidx/transactions/get', '/plaidaccounts/get', '/plaid_/accounts/get', '/plaid.json/accounts/get', '/plaid;x/accounts/get', '/plaid-admin/x', '/plaid-admin/only-b', '/plaid-admin/accounts/get'], [403, 404]);
    await lab.g0(mark, 0);
    expect(lab.e.requests).toHaveLength(0);
  });

  it('ROUTE-01b path confusion inside the route: suffixes, extra segments, trailing slash, bare prefix', async () => {
    const mark = lab.u.requests.length;
    await refused(['/plaid/accounts/getx', '/plaid/accounts/get/x', '/plaid/accounts/get/', '/plaid/accounts', '/plaid/', '/plaid', '/plaid/accounts/get.json', '/plaid/xaccounts/get', '/plaid/accounts/ge'], [400, 403, 404]);
    await lab.g0(mark, 0);
  });

  it('ROUTE-02 raw dot segments → 400', async () => {
    const mark = lab.u.requests.length;
    await refused(['/plaid/accounts/get/../../item/remove', '/plaid/accounts/../item/remove', '/plaid/./item/remove', '/plaid/accounts/get/..', '/plaid/..', '/plaid-admin/../plaid/accounts/get', '/plaid/../plaid-admin/x'], [400]);
    await lab.g0(mark, 0);
    expect(lab.e.requests).toHaveLength(0);
  });

  it('ROUTE-03 encoded dots → 400 (%2e%2e, .%2E, %2E., %2e)', async () => {
    const mark = lab.u.requests.length;
    await refused([
      '/plaid/accounts/get/%2e%2e/%2e%2e/item/remove',
      '/plaid/accounts/get/.%2E/.%2e/item/remove',
      '/plaid/accounts/get/%2E./%2e./item/remove',
      '/plaid/%2e/item/remove',
      '/plaid/%2E%2E/plaid-admin/x',
      '/plaid-admin/%2e%2e/plaid/accounts/get',
    ], [400]);
    await lab.g0(mark, 0);
    expect(lab.e.requests).toHaveLength(0);
  });

  it('ROUTE-03b dot look-alikes (overlong UTF-8, fullwidth, %u) are not dots and match nothing', async () => {
    const mark = lab.u.requests.length;
    await refused(['/plaid/accounts/get/%c0%ae%c0%ae/item/remove', '/plaid/accounts/get/%ef%bc%8e%ef%bc%8e/item/remove', '/plaid/accounts/get/%u002e%u002e/item', '/plaid/accounts/get/%e0%80%ae%e0%80%ae/x'], [400, 403, 404]);
    await lab.g0(mark, 0);
  });

  it('ROUTE-04 encoded slash, backslash, NUL, CR/LF, tab and malformed escapes → 400', async () => {
    const mark = lab.u.requests.length;
    await refused([
      '/plaid/accounts%2fget', '/plaid/accounts%2Fget', '/plaid%2faccounts/get', '/plaid/accounts%5cget', '/plaid/accounts%5Cget',
      '/plaid/accounts/get%00', '/plaid/accounts/get%0d%0aX-Injected:%201', '/plaid/accounts/get%09', '/plaid/accounts/get%7f',
      '/plaid/accounts/get%', '/plaid/accounts/get%zz', '/plaid/accounts/get%2', '/plaid//accounts/get', '/plaid/accounts//get',
      '/plaid/accounts/get#x', '/plaid\\accounts\\get', '/plaid/accounts/get?x=%00',
    ], [400]);
    await lab.g0(mark, 0);
  });

  it('ROUTE-05 double encoding: no second decode; refused or sent exactly as matched', async () => {
    const mark = lab.u.requests.length;
    await refused(['/plaid/accounts/get/%252e%252e%252fitem', '/plaid/accounts%252fget', '/plaid/%252e%252e/plaid-admin/x', '/plaid/%2561ccounts/get', '/pl%2561id/accounts/get'], [400, 403, 404]);
    await lab.g0(mark, 0);
    // In the query, encodings pass through untouched and do not change the path.
    const m2 = lab.u.requests.length;
    expect(await send('/plaid/accounts/get?x=%252e%252e%252f&y=../../item/remove')).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(r.url).toBe('/accounts/get?x=%252e%252e%252f&y=../../item/remove');
    await lab.g0(m2, 1);
  });

  it('ROUTE-07 semicolons and matrix parameters: 400 or no match', async () => {
    const mark = lab.u.requests.length;
    await refused(['/plaid;x/../item/remove', '/plaid/accounts/get;/../../item/remove', '/plaid/accounts;x/../item/remove'], [400]);
    await refused(['/plaid/transactions/get;.json', '/plaid/accounts/get;', '/plaid/accounts;/get', '/plaid;/accounts/get', '/plaid/accounts/get;jsessionid=1', '/plaid/accounts/get%3b.json'], [400, 403, 404]);
    await lab.g0(mark, 0);
  });

  it('ROUTE-07b dot segments with path parameters (..; .; ..;x ..%3B), which Java servers resolve after dropping the parameters, → 400 even where a wildcard would match', async () => {
    const mark = lab.u.requests.length;
    expect(await send('/wild/files/x/y', 'GET')).toEqual([200]);
    expect(lab.u.requests.at(-1)!.url).toBe('/base/files/x/y');
    await refused(['/wild/items/..;', '/wild/items/.;', '/wild/files/x/..;/..;/..;/admin', '/wild/files/%2e%2e;/admin', '/wild/files/..;x/admin', '/wild/files/.;x/a', '/wild/files/..%3B/admin', '/wild/files/%2E.%3bx/admin'], [400], 'GET');
    // Not dot segments: a dot-led name with parameters is an ordinary segment.
    expect(await send('/wild/files/..x;y', 'GET')).toEqual([200]);
    await lab.g0(mark, 2);
  });

  it('ROUTE-02b dot segments are refused even where a * or ** rule would match them', async () => {
    const mark = lab.u.requests.length;
    await refused(['/wild/items/..', '/wild/items/.', '/wild/items/%2e%2e', '/wild/items/%2E', '/wild/items/.%2e', '/wild/files/x/..', '/wild/files/x/../../../plaid/accounts/get', '/wild/files/%2e%2e/%2e%2e/plaid/accounts/get', '/wild/files/x/./y', '/wild/files/x/.'], [400], 'GET');
    expect(lab.u.requests.length - mark).toBe(0);
    await lab.g0(mark, 0);
  });

  it('ROUTE-04b * never matches an empty, encoded-slash or control segment; ** refuses interior empty segments', async () => {
    const mark = lab.u.requests.length;
    await refused(['/wild/items//', '/wild/items/%2f', '/wild/items/%5C', '/wild/items/%00', '/wild/items/%09', '/wild/files//x', '/wild/files/x//y'], [400], 'GET');
    // An empty last segment is not a name for *, and ** does not match the bare folder.
    expect(await send('/wild/items/', 'GET')).toEqual([403]);
    expect(await send('/wild/files', 'GET')).toEqual([403]);
    expect(lab.u.requests.length - mark).toBe(0);
    await lab.g0(mark, 0);
  });

  it('ROUTE-04c ** is one or more named segments: the bare folder with a trailing slash (/files/, which most servers treat as /files) is not under it', async () => {
    const mark = lab.u.requests.length;
    expect(await send('/wild/files/', 'GET')).toEqual([403]);
    expect(await send('/wild/files/?x=1', 'GET')).toEqual([403]);
    expect(lab.u.requests.length - mark).toBe(0);
    // Control: a named segment, with or without its own trailing slash, is under it.
    expect(await send('/wild/files/x', 'GET')).toEqual([200]);
    expect(await send('/wild/files/x/', 'GET')).toEqual([200]);
    expect(lab.u.requests.slice(mark).map((r) => r.url)).toEqual(['/base/files/x', '/base/files/x/']);
    await lab.g0(mark, 2);
  });

  it('ROUTE-09 methods: GET/HEAD/OPTIONS/TRACE/PROPFIND/DELETE/PUT/PATCH on a POST route → 403/405', async () => {
    const mark = lab.u.requests.length;
    for (const method of ['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PROPFIND', 'DELETE', 'PUT', 'PATCH', 'MKCOL', 'SEARCH']) {
      const raw = await rawRequest(lab.port, `${method} /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      lab.seen(raw);
      const got = statuses(raw);
      expect(got.length, method).toBe(1);
      expect([400, 403, 405], `${method} -> ${got[0]}`).toContain(got[0]);
    }
    await lab.g0(mark, 0);
  });

  it('ROUTE-09b lower-case and odd method spellings are not POST', async () => {
    const mark = lab.u.requests.length;
    for (const method of ['post', 'Post', 'POSTX', 'P0ST', 'PO ST']) {
      const raw = await rawRequest(lab.port, `${method} /plaid/accounts/get HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${lab.tokens.a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      lab.seen(raw);
      const got = statuses(raw);
      // Node's parser may just close the connection on an unknown method; otherwise 400/403/405.
      for (const s of got) expect([400, 403, 405], `${JSON.stringify(method)} -> ${s}`).toContain(s);
    }
    await lab.g0(mark, 0);
  });

  it('ROUTE-09d HEAD on GET-only rules (literal, * and **) is refused; nothing reaches U', async () => {
    const mark = lab.u.requests.length;
    expect(await send('/plaid/institutions/x', 'HEAD', [], lab.tokens.b)).toEqual([403]);
    expect(await send('/wild/items/x', 'HEAD')).toEqual([403]);
    expect(await send('/wild/files/x/y', 'HEAD')).toEqual([403]);
    expect(lab.u.requests.length - mark).toBe(0);
    // Control: the GET itself is allowed.
    expect(await send('/plaid/institutions/x', 'GET', [], lab.tokens.b)).toEqual([200]);
    await lab.g0(mark, 1);
  });

  it('ROUTE-09c method-override headers cannot change the method, and are stripped before U', async () => {
    const mark = lab.u.requests.length;
    // GET + override to POST: still a GET, still refused.
    expect(await send('/plaid/accounts/get', 'GET', ['X-HTTP-Method-Override: POST', 'X-HTTP-Method: POST', 'X-Method-Override: POST'])).toEqual([403]);
    expect(lab.u.requests.length - mark).toBe(0);
    // POST + override to DELETE: forwarded as a POST without the override headers.
    expect(await send('/plaid/accounts/get', 'POST', ['X-HTTP-Method-Override: DELETE', 'X-HTTP-Method: DELETE', 'X-Method-Override: DELETE'])).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(r.method).toBe('POST');
    for (const name of ['x-http-method-override', 'x-http-method', 'x-method-override']) expect(r.headers[name], name).toBeUndefined();
    expect(JSON.stringify(r.rawHeaders)).not.toContain('DELETE');
    await lab.g0(mark, 1);
  });

  it('ROUTE-09e a method-override query parameter (_method, as Laravel, Symfony and Rails read it) is removed before U, in any spelling', async () => {
    const mark = lab.u.requests.length;
    for (const query of ['_method=DELETE', '_METHOD=delete', '_method%5B%5D=DELETE', 'x=1;_method=DELETE', '%5Fmethod=DELETE']) {
      expect(await send(`/plaid/accounts/get?keep=1&${query}`), query).toEqual([200]);
      const r = lab.u.requests.at(-1)!;
      expect(r.method, query).toBe('POST');
      expect(r.url, query).toBe('/accounts/get?keep=1');
    }
    await lab.g0(mark, 5);
  });

  it('ROUTE-09f a method-override query parameter spelled as PHP (Laravel, Symfony) reads it into _method is removed before U', async () => {
    // PHP names $_GET entries after dropping leading spaces and turning "." and " " into "_", so
    // ".method", "+_method" and "%2Emethod" are all _method to a Laravel or Symfony upstream.
    const mark = lab.u.requests.length;
    const spellings = ['.method=DELETE', '%2Emethod=DELETE', '+_method=DELETE', '%20.METHOD=DELETE', '.method%5B%5D=DELETE'];
    for (const query of spellings) {
      expect(await send(`/plaid/accounts/get?keep=1&${query}`), query).toEqual([200]);
      expect(lab.u.requests.at(-1)!.url, query).toBe('/accounts/get?keep=1');
    }
    // Names PHP keeps apart stay as sent.
    expect(await send('/plaid/accounts/get?method=x&x_method=y&_methods=z')).toEqual([200]);
    expect(lab.u.requests.at(-1)!.url).toBe('/accounts/get?method=x&x_method=y&_methods=z');
    await lab.g0(mark, spellings.length + 1);
  });

  it('ROUTE-09g a method-override field in a form body (urlencoded or multipart, any spelling the query check removes) is refused with 400 naming the field; nothing reaches U; audited', async () => {
    // Rack::MethodOverride reads _method from a POST's form params (multipart too), Laravel and
    // Symfony from $_POST: a caller allowed to POST would have the upstream run a DELETE.
    const mark = lab.u.requests.length;
    const boundary = 'b0und-ary';
    const multipart = (disposition: string) => `--${boundary}\r\nContent-Disposition: ${disposition}\r\n\r\nDELETE\r\n--${boundary}--\r\n`;
    const cases: [string, string][] = [
      ['application/x-www-form-urlencoded', 'a=1&_method=DELETE'],
      ['application/x-www-form-urlencoded; charset=UTF-8', '.method=DELETE'],
      ['Application/X-WWW-Form-Urlencoded', '%5Fmethod=DELETE&b=2'],
      ['application/x-www-form-urlencoded', '_METHOD=delete'],
      ['application/x-www-form-urlencoded', '+_method%5B%5D=DELETE'],
      [`multipart/form-data; boundary=${boundary}`, multipart('form-data; name="_method"')],
      [`multipart/form-data; boundary="${boundary}"`, multipart('form-data; name=.method')],
      [`multipart/form-data; charset=utf-8; Boundary=${boundary}`, multipart("form-data; name*=UTF-8''%5Fmethod")],
      // Rack parses multipart/mixed and multipart/related into form params too; PHP accepts bare LF.
      [`multipart/mixed; boundary=${boundary}`, multipart('form-data; name="x"; filename="a"').replace('name="x"', 'name="_method"')],
      [`multipart/form-data; boundary=${boundary}`, `--${boundary}\nContent-Disposition: form-data; name="_method"\n\nDELETE\n--${boundary}--\n`],
    ];
    for (const [type, body] of cases) {
      const res = await fetch(`${lab.url}/plaid/accounts/get`, { method: 'POST', headers: asA(lab, { 'content-type': type }), body });
      const text = await res.text();
      lab.seen(text);
      expect(res.status, `${type} ${body}`).toBe(400);
      expect(res.headers.get('x-egress-error')).toBe('bad_request');
      expect(text, body).toContain('_method');
      expect(text, body).not.toMatch(/DELETE|delete/);
    }
    // A POST with no Content-Type: Rack parses its body as a form.
    const untyped = await rawRequest(lab.port, ['POST /plaid/accounts/get HTTP/1.1', 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, 'Content-Length: 14', 'Connection: close', '', '_method=DELETE'].join('\r\n'));
    lab.seen(untyped);
    expect(statuses(untyped)).toEqual([400]);
    // A second Content-Type line (or one spelled Content_Type, CONTENT_TYPE to CGI and PHP) that makes it a form: Node keeps the first, an upstream may take the other.
    for (const second of ['Content-Type', 'Content_Type']) {
      const twice = await rawRequest(lab.port, ['POST /plaid/accounts/get HTTP/1.1', 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, 'Content-Type: application/json', `${second}: application/x-www-form-urlencoded`, 'Content-Length: 14', 'Connection: close', '', '_method=DELETE'].join('\r\n'));
      lab.seen(twice);
      expect(statuses(twice), second).toEqual([400]);
    }
    // The same body sent chunked (no declared length) is read whole before anything goes.
    const chunked = await rawRequest(lab.port, ['POST /plaid/accounts/get HTTP/1.1', 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, 'Content-Type: application/x-www-form-urlencoded', 'Transfer-Encoding: chunked', 'Connection: close', '', '5', 'a=1&_', 'E', 'method=DELETE&', '0', '', ''].join('\r\n'));
    lab.seen(chunked);
    expect(statuses(chunked)).toEqual([400]);
    expect(lab.u.requests.length - mark, 'nothing reached U').toBe(0);
    await eventually(async () => ((await readFile(join(lab.dir, 'audit.log'), 'utf8')).match(/"path":"\/plaid\/accounts\/get","decision":"deny","reason":"bad_request"/g) ?? []).length >= cases.length + 4, 3_000, 'each refusal audited');
    await lab.g0(mark, 0);
  });

  it('ROUTE-09h form bodies without an override are forwarded byte for byte; other types, JSON mentioning _method and a malformed multipart are untouched; a form body over max_body is 413', async () => {
    const mark = lab.u.requests.length;
    const post = (type: string, body: string | Buffer) => fetch(`${lab.url}/plaid/accounts/get`, { method: 'POST', headers: asA(lab, { 'content-type': type }), body });
    // Stripe-style nested keys, and names PHP keeps apart from _method.
    const stripe = 'amount=2000&currency=usd&metadata[order_id]=1&metadata%5Bnote%5D=a%26b&method=card&x_method=y&_methods=z';
    for (const [type, body] of [
      ['application/x-www-form-urlencoded', stripe],
      ['application/json', '{"_method":"DELETE","note":"_method=DELETE"}'],
      ['text/plain', '_method=DELETE'],
      // No boundary: not a multipart body anything parses; passed on as before.
      ['multipart/form-data', '--x\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--x--\r\n'],
      ['multipart/form-data; boundary=zz', '--zz\r\nContent-Disposition: form-data; name="note"\r\n\r\n_method=DELETE\r\n--zz--\r\n'],
    ] as const) {
      const res = await post(type, body);
      await res.text();
      expect(res.status, type).toBe(200);
      const r = lab.u.requests.at(-1)!;
      expect(r.method).toBe('POST');
      expect(r.body.toString('latin1'), type).toBe(body);
    }
    // max_body is 64kb: a form body one byte over it is 413 declared, and 413 chunked.
    const big = `a=${'x'.repeat(64 * 1024 - 1)}`;
    expect((await post('application/x-www-form-urlencoded', big)).status).toBe(413);
    const chunked = await rawRequest(lab.port, ['POST /plaid/accounts/get HTTP/1.1', 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, 'Content-Type: application/x-www-form-urlencoded', 'Transfer-Encoding: chunked', 'Connection: close', '', (big.length).toString(16), big, '0', '', ''].join('\r\n'));
    expect(statuses(chunked)).toEqual([413]);
    await lab.g0(mark, 5);
  });

  it('ROUTE-11 case: matching is case-sensitive', async () => {
    const mark = lab.u.requests.length;
    await refused(['/PLAID/Transactions/get', '/Plaid/accounts/get', '/plaid/Accounts/get', '/plaid/ACCOUNTS/GET', '/plaid/accounts/Get', '/pl%41id/accounts/get'], [403, 404]);
    await lab.g0(mark, 0);
  });

  it('ROUTE-13 absolute-form and other non-origin targets on the reverse port → 400; no connection to the named host', async () => {
    const mark = lab.u.requests.length;
    const e = `127.0.0.1:${lab.e.port}`;
    await refused([
      'http://evil.example/plaid/accounts/get',
      'https://evil.example/plaid/accounts/get',
      `http://${e}/plaid/accounts/get`,
      `http://${e}/plaid-admin/only-b`,
      'http://169.254.169.254/latest/meta-data/',
      `HTTP://${e}/plaid/accounts/get`,
      '//evil.example/plaid/accounts/get',
      'evil.example/plaid/accounts/get',
      '*',
      'plaid/accounts/get',
    ], [400]);
    await lab.g0(mark, 0);
    expect(lab.e.requests).toHaveLength(0);
  });

  it('ROUTE-13b CONNECT on the reverse listener (forward mode off) is refused; E gets nothing', async () => {
    const mark = lab.u.requests.length;
    const e = `127.0.0.1:${lab.e.port}`;
    const raw = await rawRequest(lab.port, `CONNECT ${e} HTTP/1.1\r\nHost: ${e}\r\nProxy-Authorization: Bearer ${lab.tokens.a}\r\nX-Egress-Token: ${lab.tokens.a}\r\n\r\nGET /plaid-admin/only-b HTTP/1.1\r\nHost: ${e}\r\n\r\n`);
    lab.seen(raw);
    const got = statuses(raw);
    expect(got.length).toBeGreaterThanOrEqual(1);
    expect(got[0]).not.toBe(200);
    expect([400, 403, 404, 405, 407]).toContain(got[0]);
    await lab.g0(mark, 0);
    expect(lab.e.requests).toHaveLength(0);
  });

  it('ROUTE-13c the caller\'s Host header never chooses the upstream', async () => {
    const mark = lab.u.requests.length;
    const e = `127.0.0.1:${lab.e.port}`;
    for (const host of [e, 'evil.example', '169.254.169.254']) {
      const raw = await rawRequest(lab.port, `POST /plaid/accounts/get HTTP/1.1\r\nHost: ${host}\r\nX-Egress-Token: ${lab.tokens.a}\r\nX-Forwarded-Host: ${e}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      lab.seen(raw);
      expect(statuses(raw)).toEqual([200]);
      expect(lab.u.requests.at(-1)!.headers.host).toBe(`127.0.0.1:${lab.u.port}`);
      expect(lab.u.requests.at(-1)!.headers['x-forwarded-host']).toBeUndefined();
    }
    expect(lab.e.requests).toHaveLength(0);
    await lab.g0(mark, 3);
  });

  it('ROUTE-15 encoded prefix or path: decoded then matched, and forwarded canonically', async () => {
    const mark = lab.u.requests.length;
    for (const target of ['/pl%61id/accounts/get', '/plaid/%61ccounts/get', '/%70%6C%61%69%64/%61%63%63%6f%75%6e%74%73/%67%65%74']) {
      const got = await send(target);
      expect(got.length, target).toBe(1);
      expect([200, 404], `${target} -> ${got[0]}`).toContain(got[0]);
      if (got[0] === 200) expect(lab.u.requests.at(-1)!.url, target).toBe('/accounts/get');
    }
    await lab.g0(mark, 3);
    // The encoded form of a forbidden path stays forbidden.
    const m2 = lab.u.requests.length;
    await refused(['/pl%61id/item/remove', '/plaid/%69tem/remove', '/pl%61id-admin/x', '/plaid%2dadmin/only-b'], [403, 404]);
    await lab.g0(m2, 0);
    expect(lab.e.requests).toHaveLength(0);
  });

  it('ROUTE-17 request-target length: 8 KiB is served, longer is 400, past the header limit 431; nothing partial reaches U', async () => {
    const mark = lab.u.requests.length;
    const at = (n: number) => `/wild/items/${'a'.repeat(n - '/wild/items/'.length)}`;
    expect(await send(at(8192), 'GET')).toEqual([200]);
    expect(lab.u.requests.at(-1)!.url).toBe(`/base/items/${'a'.repeat(8192 - '/wild/items/'.length)}`);
    expect(await send(at(8193), 'GET')).toEqual([400]);
    expect(await send(at(20_000), 'GET')).toEqual([431]);
    expect(lab.u.requests.length - mark).toBe(1);
    await lab.g0(mark, 1);
  });

  it('ROUTE-19 the query never changes routing: path-like query text is passed on as query, malformed query bytes are 400', async () => {
    const mark = lab.u.requests.length;
    expect(await send('/wild/items/x?/../../plaid/accounts/get', 'GET')).toEqual([200]);
    expect(lab.u.requests.at(-1)!.url).toBe('/base/items/x?/../../plaid/accounts/get');
    expect(await send('/wild/items/x??a=1', 'GET')).toEqual([200]);
    expect(lab.u.requests.at(-1)!.url).toBe('/base/items/x??a=1');
    await refused(['/wild/items/x?a=%zz', '/wild/items/x?a=%00', '/wild/items/x?a=\\', '/wild/items/x?#', '/wild/items/x?a=|'], [400], 'GET');
    expect(lab.u.requests.length - mark).toBe(2);
    await lab.g0(mark, 2);
  });

  it('ROUTE-20 a route file added at run time that claims a live prefix (or one inside it) for another upstream is refused whole: the old routes stay, E gets nothing', async () => {
    const routes = join(lab.dir, 'routes');
    const mark = lab.u.requests.length;
    const evil = (name: string, prefix: string) => `name: ${name}\nprefix: ${prefix}\nupstream: ${lab.e.url}\nallow_private_addresses: true\ncredential: plaid\ninject:\n  scheme: headers\n  headers:\n    X-Leak: "{secret}"\nallow:\n  - caller: a\n    methods: [POST]\n    paths: [/transactions/get, /get]\n`;
    try {
      // Named to sort before plaid.yaml: were the folder accepted, these would be the first routes to match.
      for (const [name, prefix] of [['aa', '/plaid'], ['ab', '/plaid/accounts']] as const) {
        const before = lab.serve.output().length;
        await writeFile(join(routes, `${name}.yaml`), evil(name, prefix));
        lab.serve.child.kill('SIGHUP');
        await eventually(() => lab.serve.output().slice(before).includes('route reload rejected'), 3_000, `${name} refused`);
        expect(lab.serve.output().slice(before)).toContain('overlaps');
        expect(await send('/plaid/accounts/get')).toEqual([200]);
        expect(await send('/plaid/transactions/get')).toEqual([200]);
        await rm(join(routes, `${name}.yaml`));
      }
    } finally {
      await rm(join(routes, 'aa.yaml'), { force: true });
      await rm(join(routes, 'ab.yaml'), { force: true });
    }
    expect(lab.e.requests.length).toBe(0);
    await lab.g0(mark, 4);
  });

  it('ROUTE-16 caller b cannot reach a\'s paths, and a cannot reach b\'s, in any spelling', async () => {
    const mark = lab.u.requests.length;
    for (const t of ['/plaid/accounts/get', '/pl%61id/accounts/get']) {
      const got = await send(t, 'POST', [], lab.tokens.b);
      expect([403, 404], t).toContain(got[0]);
    }
    for (const t of ['/plaid/institutions/x', '/plaid/institutions/%78']) {
      const got = await send(t, 'GET', [], lab.tokens.a);
      expect([403, 404], t).toContain(got[0]);
    }
    await lab.g0(mark, 0);
  });
});

describe('ROUTE-09i a form body is checked in one pass', () => {
  it('a multipart body of delimiters and no empty line (1 MB, the default max_body) is read in one pass: the override in its last part is found, and a clean one is forwarded', async () => {
    // Each part's headers were searched to the end of the body from every delimiter: 200,000
    // delimiters made that about 1e11 character steps, a core held for minutes by one request.
    const up = await startUpstream();
    const proxy = await startTestProxy({
      routes: { api: `name: api\nprefix: /api\nupstream: ${up.url}\nallow_private_addresses: true\ncredential: key\ninject:\n  scheme: bearer\nallow:\n  - caller: svc\n    methods: [POST]\n    paths: [/x]\n` },
      credentials: { key: { token: 'tok_route09i_secret' } },
      callers: ['svc'],
    });
    try {
      const boundary = 'b';
      const filler = `--${boundary}\r\n`.repeat(200_000);
      const headers = { 'x-egress-token': proxy.tokens.svc!, 'content-type': `multipart/form-data; boundary=${boundary}` };
      const refused = await fetch(`${proxy.url}/api/x`, { method: 'POST', headers, body: `${filler}--${boundary}\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--${boundary}--\r\n`, signal: AbortSignal.timeout(15_000) });
      expect(refused.status, await refused.text()).toBe(400);
      const clean = await fetch(`${proxy.url}/api/x`, { method: 'POST', headers, body: `${filler}--${boundary}--\r\n`, signal: AbortSignal.timeout(15_000) });
      expect(clean.status).toBe(200);
      expect(up.requests).toHaveLength(1);
    } finally {
      await proxy.close();
      await up.close();
    }
  }, 40_000);
});
