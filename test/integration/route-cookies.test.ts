import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { rawRequest } from '../helpers/raw.ts';
import { apiKeyRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * Reverse mode puts every route on the proxy's one origin (/alpha/..., /beta/...): an upstream's
 * Set-Cookie and Location are scoped to its route's prefix there, so a caller's cookie jar does not
 * send one provider's session to another, and a redirect to the upstream's own origin stays on the
 * route. Forward mode talks to the real host and relays both as they came.
 */
const run = promisify(execFile);
const SECRET = 'sk_cookie_CANARY_5d21';
let alpha: Upstream;
let beta: Upstream;
let evil: Upstream;
let proxy: TestProxy;

const SET_COOKIES = [
  'a=1; Path=/; HttpOnly',
  'b=x=y==; path=/sub/; Secure',
  'c=2',
  'd="q v"; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Domain=127.0.0.1; PATH="/q"',
  'e=3; Domain=.Example.COM; Max-Age=60; SameSite=Lax',
  'f=4; Path=relative',
  'g=5; Path=/one; Path=/two',
  'Path=/x; Max-Age=5',
];

beforeAll(async () => {
  evil = await startUpstream();
  const provider = (name: string) => startUpstream((req, res) => {
    const url = new URL(req.url ?? '/', 'http://u');
    // The gamma route's upstream has a base path: /v1 here is the route's root.
    const path = url.pathname.replace(/^\/v1(?=\/|$)/, '');
    if (path === '/login') {
      res.writeHead(200, { 'set-cookie': `sid=${name}-session; Path=/; HttpOnly`, 'content-length': 2 });
      res.end('ok');
    } else if (path === '/set-cookies') {
      res.writeHead(200, { 'set-cookie': SET_COOKIES, 'content-length': 2 });
      res.end('ok');
    } else if (path === '/secret-cookie') {
      res.writeHead(200, { 'set-cookie': [`s=${String(req.headers['x-api-key'])}; Path=/; Domain=127.0.0.1`, 'ok=1'], 'content-length': 2 });
      res.end('ok');
    } else if (path === '/redirect') {
      const to = url.searchParams.get('to')!.replace('{self}', `http://127.0.0.1:${(req.socket.localPort ?? 0)}`).replace('{key}', encodeURIComponent(String(req.headers['x-api-key'])));
      res.writeHead(302, { location: to, 'content-length': 0 });
      res.end();
    } else {
      const text = JSON.stringify({ cookie: req.headers.cookie ?? null });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
      res.end(text);
    }
  });
  alpha = await provider('alpha');
  beta = await provider('beta');
  proxy = await startTestProxy({
    routes: {
      alpha: apiKeyRoute({ upstream: alpha.url, name: 'alpha', paths: ['/**'] }),
      beta: apiKeyRoute({ upstream: beta.url, name: 'beta', paths: ['/**'] }),
      gamma: apiKeyRoute({ upstream: `${alpha.url}/v1`, name: 'gamma', paths: ['/**'] }),
      fwd: apiKeyRoute({ upstream: alpha.url, name: 'fwd', paths: ['/**'], extra: 'hosts: [cookies.test]\n' }),
    },
    credentials: { key: { secret: SECRET } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await alpha?.close();
  await beta?.close();
  await evil?.close();
});

function get(path: string): Promise<Response> {
  return fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': proxy.tokens.svc! }, redirect: 'manual' });
}

function redirect(route: string, to: string): Promise<Response> {
  return get(`/${route}/redirect?to=${encodeURIComponent(to)}`);
}

/** A forward-mode (absolute-form) request for http://cookies.test<path>: the head's lines, as they came. */
async function forwardHead(path: string): Promise<string[]> {
  const auth = Buffer.from(`svc:${proxy.tokens.svc}`).toString('base64');
  const raw = await rawRequest(proxy.proxy.proxyAddress.port, `GET http://cookies.test${path} HTTP/1.1\r\nHost: cookies.test\r\nProxy-Authorization: Basic ${auth}\r\nConnection: close\r\n\r\n`);
  return raw.slice(0, raw.indexOf('\r\n\r\n')).split('\r\n');
}

describe('reverse mode: Set-Cookie stays within the route', () => {
  it('a cookie jar (curl\'s) does not send one route\'s session cookie to another route; its own route still gets it', async () => {
    const alphaBefore = alpha.requests.length;
    const betaBefore = beta.requests.length;
    await run('curl', ['-sS', '-b', '', '-H', `X-Egress-Token: ${proxy.tokens.svc}`,
      `${proxy.url}/alpha/login`, `${proxy.url}/beta/echo`, `${proxy.url}/alpha/echo`]);
    const toBeta = beta.requests.slice(betaBefore);
    expect(toBeta.map((r) => r.url)).toEqual(['/echo']);
    expect(toBeta[0]!.headers.cookie).toBeUndefined();
    const toAlpha = alpha.requests.slice(alphaBefore);
    expect(toAlpha.map((r) => r.url)).toEqual(['/login', '/echo']);
    expect(toAlpha[1]!.headers.cookie).toBe('sid=alpha-session');
  });

  it('each Set-Cookie line ends with one Path, the route prefix joined with its own (the prefix when it has none or no usable one), and loses its Domain; the rest is kept as it came', async () => {
    const res = await get('/alpha/set-cookies');
    expect(res.status).toBe(200);
    expect(res.headers.getSetCookie()).toEqual([
      'a=1; HttpOnly; Path=/alpha',
      'b=x=y==; Secure; Path=/alpha/sub/',
      'c=2; Path=/alpha',
      'd="q v"; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/alpha/q',
      'e=3; Max-Age=60; SameSite=Lax; Path=/alpha',
      'f=4; Path=/alpha',
      // The last Path counts (RFC 6265 §5.3): it is the one kept.
      'g=5; Path=/alpha/two',
      // A cookie named "Path" is a name, not an attribute.
      'Path=/x; Max-Age=5; Path=/alpha',
    ]);
  });

  it('a route whose upstream has a base path: a cookie for the base path (or above it) is for the whole route, one below it for that part of the route', async () => {
    const res = await get('/gamma/set-cookies');
    expect(res.headers.getSetCookie().slice(0, 3)).toEqual(['a=1; HttpOnly; Path=/gamma', 'b=x=y==; Secure; Path=/gamma/sub/', 'c=2; Path=/gamma']);
  });

  it('an injected secret in a Set-Cookie is still redacted, with the cookie scoped as well', async () => {
    const res = await get('/alpha/secret-cookie');
    expect(res.headers.getSetCookie()).toEqual(['s=[REDACTED]; Path=/alpha', 'ok=1; Path=/alpha']);
  });
});

describe('reverse mode: Location to the upstream\'s own origin stays on the route', () => {
  it.each([
    ['{self}/x?y=1#top', '/alpha/x?y=1#top'],
    ['{self}', '/alpha'],
    ['/x/y?z', '/alpha/x/y?z'],
    ['/', '/alpha/'],
    ['//127.0.0.1:{port}/x', '/alpha/x'],
  ])('%s becomes %s', async (to, expected) => {
    const res = await redirect('alpha', to.replace('{port}', String(alpha.port)));
    expect(res.status).toBe(302);
    expect(res.headers.get('location')).toBe(expected);
  });

  it('redirects to other origins, and relative references, are passed back as they came', async () => {
    for (const to of [`${evil.url}/steal`, `//127.0.0.1:${evil.port}/steal`, 'next/page', '?page=2', `http://user@127.0.0.1:${alpha.port}/x`]) {
      expect((await redirect('alpha', to)).headers.get('location'), to).toBe(to);
    }
    // The same host under another scheme is another origin.
    expect((await redirect('alpha', `https://127.0.0.1:${alpha.port}/x`)).headers.get('location')).toBe(`https://127.0.0.1:${alpha.port}/x`);
    expect(evil.requests).toHaveLength(0);
  });

  it('a route whose upstream has a base path: a Location under it maps to the route, one outside it (which the route cannot reach) is left as it came', async () => {
    expect((await redirect('gamma', '/v1/x')).headers.get('location')).toBe('/gamma/x');
    expect((await redirect('gamma', '{self}/v1')).headers.get('location')).toBe('/gamma');
    expect((await redirect('gamma', '/v1x/y')).headers.get('location')).toBe('/v1x/y');
    expect((await redirect('gamma', '/other')).headers.get('location')).toBe('/other');
  });

  it('an injected secret in the Location is still redacted', async () => {
    const res = await redirect('alpha', '/login?from={key}');
    expect(res.headers.get('location')).toBe('/alpha/login?from=[REDACTED]');
  });
});

describe('forward mode relays Set-Cookie and Location unchanged', () => {
  it('Set-Cookie lines', async () => {
    const head = await forwardHead('/set-cookies');
    expect(head[0]).toBe('HTTP/1.1 200 OK');
    expect(head.filter((l) => /^set-cookie:/i.test(l)).map((l) => l.slice(l.indexOf(':') + 2))).toEqual(SET_COOKIES);
  });

  it('Location', async () => {
    const head = await forwardHead(`/redirect?to=${encodeURIComponent('/x?y=1')}`);
    expect(head[0]).toBe('HTTP/1.1 302 Found');
    expect(head.filter((l) => /^location:/i.test(l))).toEqual(['location: /x?y=1']);
  });
});
