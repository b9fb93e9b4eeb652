import { describe, expect, it } from 'vitest';
import { responseHeaders } from '../../src/pipeline/headers.ts';
import { redactText } from '../../src/pipeline/redact.ts';
import { scopeLocation, scopeSetCookie } from '../../src/pipeline/route-scope.ts';

const PLAID = { prefix: '/plaid', origin: 'https://production.plaid.com', basePath: '' };
const SFIN = { prefix: '/sfin', origin: 'https://beta-bridge.simplefin.org', basePath: '/simplefin' };

describe('scopeSetCookie', () => {
  it.each([
    ['sid=1; Path=/', 'sid=1; Path=/plaid'],
    ['sid=1; Path=/a', 'sid=1; Path=/plaid/a'],
    ['sid=1', 'sid=1; Path=/plaid'],
    ['sid=1;Path=/a;HttpOnly', 'sid=1;HttpOnly; Path=/plaid/a'],
    ['sid=1; pAtH =  /a ; Secure', 'sid=1; Secure; Path=/plaid/a'],
    ['sid=1; Path; Max-Age=1', 'sid=1; Max-Age=1; Path=/plaid'],
    ['sid=1; Path=', 'sid=1; Path=/plaid'],
    ['sid=1; Domain=production.plaid.com; Path=/', 'sid=1; Path=/plaid'],
    ['sid=1; DOMAIN = .plaid.com; domain=egress.internal', 'sid=1; Path=/plaid'],
    ['sid=a=b=; Expires=Thu, 01 Jan 2037 00:00:00 GMT', 'sid=a=b=; Expires=Thu, 01 Jan 2037 00:00:00 GMT; Path=/plaid'],
    // A value that hides "; Path=/" in quotes: cut as RFC 6265 jars cut it, and a quote-aware parser
    // finds the line's only Path at its end too, with no quote in it to close the value's.
    ['sid="x; Path=/"; Domain=plaid.com', 'sid="x; Path=/plaid/%22'],
    ['sid=1; Path=/a"b', 'sid=1; Path=/plaid/a%22b'],
    ['Domain=x; Path=/a', 'Domain=x; Path=/plaid/a'],
  ])('%s -> %s', (line, scoped) => {
    expect(scopeSetCookie(line, PLAID)).toBe(scoped);
  });

  it('an upstream with a base path: the base path or above is the whole route, below it that part of it, and another path stays inside the route', () => {
    expect(scopeSetCookie('a=1; Path=/simplefin', SFIN)).toBe('a=1; Path=/sfin');
    expect(scopeSetCookie('a=1; Path=/simplefin/accounts', SFIN)).toBe('a=1; Path=/sfin/accounts');
    expect(scopeSetCookie('a=1; Path=/', SFIN)).toBe('a=1; Path=/sfin');
    expect(scopeSetCookie('a=1; Path=/simple', SFIN)).toBe('a=1; Path=/sfin/simple');
    expect(scopeSetCookie('a=1; Path=/other', SFIN)).toBe('a=1; Path=/sfin/other');
  });
});

describe('scopeLocation', () => {
  it.each([
    ['https://production.plaid.com/link/token?x=1', '/plaid/link/token?x=1'],
    ['HTTPS://Production.Plaid.com:443/x#frag', '/plaid/x#frag'],
    ['https://production.plaid.com?x=1', '/plaid?x=1'],
    ['//production.plaid.com/x', '/plaid/x'],
    ['/x', '/plaid/x'],
    ['/\\evil.example/x', '/plaid/\\evil.example/x'],
  ])('%s -> %s', (location, scoped) => {
    expect(scopeLocation(location, PLAID)).toBe(scoped);
  });

  it.each([
    'https://evil.example/steal',
    'http://production.plaid.com/x',
    'https://production.plaid.com:8443/x',
    'https://user@production.plaid.com/x',
    'https://production.plaid.com\\@evil.example/x',
    '//evil.example/x',
    'x/y',
    '?page=2',
    '',
    'https://[::1/x',
  ])('%s is left as it came', (location) => {
    expect(scopeLocation(location, PLAID)).toBe(location);
  });

  it('an upstream with a base path: under it maps to the route, outside it is left', () => {
    expect(scopeLocation('/simplefin/accounts?a=1', SFIN)).toBe('/sfin/accounts?a=1');
    expect(scopeLocation('https://beta-bridge.simplefin.org/simplefin', SFIN)).toBe('/sfin');
    expect(scopeLocation('/simplefinx', SFIN)).toBe('/simplefinx');
    expect(scopeLocation('/', SFIN)).toBe('/');
  });
});

describe('responseHeaders with a route scope', () => {
  const redact = (value: string) => redactText(value, ['sk_live_SECRET']);

  it('scopes each Set-Cookie line and the Location, then redacts what the caller sees', () => {
    const headers = {
      'set-cookie': ['s=sk_live_SECRET; Path=/', 'b=2; Domain=production.plaid.com'],
      location: 'https://production.plaid.com/oauth?key=sk_live_SECRET',
      'content-location': '/x',
    };
    expect(responseHeaders(headers, redact, PLAID)).toEqual([
      'set-cookie', 's=[REDACTED]; Path=/plaid',
      'set-cookie', 'b=2; Path=/plaid',
      'location', '/plaid/oauth?key=[REDACTED]',
      'content-location', '/x',
    ]);
  });

  it('without a scope (forward mode) both are relayed as they came, redacted', () => {
    expect(responseHeaders({ 'set-cookie': 'a=1; Path=/; Domain=production.plaid.com', location: '/x?k=sk_live_SECRET' }, redact)).toEqual([
      'set-cookie', 'a=1; Path=/; Domain=production.plaid.com',
      'location', '/x?k=[REDACTED]',
    ]);
  });
});
