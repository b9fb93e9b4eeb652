import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { apiKeyRoute } from '../helpers/routes.ts';
import { makeTestPki, type TestPki } from '../helpers/tls.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** Upstream TLS is always verified: an extra CA can be named per route, nothing can turn checks off. */
const SECRET = 'sk_live_CANARY_tls_3141';
let pki: TestPki;
let good: Upstream;
let wrongHost: Upstream;
let expired: Upstream;
let otherCa: Upstream;
/** Closes every connection after its answer: each request is a new TLS handshake. */
let closing: Upstream;
let proxy: TestProxy;

beforeAll(async () => {
  pki = makeTestPki();
  good = await startUpstream(undefined, { key: pki.serverKey, cert: pki.serverCert });
  const wrong = makeTestPki({ dnsNames: ['other.test'], ips: [] });
  wrongHost = await startUpstream(undefined, { key: wrong.serverKey, cert: wrong.serverCert });
  const old = makeTestPki({ notBeforeMs: -2 * 86_400_000, notAfterMs: -86_400_000 });
  expired = await startUpstream(undefined, { key: old.serverKey, cert: old.serverCert });
  const foreign = makeTestPki({ commonName: 'some other CA' });
  otherCa = await startUpstream(undefined, { key: foreign.serverKey, cert: foreign.serverCert });
  closing = await startUpstream((_req, res) => {
    res.writeHead(200, { connection: 'close', 'content-length': '2' });
    res.end('ok');
  }, { key: pki.serverKey, cert: pki.serverCert });

  const route = (name: string, url: string, ca: boolean, caFile = 'test-ca.pem') => apiKeyRoute({ upstream: url, name, extra: ca ? `upstream_ca: ./${caFile}\n` : '' });
  proxy = await startTestProxy({
    routes: {
      good: route('good', good.url, true),
      nocafile: route('nocafile', good.url, false),
      wronghost: route('wronghost', wrongHost.url, true, 'wrong-ca.pem'),
      expired: route('expired', expired.url, true, 'old-ca.pem'),
      otherca: route('otherca', otherCa.url, true),
      closing: route('closing', closing.url, true),
    },
    files: { 'test-ca.pem': pki.caCert, 'wrong-ca.pem': wrong.caCert, 'old-ca.pem': old.caCert },
    credentials: { key: { secret: SECRET } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  for (const u of [good, wrongHost, expired, otherCa, closing]) await u?.close();
});

const get = (path: string) => fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': proxy.tokens.svc! } });

describe('upstream TLS', () => {
  it('reaches an HTTPS upstream whose CA the route names, with the credential attached', async () => {
    const res = await get('/good/x');
    expect(res.status).toBe(200);
    expect(good.requests.at(-1)!.headers['x-api-key']).toBe(SECRET);
  });

  it.each([
    ['a CA the route does not name (system roots only)', '/nocafile/x', () => good],
    ['a certificate for another host name', '/wronghost/x', () => wrongHost],
    ['an expired certificate', '/expired/x', () => expired],
    ['a certificate from a different CA than the one named', '/otherca/x', () => otherCa],
  ])('refuses %s with 502, and no request is sent', async (_what, path, upstream) => {
    const before = upstream().requests.length;
    const res = await get(path);
    expect(res.status).toBe(502);
    expect(res.headers.get('x-egress-error')).toBe('upstream_error');
    expect(upstream().requests.length).toBe(before);
    expect(await res.text()).not.toContain(SECRET);
  });

  it('a route\'s pool builds its TLS context (system roots and upstream_ca) once, not at every handshake', async () => {
    expect((await get('/closing/x')).status).toBe(200);
    // Counted where tls.connect builds a context when it is given none: with upstream_ca that
    // parses every system root again, milliseconds of the event loop per new connection.
    const original = tls.createSecureContext;
    let built = 0;
    tls.createSecureContext = (options) => {
      built += 1;
      return original(options);
    };
    try {
      const before = closing.requests.length;
      for (let i = 0; i < 5; i++) expect((await get('/closing/x')).status).toBe(200);
      expect(closing.requests.length - before).toBe(5);
    } finally {
      tls.createSecureContext = original;
    }
    expect(built).toBe(0);
  });
});
