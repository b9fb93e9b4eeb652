import { Console } from 'node:console';
import { Writable } from 'node:stream';
import { format, inspect } from 'node:util';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { carriesOnce, outboundHeaders, responseHeaders } from '../../src/pipeline/headers.ts';
import { echoForms, redactText } from '../../src/pipeline/redact.ts';
import { REDACTED, Secret } from '../../src/secret.ts';

const VALUE = 'sk_test_CANARY_7f3a9c';

describe('Secret', () => {
  const secret = new Secret(VALUE);

  it('only reveal() gives the value', () => {
    expect(secret.reveal()).toBe(VALUE);
    expect(REDACTED).toBe('[REDACTED]');
  });

  it('String(), concatenation and template literals print [REDACTED]', () => {
    expect(String(secret)).toBe('[REDACTED]');
    expect(`${secret}`).toBe('[REDACTED]');
    expect('x' + secret).toBe('x[REDACTED]');
    expect(secret.toString()).toBe('[REDACTED]');
  });

  it('JSON.stringify prints [REDACTED], alone and nested', () => {
    expect(JSON.stringify(secret)).toBe('"[REDACTED]"');
    expect(JSON.stringify({ a: { b: [secret] } })).toBe('{"a":{"b":["[REDACTED]"]}}');
    expect(JSON.stringify(new Map([['k', secret]]))).not.toContain(VALUE);
    expect(JSON.stringify([...new Map([['k', secret]])])).toBe('[["k","[REDACTED]"]]');
  });

  it('util.inspect prints [REDACTED], alone, nested, and with hidden or no custom inspection', () => {
    expect(inspect(secret)).toBe('[REDACTED]');
    expect(inspect({ nested: { secret } }, { depth: 10 })).toContain('[REDACTED]');
    for (const options of [{ showHidden: true }, { customInspect: false }, { showHidden: true, customInspect: false, depth: Infinity }]) {
      expect(inspect(secret, options)).not.toContain(VALUE);
      expect(inspect({ s: secret, m: new Map([['k', secret]]) }, options)).not.toContain(VALUE);
    }
  });

  it('util.format with %s %o %O %j %d and console.log print [REDACTED]', () => {
    const out = format('%s %o %O %j', secret, secret, { secret }, { secret });
    expect(out).not.toContain(VALUE);
    expect(out).toBe("[REDACTED] [REDACTED] { secret: [REDACTED] } {\"secret\":\"[REDACTED]\"}");
    expect(format(secret)).toBe('[REDACTED]');
    expect(format('%d', secret)).not.toContain(VALUE);

    let written = '';
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        written += chunk.toString('utf8');
        done();
      },
    });
    const console = new Console({ stdout: sink, stderr: sink });
    console.log(secret, { secret }, [secret]);
    console.error('%s', secret);
    console.dir({ secret }, { depth: 5 });
    console.table([{ secret }]);
    expect(written).toContain('[REDACTED]');
    expect(written).not.toContain(VALUE);
  });

  it('an Error carrying a Secret does not print it', () => {
    const err = new Error('failed', { cause: secret });
    expect(inspect(err)).not.toContain(VALUE);
  });
});

/** [name, value, name, value, ...] as node:http gives rawHeaders. */
function raw(...pairs: [string, string][]): string[] {
  return pairs.flat();
}

const NONE = new Set<string>();

describe('outboundHeaders', () => {
  it('drops hop-by-hop headers', () => {
    const out = outboundHeaders(
      raw(['Connection', 'keep-alive'], ['Keep-Alive', 'timeout=5'], ['Proxy-Connection', 'x'], ['TE', 'trailers'], ['Trailer', 'X-T'], ['Transfer-Encoding', 'chunked'], ['Upgrade', 'websocket'], ['HTTP2-Settings', 'x'], ['Host', 'p'], ['Content-Length', '4'], ['Expect', '100-continue'], ['Accept', '*/*']),
      NONE,
    );
    expect([...out.keys()]).toEqual(['accept']);
  });

  it('drops names listed in Connection, case-insensitively, in comma lists and across several Connection headers', () => {
    const out = outboundHeaders(
      raw(['X-Secret-Hop', 'a'], ['Connection', ' X-SECRET-HOP ,, x-other'], ['x-other', 'b'], ['X-Third', 'c'], ['connection', 'x-third'], ['X-Kept', 'd']),
      NONE,
    );
    expect([...out.entries()]).toEqual([['x-kept', ['d']]]);
  });

  it('drops the caller token, proxy credentials, forwarding claims and method overrides', () => {
    const dropped = [
      'X-Egress-Token', 'x-egress-token', 'Proxy-Authorization', 'Proxy-Authenticate',
      'Forwarded', 'X-Forwarded-For', 'X-Forwarded-Host', 'X-Forwarded-Proto', 'X-Forwarded-Port', 'X-Forwarded-Prefix', 'X-Real-IP', 'Via',
      'X-Forwarded-Client-Cert', 'X-SSL-Client-Cert', 'X-SSL-Client-S-DN', 'X-Client-Cert', 'X-Caller-Id',
      'X-HTTP-Method-Override', 'X-HTTP-Method', 'X-Method-Override',
    ];
    const out = outboundHeaders([...dropped.flatMap((n) => [n, 'v']), 'User-Agent', 'ua'], NONE);
    expect([...out.keys()]).toEqual(['user-agent']);
  });

  it('drops every header an injector claims, in any spelling', () => {
    const out = outboundHeaders(raw(['Authorization', 'Bearer attacker'], ['AUTHORIZATION', 'x'], ['authorization', 'y'], ['Plaid-Secret', 'z'], ['Accept', 'a']), new Set(['authorization', 'plaid-secret']));
    expect([...out.keys()]).toEqual(['accept']);
  });

  it('keeps duplicates of other headers, in order, under the lower-case name', () => {
    const out = outboundHeaders(raw(['Accept', 'a'], ['X-Foo', '1'], ['accept', 'b'], ['ACCEPT', 'c'], ['Set-Cookie', 'k=v']), NONE);
    expect([...out.entries()]).toEqual([['accept', ['a', 'b', 'c']], ['x-foo', ['1']], ['set-cookie', ['k=v']]]);
  });

  it('treats __proto__ and constructor as plain names (HDR-11)', () => {
    const out = outboundHeaders(raw(['__proto__', 'x'], ['constructor', 'y'], ['toString', 'z'], ['hasOwnProperty', 'w']), new Set(['valueof']));
    expect(out.get('__proto__')).toEqual(['x']);
    expect(out.get('constructor')).toEqual(['y']);
    expect(out.get('tostring')).toEqual(['z']);
    expect(out.get('hasownproperty')).toEqual(['w']);
    expect(({} as Record<string, unknown>).x).toBeUndefined();
    expect(Object.getPrototypeOf({})).toBe(Object.prototype);
    // A Connection header naming them drops them, without touching prototypes.
    const listed = outboundHeaders(raw(['Connection', '__proto__, constructor'], ['__proto__', 'x'], ['constructor', 'y']), NONE);
    expect(listed.size).toBe(0);
  });

  it('never mutates the inbound list', () => {
    const inbound = raw(['Authorization', 'a'], ['Connection', 'x-h'], ['X-H', 'b']);
    const copy = [...inbound];
    outboundHeaders(inbound, new Set(['authorization']));
    expect(inbound).toEqual(copy);
  });
});

describe('carriesOnce (an idempotency key that makes a request replay-safe)', () => {
  it.each([
    [['Idempotency-Key', 'k1'], true],
    [['IDEMPOTENCY-KEY', 'k1', 'Connection', 'keep-alive'], true],
    [[], false],
    [['Idempotency-Key', ''], false],
    [['Idempotency-Key', 'k1', 'idempotency-key', 'k1'], false],
    [['Idempotency_Key', 'k1'], false],
    [['Idempotency-Key', 'k1', 'idempotency_key', 'k2'], false],
    [['Connection', 'keep-alive, Idempotency-Key', 'Idempotency-Key', 'k1'], false],
  ])('%j: %s', (raw, expected) => {
    expect(carriesOnce(raw, 'idempotency-key')).toBe(expected);
  });

  it('a key name as long as "connection" is still found, and Connection still read', () => {
    expect(carriesOnce(['X-Idem-Key', 'k1'], 'x-idem-key')).toBe(true);
    expect(carriesOnce(['Connection', 'x-idem-key', 'X-Idem-Key', 'k1'], 'x-idem-key')).toBe(false);
  });
});

describe('responseHeaders', () => {
  const redact = (v: string) => redactText(v, echoForms(VALUE));

  it('drops hop-by-hop and Connection-listed headers, keeps the rest, flattens arrays', () => {
    const flat = responseHeaders(
      {
        connection: 'close, X-Hop',
        'x-hop': 'a',
        'keep-alive': 'timeout=5',
        'transfer-encoding': 'chunked',
        upgrade: 'h2c',
        'proxy-authenticate': 'Basic',
        'x-request-id': 'upstream-id',
        'x-egress-error': 'forged',
        'content-type': 'application/json',
        'set-cookie': ['a=1', 'b=2'],
        'x-undefined': undefined,
      },
      redact,
    );
    expect(flat).toEqual(['content-type', 'application/json', 'set-cookie', 'a=1', 'set-cookie', 'b=2']);
  });

  it('handles several Connection values given as an array', () => {
    const flat = responseHeaders({ connection: ['x-a', 'X-B'], 'x-a': '1', 'x-b': '2', 'x-c': '3' }, (v) => v);
    expect(flat).toEqual(['x-c', '3']);
  });

  it('applies the redact function to every value', () => {
    const flat = responseHeaders(
      { 'www-authenticate': `Bearer error="invalid_token" token=${VALUE}`, 'x-echo': [encodeURIComponent(VALUE), Buffer.from(VALUE).toString('base64')], location: `https://u.example/?k=${VALUE}` },
      redact,
    );
    expect(flat.join('\n')).not.toContain(VALUE);
    expect(flat.join('\n')).not.toContain(Buffer.from(VALUE).toString('base64'));
    expect(flat).toEqual([
      'www-authenticate', 'Bearer error="invalid_token" token=[REDACTED]',
      'x-echo', '[REDACTED]',
      'x-echo', '[REDACTED]',
      'location', 'https://u.example/?k=[REDACTED]',
    ]);
  });
});

describe('redactText / echoForms', () => {
  it('replaces every occurrence', () => {
    expect(redactText('abcd-abcd-xabcdx', ['abcd'])).toBe('[REDACTED]-[REDACTED]-x[REDACTED]x');
  });

  it('finds a key with non-ASCII letters and "/" as PHP\'s json_encode writes it by default: "/" as \\/ and the letters as \\uXXXX together', () => {
    const key = 'clé/privée+9f2';
    const php = key.replaceAll('/', '\\/').replace(/[^\x00-\x7f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
    expect(php).toBe('cl\\u00e9\\/priv\\u00e9e+9f2');
    expect(redactText(`{"key":"${php}"}`, echoForms(key))).toBe('{"key":"[REDACTED]"}');
  });

  it('replaces the longest secret first, so a containing secret goes whole', () => {
    expect(redactText('key=abcdef and abcd', ['abcd', 'abcdef'])).toBe('key=[REDACTED] and [REDACTED]');
    expect(redactText('key=abcdef and abcd', ['abcdef', 'abcd'])).toBe('key=[REDACTED] and [REDACTED]');
  });

  it('ignores secrets shorter than 4 characters', () => {
    expect(redactText('status 1 ok abc', ['1', 'ok', 'abc', ''])).toBe('status 1 ok abc');
    expect(redactText('wxyz', ['wxyz'])).toBe('[REDACTED]');
  });

  it('leaves text without secrets unchanged, and does not treat secrets as patterns', () => {
    expect(redactText('nothing here', ['secret'])).toBe('nothing here');
    expect(redactText('a.b*c a+b*c', ['a.b*c'])).toBe('[REDACTED] a+b*c');
    expect(redactText('$&$& x', ['$&$&'])).toBe('[REDACTED] x');
  });

  it('echoForms gives the raw, percent-encoded (both hex cases, form-encoded, "/" kept, strict), JSON-escaped (also with \\/, as \\uXXXX, and non-ASCII only as \\uXXXX, with and without \\/), HTML-escaped, base64 (padded, unpadded, url, inside a longer base64 text) and hex forms, without duplicates', () => {
    const value = 'a b/"é\\';
    expect(echoForms(value)).toEqual([
      value,
      'a%20b%2F%22%C3%A9%5C',
      'a%20b%2f%22%c3%a9%5c',
      'a+b%2F%22%C3%A9%5C',
      'a%20b/%22%C3%A9%5C',
      'a b/\\"é\\\\',
      'a b\\/\\"é\\\\',
      '\\u0061\\u0020\\u0062\\u002f\\u0022\\u00e9\\u005c',
      'a b/&quot;é\\',
      'YSBiLyLDqVw=',
      'YSBiLyLDqVw',
      '6120622f22c3a95c',
      // Its base64 inside a longer base64 text, at each byte offset (the characters that encode it only), and as base64url.
      'YSBiLyLDqV',
      'EgYi8iw6lc',
      'hIGIvIsOpX',
      // Non-ASCII letters: the case-changed forms are other bytes, not only other ASCII case.
      'A B/"É\\',
      'a b/\\"\\u00e9\\\\',
      'a b\\/\\"\\u00e9\\\\',
    ]);
    expect(echoForms('abcd')).toEqual(['abcd', '\\u0061\\u0062\\u0063\\u0064', 'YWJjZA==', 'YWJjZA', '61626364']);
    expect(echoForms('abc')).toEqual(['abc', '\\u0061\\u0062\\u0063', 'YWJj', '616263']);
    // Strict encoders escape ! ' ( ) *, which encodeURIComponent keeps; Java's keeps * and escapes ~.
    expect(echoForms("a!b'(c)*~")).toEqual(expect.arrayContaining(['a%21b%27%28c%29%2A~', 'a%21b%27%28c%29*%7E']));
    // base64url differs from base64 only where base64 has "+" or "/".
    expect(echoForms('??>')).toContain('Pz8-');
  });

  it('matches without regard to case: a key quoted upper- or lower-cased, hex and \\uXXXX in either case', () => {
    const forms = echoForms(VALUE);
    const hex = Buffer.from(VALUE).toString('hex');
    const unicode = [...VALUE].map((c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join('');
    for (const echo of [VALUE.toUpperCase(), VALUE.toLowerCase(), hex, hex.toUpperCase(), unicode, unicode.toUpperCase().replaceAll('\\U', '\\u')]) {
      expect(redactText(`x=${echo};`, forms), echo).toBe('x=[REDACTED];');
    }
  });

  it('lower-cases latin1 byte strings without moving an index (each of the 256 characters stays one latin1 character)', () => {
    for (let c = 0; c < 256; c++) {
      const lower = String.fromCharCode(c).toLowerCase();
      expect(lower.length, String(c)).toBe(1);
      expect(lower.charCodeAt(0), String(c)).toBeLessThan(256);
    }
    // Redaction keeps the bytes around a match as they were, upper-case latin1 included.
    const body = Buffer.concat([Buffer.from([0xc0, 0xde, 0x41]), Buffer.from(VALUE.toUpperCase()), Buffer.from([0xdf, 0xb5, 0xff, 0x5a])]).toString('latin1');
    expect(Buffer.from(redactText(body, [VALUE]), 'latin1')).toEqual(Buffer.concat([Buffer.from([0xc0, 0xde, 0x41]), Buffer.from('[REDACTED]'), Buffer.from([0xdf, 0xb5, 0xff, 0x5a])]));
  });

  it('compares a non-ASCII secret as its UTF-8 bytes and, for latin1 letters, its latin1 bytes, the way bodies and header values are read', () => {
    const secret = 'pässwörd-Ünïcode';
    const asBytes = (s: string) => Buffer.from(s, 'utf8').toString('latin1');
    for (const echo of [secret, secret.toUpperCase(), secret.toLowerCase()]) {
      expect(redactText(`k=${asBytes(echo)}!`, echoForms(secret)), echo).toBe('k=[REDACTED]!');
    }
    // Sent in a header, a latin1 secret went as one byte per character (undici writes latin1).
    for (const echo of [secret, secret.toUpperCase()]) expect(redactText(`k=${echo}!`, echoForms(secret)), echo).toBe('k=[REDACTED]!');
  });

  it('knows JSON with only the non-ASCII characters as \\uXXXX, as Python\'s json.dumps writes by default (ensure_ascii)', () => {
    expect(redactText('{"k":"p\\u00e4ssw\\u00F6rd-\\u00dcn\\u00efcode"}', echoForms('pässwörd-Ünïcode'))).toBe('{"k":"[REDACTED]"}');
    expect(redactText('{"k":"key-\\ud83d\\udd11-\\\\x"}', echoForms('key-\u{1F511}-\\x'))).toBe('{"k":"[REDACTED]"}');
  });

  it('overlapping and touching matches leave no part of either', () => {
    expect(redactText('aaaaa', ['aaaa'])).toBe('[REDACTED]');
    expect(redactText('xsecretsecret!', ['secret'])).toBe('x[REDACTED]!');
    expect(redactText('abcdefgh', ['abcdef', 'efgh'])).toBe('[REDACTED]');
  });

  it('redacting with echoForms removes every echoed form from a body', () => {
    const body = JSON.stringify({ raw: VALUE, url: encodeURIComponent(`x ${VALUE}`), b64: Buffer.from(VALUE).toString('base64'), json: JSON.stringify(`"${VALUE}"`) });
    const out = redactText(body, echoForms(VALUE));
    expect(out).not.toContain(VALUE);
    expect(out).not.toContain(Buffer.from(VALUE).toString('base64'));
  });
});

describe('outboundHeaders (property)', () => {
  const names = fc.constantFrom(
    'Authorization', 'AUTHORIZATION', 'authorization', 'AuThOrIzAtIoN',
    'X-Egress-Token', 'x-egress-token', 'X-EGRESS-TOKEN',
    'Connection', 'connection', 'CONNECTION',
    'X-Foo', 'x-foo', 'X-Bar', 'Accept', 'X-Api-Key', 'x-api-key', 'Keep-Alive', '__proto__', 'constructor',
  );
  const connectionValue = fc
    .array(fc.tuple(names, fc.constantFrom('', ' ', '  ')), { maxLength: 4 })
    .map((items) => items.map(([n, pad]) => `${pad}${n}${pad}`).join(','));
  const header = fc.oneof(fc.tuple(names, fc.string({ maxLength: 6 })), fc.tuple(fc.constantFrom('Connection', 'connection'), connectionValue));
  const claimed = new Set(['authorization', 'x-api-key']);

  it('never passes on a claimed name, the caller token, or any header named in a Connection header; keeps all else in order', () => {
    fc.assert(
      fc.property(fc.array(header, { maxLength: 12 }), (pairs) => {
        const inbound = pairs.flat();
        const listed = new Set(
          pairs.filter(([n]) => n.toLowerCase() === 'connection').flatMap(([, v]) => v.split(',').map((t) => t.trim().toLowerCase())),
        );
        const out = outboundHeaders(inbound, claimed);
        for (const name of out.keys()) {
          expect(name).toBe(name.toLowerCase());
          expect(claimed.has(name)).toBe(false);
          expect(name).not.toBe('x-egress-token');
          expect(name).not.toBe('connection');
          expect(name).not.toBe('keep-alive');
          expect(listed.has(name)).toBe(false);
        }
        // Everything not dropped is kept, values in their original order.
        const expected = new Map<string, string[]>();
        for (const [n, v] of pairs) {
          const lower = n.toLowerCase();
          if (['x-egress-token', 'connection', 'keep-alive'].includes(lower) || claimed.has(lower) || listed.has(lower)) continue;
          expected.set(lower, [...(expected.get(lower) ?? []), v]);
        }
        expect(new Map(out)).toEqual(expected);
      }),
      { numRuns: 1500 },
    );
  });
});
