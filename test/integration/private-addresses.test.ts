import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** Routes may not reach loopback, private or metadata addresses unless they opt in (SSRF). */
let upstream: Upstream;
let proxy: TestProxy;

beforeAll(async () => {
  upstream = await startUpstream();
  const route = (name: string, url: string, extra = '') => `name: ${name}\nprefix: /${name}\nupstream: ${url}\ncredential: key\n${extra}inject:\n  scheme: bearer\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/x]\n`;
  proxy = await startTestProxy({
    routes: {
      literal: route('literal', upstream.url),
      named: route('named', `http://localhost:${upstream.port}`),
      metadata: route('metadata', 'http://169.254.169.254'),
      allowed: route('allowed', upstream.url, 'allow_private_addresses: true\n'),
      tokenname: `name: tokenname\nprefix: /tokenname\nupstream: https://api.example.test\ncredential: key\ninject:\n  scheme: oauth2_client_credentials\n  token_url: http://localhost:${upstream.port}/token\n  client_id: "{token}"\n  client_secret: "{token}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/x]\n`,
      mapped: route('mapped', `http://[::ffff:127.0.0.1]:${upstream.port}`),
      token: `name: token\nprefix: /token\nupstream: https://api.example.test\ncredential: key\ninject:\n  scheme: oauth2_client_credentials\n  token_url: ${upstream.url}/token\n  client_id: "{token}"\n  client_secret: "{token}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/x]\n`,
    },
    credentials: { key: { token: 'tok_ssrf_CANARY_1234' } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

const get = (path: string) => fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': proxy.tokens.svc! } });

describe('private addresses', () => {
  it.each([
    ['an IP-literal loopback upstream', '/literal/x'],
    ['a name that resolves to loopback (checked on the address dialled)', '/named/x'],
    ['the cloud metadata address', '/metadata/x'],
    ['a token endpoint on loopback', '/token/x'],
    ['a token endpoint whose name resolves to loopback', '/tokenname/x'],
    ['loopback as an IPv4-mapped IPv6 literal', '/mapped/x'],
  ])('refuses %s with 403, every time, and nothing is sent', async (_what, path) => {
    const before = upstream.requests.length;
    for (let i = 0; i < 2; i++) {
      const res = await get(path);
      expect(res.status).toBe(403);
      expect(res.headers.get('x-egress-error')).toBe('route_forbidden');
      expect(await res.text()).toContain('private');
    }
    expect(upstream.requests.length).toBe(before);
  });

  it('a route that opts in reaches a loopback upstream', async () => {
    expect((await get('/allowed/x')).status).toBe(200);
  });
});
