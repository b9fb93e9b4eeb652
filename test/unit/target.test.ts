import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ProxyError } from '../../src/errors.ts';
import { MAX_TARGET_LENGTH, parseTarget } from '../../src/pipeline/target.ts';

/** The ProxyError a call throws, or a failed expectation when it throws nothing or something else. */
function refusal(raw: string): ProxyError {
  try {
    parseTarget(raw);
  } catch (err) {
    expect(err).toBeInstanceOf(ProxyError);
    return err as ProxyError;
  }
  throw new Error(`parseTarget accepted ${JSON.stringify(raw)}`);
}

function expectBadRequest(raw: string): void {
  const err = refusal(raw);
  expect(err.code).toBe('bad_request');
  expect(err.status).toBe(400);
}

describe('parseTarget: accepted targets', () => {
  it('splits a plain path into segments with an empty query', () => {
    expect(parseTarget('/plaid/accounts/get')).toEqual({ path: '/plaid/accounts/get', segments: ['plaid', 'accounts', 'get'], query: '' });
  });

  it('accepts "/" and a trailing slash as a final empty segment', () => {
    expect(parseTarget('/')).toEqual({ path: '/', segments: [''], query: '' });
    expect(parseTarget('/plaid/')).toEqual({ path: '/plaid/', segments: ['plaid', ''], query: '' });
  });

  it('keeps the query raw, byte for byte, including escapes, "/" and "?"', () => {
    const t = parseTarget('/plaid/x?b=2&a=%2F%2e%41&c=/d?e&f=1');
    expect(t.path).toBe('/plaid/x');
    expect(t.query).toBe('b=2&a=%2F%2e%41&c=/d?e&f=1');
  });

  it('splits at the first "?" only and keeps an empty query after it', () => {
    expect(parseTarget('/a?').query).toBe('');
    expect(parseTarget('/a??b').query).toBe('?b');
  });

  it('accepts every RFC 3986 pchar in a segment', () => {
    const pchars = "AZaz09-._~!$&'()*+,;=:@";
    expect(parseTarget(`/x${pchars}`).segments).toEqual([`x${pchars}`]);
  });

  it('accepts a target of exactly MAX_TARGET_LENGTH characters', () => {
    const raw = `/${'a'.repeat(MAX_TARGET_LENGTH - 1)}`;
    expect(parseTarget(raw).path).toBe(raw);
  });
});

describe('parseTarget: refused targets (bad_request)', () => {
  it.each([
    ['absolute-form http', 'http://x/y'],
    ['absolute-form to another host', 'https://evil.example/plaid/x'],
    ['asterisk-form', '*'],
    ['authority-form', 'evil.example:443'],
    ['empty target', ''],
    ['relative path', 'plaid/x'],
  ])('refuses %s: %s', (_what, raw) => expectBadRequest(raw));

  it.each([
    '/..', '/.', '/plaid/..', '/plaid/../bank', '/plaid/./x', '/./plaid', '/plaid/x/.', '/plaid/x/..',
    '/plaid/%2e%2e/x', '/plaid/%2E%2E/x', '/plaid/%2e%2E/x', '/plaid/.%2E/x', '/plaid/%2e./x', '/plaid/%2e/x', '/plaid/%2E',
    '/plaid/get/%2e%2e/%2e%2e/item/remove',
  ])('refuses the dot segment in %s', (raw) => expectBadRequest(raw));

  it.each([
    '/plaid%2Fx', '/plaid%2fx', '/plaid/%5Cx', '/plaid/%5cx', '/plaid/%00', '/plaid/%0a', '/plaid/%0D%0Ax', '/plaid/%1f', '/plaid/%7f', '/plaid/%7F',
  ])('refuses an encoded "/", "\\" or control byte: %s', (raw) => expectBadRequest(raw));

  it.each(['/plaid\\x', '/plaid/..\\x', '\\plaid'])('refuses a raw backslash: %s', (raw) => expectBadRequest(raw));

  it.each(['/plaid/x#frag', '/plaid/x?a=1#frag', '/#', '/a?#'])('refuses a fragment: %s', (raw) => expectBadRequest(raw));

  it.each(['//plaid', '/plaid//x', '/plaid/x//', '//'])('refuses interior empty segments: %s', (raw) => expectBadRequest(raw));

  it('refuses a target longer than MAX_TARGET_LENGTH', () => {
    expectBadRequest(`/${'a'.repeat(MAX_TARGET_LENGTH)}`);
    expectBadRequest(`/a?${'b'.repeat(MAX_TARGET_LENGTH)}`);
  });

  it.each(['/plaid/%', '/plaid/%g0', '/plaid/%2', '/plaid/%%41', '/plaid/%2g', '/a?x=%', '/a?x=%g0', '/a?x=%2'])('refuses malformed percent-encoding: %s', (raw) => expectBadRequest(raw));

  it.each(['/plaid/a b', '/plaid/"x"', '/plaid/<x>', '/plaid/caf\u00e9', '/plaid/\u0430pi', '/plaid/x\r\n', '/plaid/\t', '/plaid/`x`', '/plaid/{x}', '/plaid/x|y', '/a?x=a b', '/a?x="', '/a?x=\u00e9'])(
    'refuses a raw character that must be percent-encoded: %j',
    (raw) => expectBadRequest(raw),
  );

  it('refuses an encoded NUL in the query', () => {
    expectBadRequest('/a?x=%00');
  });
});

describe('parseTarget: canonicalisation', () => {
  it('decodes escapes of unreserved characters (an encoded prefix is the prefix)', () => {
    expect(parseTarget('/pl%61id/x').path).toBe('/plaid/x');
    expect(parseTarget('/pl%61id/x').segments).toEqual(['plaid', 'x']);
    expect(parseTarget('/a/%7e').path).toBe('/a/~');
    expect(parseTarget('/%41%5a%30%2D%5F%2e').path).toBe('/AZ0-_.');
  });

  it('keeps other escapes encoded and upper-cases their hex digits', () => {
    expect(parseTarget('/a%3a').path).toBe('/a%3A');
    expect(parseTarget('/a%3A').path).toBe('/a%3A');
    expect(parseTarget('/x%c3%a9').path).toBe('/x%C3%A9');
    expect(parseTarget('/x%20y').path).toBe('/x%20y');
  });

  it('decodes once only: double encoding stays as it was sent', () => {
    expect(parseTarget('/%252e%252e').path).toBe('/%252e%252e');
    expect(parseTarget('/plaid/get/%252e%252e%252fitem').path).toBe('/plaid/get/%252e%252e%252fitem');
    expect(parseTarget('/%25').path).toBe('/%25');
  });

  it('a dot that is only part of a segment is kept', () => {
    expect(parseTarget('/plaid/...').segments).toEqual(['plaid', '...']);
    expect(parseTarget('/plaid/transactions/get;.json').segments).toEqual(['plaid', 'transactions', 'get;.json']);
    expect(parseTarget('/plaid/%2e%2e%2e').segments).toEqual(['plaid', '...']);
  });
});

// Characters that make paths interesting: dots, escapes of "/" "\" "." NUL, separators.
const tricky = fc.constantFrom('/', '.', '%', '2', 'e', 'E', 'f', 'F', '5', 'c', 'C', '0', '7', 'a', '?', '#', '\\', ' ', ';', '*', '~', 'é');
const trickyTarget = fc.oneof(
  fc.string({ unit: tricky, maxLength: 40 }).map((s) => `/${s}`),
  fc.string({ unit: tricky, maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 60 }),
  fc.webPath().map((p) => p || '/'),
);

describe('parseTarget: properties', () => {
  it('(a) either refuses with bad_request or returns a path with no ambiguity left in it', () => {
    fc.assert(
      fc.property(trickyTarget, (raw) => {
        let t;
        try {
          t = parseTarget(raw);
        } catch (err) {
          expect(err).toBeInstanceOf(ProxyError);
          expect((err as ProxyError).code).toBe('bad_request');
          return;
        }
        expect(t.path.startsWith('/')).toBe(true);
        expect(t.segments).toEqual(t.path.slice(1).split('/'));
        t.segments.forEach((s, i) => {
          expect(s).not.toBe('.');
          expect(s).not.toBe('..');
          if (i < t.segments.length - 1) expect(s).not.toBe('');
        });
        expect(t.path).not.toMatch(/%2F|%5C|%00/i);
        expect(t.path).not.toMatch(/[\\#?]/);
      }),
      { numRuns: 3000 },
    );
  });

  it('(b) canonicalisation is idempotent', () => {
    fc.assert(
      fc.property(trickyTarget, (raw) => {
        let t;
        try {
          t = parseTarget(raw);
        } catch {
          return;
        }
        const again = parseTarget(t.path + (t.query ? `?${t.query}` : ''));
        expect(again.path).toBe(t.path);
        expect(again.segments).toEqual(t.segments);
        expect(again.query).toBe(t.query);
      }),
      { numRuns: 3000 },
    );
  });

  it('(c) never throws anything but a ProxyError', () => {
    fc.assert(
      fc.property(trickyTarget, (raw) => {
        try {
          parseTarget(raw);
        } catch (err) {
          expect(err).toBeInstanceOf(ProxyError);
        }
      }),
      { numRuns: 2000 },
    );
    // Around the length limit, with a valid path so the length check is what decides.
    fc.assert(
      fc.property(fc.integer({ min: MAX_TARGET_LENGTH - 3, max: MAX_TARGET_LENGTH + 3 }), fc.string({ unit: tricky, maxLength: 8 }), (length, tail) => {
        const raw = `/${tail}`.padEnd(length, 'a');
        try {
          parseTarget(raw);
          expect(raw.length).toBeLessThanOrEqual(MAX_TARGET_LENGTH);
        } catch (err) {
          expect(err).toBeInstanceOf(ProxyError);
          expect((err as ProxyError).code).toBe('bad_request');
        }
      }),
      { numRuns: 100 },
    );
  });
});
