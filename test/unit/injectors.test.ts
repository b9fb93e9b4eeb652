import { describe, expect, it } from 'vitest';
import { createHash, createHmac, generateKeyPairSync, randomBytes, verify, type KeyObject } from 'node:crypto';
import { ProxyError } from '../../src/errors.ts';
import { basicInjector } from '../../src/injectors/basic.ts';
import { bearerInjector } from '../../src/injectors/bearer.ts';
import { coinbaseJwtInjector } from '../../src/injectors/coinbase-jwt.ts';
import { truelayerSigningInjector } from '../../src/injectors/truelayer-signing.ts';
import { decodeKey } from '../../src/injectors/encoding.ts';
import { headersInjector } from '../../src/injectors/headers.ts';
import { hmacInjector } from '../../src/injectors/hmac.ts';
import { krakenInjector } from '../../src/injectors/kraken.ts';
import { canonicalJson, snaptradeInjector } from '../../src/injectors/snaptrade.ts';
import { injectorFor, INJECTORS } from '../../src/injectors/index.ts';
import { jsonBodyInjector } from '../../src/injectors/json-body.ts';
import { queryInjector } from '../../src/injectors/query.ts';
import { compileTemplate, render, templateString } from '../../src/injectors/template.ts';
import type { Injector, OutboundRequest, ResolvedCredential } from '../../src/injectors/types.ts';
import { Secret } from '../../src/secret.ts';

function request(overrides: Partial<OutboundRequest> = {}): OutboundRequest {
  return { method: 'POST', host: 'api.example.test', path: '/accounts/get', query: '', headers: new Map(), body: undefined, ...overrides };
}

function credential(fields: Record<string, string>): ResolvedCredential {
  return { id: 'cred', version: 3, fields: new Map(Object.entries(fields).map(([k, v]) => [k, new Secret(v)])) };
}

/** Parse options as a route file gives them, inject, and return what was recorded for redaction. */
function run<O extends { readonly scheme: string }>(injector: Injector<O>, rawOptions: unknown, req: OutboundRequest, cred: ResolvedCredential): string[] {
  const options = injector.schema.parse(rawOptions);
  const redacted: string[] = [];
  injector.inject({ request: req, credential: cred, options, redact: (v) => void redacted.push(v), now: new Date(), nonce: undefined });
  return redacted;
}

function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected a throw');
}

describe('compileTemplate', () => {
  it('splits literal text and field references', () => {
    const t = compileTemplate('Bearer {token}');
    expect(t.parts).toEqual(['Bearer ', { field: 'token' }]);
    expect(t.fields).toEqual(['token']);
    expect(t.source).toBe('Bearer {token}');
    expect(Object.isFrozen(t)).toBe(true);
  });

  it('lists each field once, in order of first use', () => {
    expect(compileTemplate('{b}:{a}:{b}').fields).toEqual(['b', 'a']);
  });

  it('"{{" and "}}" stand for literal braces', () => {
    expect(compileTemplate('{{literal}}').parts).toEqual(['{literal}']);
    expect(compileTemplate('{{literal}}').fields).toEqual([]);
    expect(compileTemplate('a{{b}}{c}').parts).toEqual(['a{b}', { field: 'c' }]);
    expect(compileTemplate('{{{x}}}').parts).toEqual(['{', { field: 'x' }, '}']);
  });

  it.each(['{}', '{a', '}', 'a}b', '{a}}', '{1a}', '{a-b}', '{ a }', '{a{b}', `{${'a'.repeat(65)}}`])('refuses %j', (source) => {
    expect(() => compileTemplate(source)).toThrow(/placeholder|unmatched/);
  });

  it('templateString reports a bad template as a validation issue', () => {
    const bad = templateString.safeParse('{oops');
    expect(bad.success).toBe(false);
    expect(bad.error!.issues[0]!.message).toContain('bad placeholder');
    expect(templateString.safeParse('').success).toBe(false);
    expect(templateString.parse('{x}').fields).toEqual(['x']);
  });

  it('render substitutes revealed values and refuses a missing field with credential_unavailable', () => {
    const fields = credential({ a: 'A1', b: 'B2' }).fields;
    expect(render(compileTemplate('{a}-{{x}}-{b}'), fields)).toBe('A1-{x}-B2');
    const err = thrown(() => render(compileTemplate('{a}{missing}'), fields));
    expect(err).toBeInstanceOf(ProxyError);
    expect((err as ProxyError).code).toBe('credential_unavailable');
    expect((err as ProxyError).message).toContain('missing');
    expect((err as ProxyError).message).not.toContain('A1');
  });
});

describe('injector registry', () => {
  it('finds each injector by its scheme and nothing else', () => {
    for (const injector of INJECTORS) expect(injectorFor(injector.scheme)).toBe(injector);
    expect(INJECTORS.map((i) => i.scheme)).toEqual(['headers', 'bearer', 'basic', 'query', 'json_body', 'hmac', 'snaptrade', 'kraken', 'coinbase_jwt', 'truelayer_signing', 'oauth2_client_credentials', 'mtls']);
    expect(injectorFor('__proto__')).toBeUndefined();
    expect(injectorFor('constructor')).toBeUndefined();
    expect(injectorFor('Bearer')).toBeUndefined();
  });
});

describe('headers injector', () => {
  const raw = { scheme: 'headers', headers: { 'PLAID-CLIENT-ID': '{client_id}', 'PLAID-SECRET': '{secret}', 'X-Static': 'v={{1}}' } };
  const cred = credential({ client_id: 'cid_123', secret: 'sk_test_CANARY_7f3a9c' });

  it('sets each header, lower-cased, replacing any existing value', () => {
    const req = request({ headers: new Map([['plaid-secret', ['attacker']], ['accept', ['application/json']]]) });
    const redacted = run(headersInjector, raw, req, cred);
    expect(req.headers.get('plaid-client-id')).toEqual(['cid_123']);
    expect(req.headers.get('plaid-secret')).toEqual(['sk_test_CANARY_7f3a9c']);
    expect(req.headers.get('x-static')).toEqual(['v={1}']);
    expect(req.headers.get('accept')).toEqual(['application/json']);
    expect(req.headers.has('PLAID-SECRET')).toBe(false);
    expect(redacted).toEqual(expect.arrayContaining(['cid_123', 'sk_test_CANARY_7f3a9c']));
    expect(req.path).toBe('/accounts/get');
    expect(req.query).toBe('');
    expect(req.body).toBeUndefined();
  });

  it('claims its header names lower-cased, and lists its templates', () => {
    const options = headersInjector.schema.parse(raw);
    expect(headersInjector.claims(options)).toEqual({ headers: ['plaid-client-id', 'plaid-secret', 'x-static'], query: [], bodyFields: [] });
    expect(headersInjector.templates(options).flatMap((t) => t.fields)).toEqual(['client_id', 'secret']);
    expect(headersInjector.needsBody).toBe(false);
  });

  it('refuses options a route file must not carry', () => {
    expect(headersInjector.schema.safeParse({ scheme: 'headers', headers: {} }).success).toBe(false);
    expect(headersInjector.schema.safeParse({ scheme: 'headers', headers: { 'Bad Name': '{x}' } }).success).toBe(false);
    expect(headersInjector.schema.safeParse({ scheme: 'headers', headers: { 'X-A\r\nX-B': '{x}' } }).success).toBe(false);
    expect(headersInjector.schema.safeParse({ scheme: 'headers', headers: { 'X-A': '{}' } }).success).toBe(false);
    expect(headersInjector.schema.safeParse({ scheme: 'headers', headers: { 'X-A': '{x}' }, extra: 1 }).success).toBe(false);
  });

  it('a template naming a missing field refuses the request before anything is attached', () => {
    const req = request();
    const err = thrown(() => run(headersInjector, { scheme: 'headers', headers: { 'X-Key': '{nope}' } }, req, cred));
    expect(err).toBeInstanceOf(ProxyError);
    expect((err as ProxyError).code).toBe('credential_unavailable');
    expect(req.headers.size).toBe(0);
  });
});

describe('bearer injector', () => {
  it('sets Authorization: Bearer {token} from the default template, replacing a caller copy', () => {
    const req = request({ headers: new Map([['authorization', ['Bearer attacker', 'Basic x']]]) });
    const redacted = run(bearerInjector, { scheme: 'bearer' }, req, credential({ token: 'tok_CANARY' }));
    expect(req.headers.get('authorization')).toEqual(['Bearer tok_CANARY']);
    expect(redacted).toContain('tok_CANARY');
  });

  it('takes a custom template', () => {
    const req = request();
    const redacted = run(bearerInjector, { scheme: 'bearer', token: '{org}.{key}' }, req, credential({ org: 'acme', key: 'k_CANARY' }));
    expect(req.headers.get('authorization')).toEqual(['Bearer acme.k_CANARY']);
    expect(redacted).toContain('acme.k_CANARY');
  });

  it('claims authorization and needs no body', () => {
    const options = bearerInjector.schema.parse({ scheme: 'bearer' });
    expect(bearerInjector.claims(options).headers).toEqual(['authorization']);
    expect(bearerInjector.needsBody).toBe(false);
    expect(bearerInjector.templates(options).flatMap((t) => t.fields)).toEqual(['token']);
  });

  it('refuses a credential without the field', () => {
    const err = thrown(() => run(bearerInjector, { scheme: 'bearer' }, request(), credential({ other: 'x' })));
    expect((err as ProxyError).code).toBe('credential_unavailable');
  });
});

describe('basic injector', () => {
  it('encodes base64(username:password) from the default fields', () => {
    const req = request();
    const redacted = run(basicInjector, { scheme: 'basic' }, req, credential({ username: 'user', password: 'p@ss:word_CANARY' }));
    const expected = Buffer.from('user:p@ss:word_CANARY').toString('base64');
    expect(req.headers.get('authorization')).toEqual([`Basic ${expected}`]);
    expect(redacted).toEqual(expect.arrayContaining(['p@ss:word_CANARY', expected]));
  });

  it('encodes UTF-8 and takes custom field templates', () => {
    const req = request({ headers: new Map([['authorization', ['Basic attacker']]]) });
    run(basicInjector, { scheme: 'basic', username: '{key_id}', password: '{secret_key}' }, req, credential({ key_id: 'AKé', secret_key: 'sëcret' }));
    const header = req.headers.get('authorization')![0]!;
    expect(header.startsWith('Basic ')).toBe(true);
    expect(Buffer.from(header.slice(6), 'base64').toString('utf8')).toBe('AKé:sëcret');
    expect(req.headers.get('authorization')).toHaveLength(1);
  });

  it('claims authorization; a missing field refuses the request', () => {
    expect(basicInjector.claims(basicInjector.schema.parse({ scheme: 'basic' })).headers).toEqual(['authorization']);
    const err = thrown(() => run(basicInjector, { scheme: 'basic' }, request(), credential({ username: 'u' })));
    expect((err as ProxyError).code).toBe('credential_unavailable');
  });
});

describe('query injector', () => {
  const raw = { scheme: 'query', params: { api_key: '{key}', 'sig.v': 'v1' } };

  it('appends URL-encoded values after the caller query', () => {
    const req = request({ query: 'a=1&b=%20x' });
    const value = 'k y&z=1/é+CANARY';
    const redacted = run(queryInjector, raw, req, credential({ key: value }));
    expect(req.query).toBe(`a=1&b=%20x&api_key=${encodeURIComponent(value)}&sig.v=v1`);
    expect(new URLSearchParams(req.query).get('api_key')).toBe(value);
    expect(redacted).toEqual(expect.arrayContaining([value, encodeURIComponent(value)]));
  });

  it('starts the query when there was none', () => {
    const req = request();
    run(queryInjector, raw, req, credential({ key: 'abc' }));
    expect(req.query).toBe('api_key=abc&sig.v=v1');
  });

  it('claims its parameter names and no headers', () => {
    expect(queryInjector.claims(queryInjector.schema.parse(raw))).toEqual({ headers: [], query: ['api_key', 'sig.v'], bodyFields: [] });
  });

  it('refuses parameter names that would need encoding', () => {
    expect(queryInjector.schema.safeParse({ scheme: 'query', params: { 'a&b': '{k}' } }).success).toBe(false);
    expect(queryInjector.schema.safeParse({ scheme: 'query', params: { 'a=b': '{k}' } }).success).toBe(false);
    expect(queryInjector.schema.safeParse({ scheme: 'query', params: {} }).success).toBe(false);
  });

  it('a missing field refuses the request and leaves the query alone', () => {
    const req = request({ query: 'a=1' });
    const err = thrown(() => run(queryInjector, raw, req, credential({})));
    expect((err as ProxyError).code).toBe('credential_unavailable');
    expect(req.query).toBe('a=1');
  });
});

describe('json_body injector', () => {
  const raw = { scheme: 'json_body', fields: { client_id: '{client_id}', secret: '{secret}' } };
  const cred = credential({ client_id: 'cid', secret: 'sk_"quoted"\\CANARY' });

  function bodyOf(req: OutboundRequest): Record<string, unknown> {
    return JSON.parse(req.body!.toString('utf8')) as Record<string, unknown>;
  }

  it('merges into the caller object; the proxy field wins over a caller copy', () => {
    const req = request({ body: Buffer.from(JSON.stringify({ access_token: 'tok', secret: 'attacker', nested: { a: [1] } })) });
    const redacted = run(jsonBodyInjector, raw, req, cred);
    expect(bodyOf(req)).toEqual({ access_token: 'tok', secret: 'sk_"quoted"\\CANARY', nested: { a: [1] }, client_id: 'cid' });
    expect(req.headers.get('content-type')).toEqual(['application/json']);
    expect(redacted).toEqual(expect.arrayContaining(['sk_"quoted"\\CANARY', 'sk_\\"quoted\\"\\\\CANARY']));
  });

  it('an empty or absent body becomes an object of the proxy fields', () => {
    for (const body of [undefined, Buffer.alloc(0)]) {
      const req = request({ body });
      run(jsonBodyInjector, raw, req, cred);
      expect(bodyOf(req)).toEqual({ client_id: 'cid', secret: 'sk_"quoted"\\CANARY' });
    }
  });

  it.each(['[1,2]', '"text"', '42', 'null', 'true', '{"a":', 'not json', '{"a":1}{"b":2}'])('refuses the body %j with bad_request', (body) => {
    const req = request({ body: Buffer.from(body) });
    const err = thrown(() => run(jsonBodyInjector, raw, req, cred));
    expect(err).toBeInstanceOf(ProxyError);
    expect((err as ProxyError).code).toBe('bad_request');
    expect(req.body!.toString()).toBe(body);
  });

  it('keeps a caller "__proto__" key as a plain key and pollutes nothing', () => {
    const req = request({ body: Buffer.from('{"__proto__":{"polluted":true,"secret":"attacker"},"a":1}') });
    run(jsonBodyInjector, raw, req, cred);
    const text = req.body!.toString('utf8');
    expect(text).toContain('"__proto__":{"polluted":true,"secret":"attacker"}');
    const out = bodyOf(req);
    expect(Object.hasOwn(out, '__proto__')).toBe(true);
    expect(out.a).toBe(1);
    expect(out.secret).toBe('sk_"quoted"\\CANARY');
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it('claims its body fields, needs the body, and refuses a missing credential field', () => {
    const options = jsonBodyInjector.schema.parse(raw);
    expect(jsonBodyInjector.claims(options)).toEqual({ headers: [], query: [], bodyFields: ['client_id', 'secret'] });
    expect(jsonBodyInjector.needsBody).toBe(true);
    const err = thrown(() => run(jsonBodyInjector, raw, request({ body: Buffer.from('{}') }), credential({ client_id: 'cid' })));
    expect((err as ProxyError).code).toBe('credential_unavailable');
  });
});

describe('every injector', () => {
  const cases: [string, Injector, unknown, Record<string, string>][] = [
    ['headers', headersInjector as unknown as Injector, { scheme: 'headers', headers: { 'X-Api-Key': 'key={key}' } }, { key: 'CANARY_headers' }],
    ['bearer', bearerInjector as unknown as Injector, { scheme: 'bearer' }, { token: 'CANARY_bearer' }],
    ['basic', basicInjector as unknown as Injector, { scheme: 'basic' }, { username: 'u', password: 'CANARY_basic' }],
    ['query', queryInjector as unknown as Injector, { scheme: 'query', params: { key: '{key}' } }, { key: 'CANARY_query' }],
    ['json_body', jsonBodyInjector as unknown as Injector, { scheme: 'json_body', fields: { key: '{key}' } }, { key: 'CANARY_json' }],
  ];

  it.each(cases)('%s redacts every value it attaches that carries a secret', (_name, injector, rawOptions, fields) => {
    const req = request({ body: Buffer.from('{}') });
    const redacted = run(injector, rawOptions, req, credential(fields));
    const secret = Object.values(fields).find((v) => v.startsWith('CANARY'))!;
    const attached = [...[...req.headers.values()].flat(), req.query, req.body?.toString('utf8') ?? ''];
    const carrying = attached.filter((v) => v.includes(secret) || v.includes(Buffer.from(`u:${secret}`).toString('base64')));
    expect(carrying.length).toBeGreaterThan(0);
    // Every secret-bearing value contains at least one recorded redaction, and one of them covers the raw secret.
    for (const value of carrying) expect(redacted.some((r) => r.length >= 4 && value.includes(r))).toBe(true);
    expect(redacted.some((r) => r.includes(secret))).toBe(true);
  });

  it.each(cases)('%s refuses options from another scheme and unknown keys', (_name, injector, rawOptions) => {
    expect(injector.schema.safeParse({ ...(rawOptions as object), unknown_key: 1 }).success).toBe(false);
    expect(injector.schema.safeParse({ ...(rawOptions as object), scheme: 'other' }).success).toBe(false);
  });
});

describe('signers: pure parts', () => {
  it('decodeKey takes exactly hex or base64 (standard or URL-safe) and refuses anything else', () => {
    expect(decodeKey('00ff', 'hex', 'k')).toEqual(Buffer.from([0, 255]));
    expect(decodeKey('AP8=', 'base64', 'k')).toEqual(Buffer.from([0, 255]));
    expect(decodeKey('-_8', 'base64', 'k')).toEqual(Buffer.from([0xfb, 0xff]));
    expect(decodeKey('plain text', 'raw', 'k').toString()).toBe('plain text');
    for (const [value, encoding] of [['0f0', 'hex'], ['zz', 'hex'], ['', 'base64'], ['a b c d', 'base64'], ['abc!', 'base64'], ['A', 'base64']] as const) {
      const err = thrown(() => decodeKey(value, encoding, 'signing key'));
      expect((err as ProxyError).code).toBe('credential_unavailable');
    }
  });

  it('canonicalJson sorts keys at every level and is compact', () => {
    expect(canonicalJson({ b: 1, a: { d: [{ z: 1, y: null }], c: 'é' } })).toBe('{"a":{"c":"é","d":[{"y":null,"z":1}]},"b":1}');
    expect(canonicalJson(null)).toBe('null');
  });

  it('hmac claims what it writes and needs a nonce only when it uses one', () => {
    const base = { scheme: 'hmac', key: '{k}', string_to_sign: ['method'], into: { query: 'sig' } };
    const plain = hmacInjector.schema.parse(base);
    expect(hmacInjector.claims(plain)).toEqual({ headers: [], query: ['sig'], bodyFields: [] });
    const needsNonce = hmacInjector.needsNonce as (o: typeof plain) => boolean;
    expect(needsNonce(plain)).toBe(false);
    const full = hmacInjector.schema.parse({ ...base, string_to_sign: ['nonce', 'timestamp'], nonce_param: 'n', timestamp_header: 'X-Ts', headers: { 'X-Key': '{id}' } });
    expect(hmacInjector.claims(full)).toEqual({ headers: ['x-key', 'x-ts'], query: ['n', 'sig'], bodyFields: [] });
    expect(needsNonce(full)).toBe(true);
    expect(hmacInjector.templates(full).flatMap((t) => t.fields)).toEqual(['k', 'id']);
  });

  it('every signer declares that it signs, and kraken that it needs a nonce', () => {
    for (const injector of [hmacInjector, snaptradeInjector, krakenInjector, coinbaseJwtInjector, truelayerSigningInjector]) expect(injector.signsRequest).toBe(true);
    expect(krakenInjector.needsNonce).toBe(true);
    expect(krakenInjector.claims(krakenInjector.schema.parse({ scheme: 'kraken' }))).toEqual({ headers: ['api-key', 'api-sign'], query: [], bodyFields: ['nonce'] });
  });

  it('kraken without a nonce from the pipeline refuses rather than signing without one', () => {
    const err = thrown(() => run(krakenInjector, { scheme: 'kraken' }, request(), credential({ api_key: 'k', api_secret: 'AAAA' })));
    expect((err as ProxyError).code).toBe('internal_error');
  });
});

describe('signers: a key is parsed once per opened credential version', () => {
  /**
   * An opened version as resolve-credential shares it between requests, whose fields map counts
   * reads of one field: a signer renders its key template (and parses what it renders) on a read.
   */
  function countedCredential(version: number, fields: Record<string, string>, counted: string): { credential: ResolvedCredential; reads: () => number } {
    let reads = 0;
    class CountingFields extends Map<string, Secret> {
      override get(name: string): Secret | undefined {
        if (name === counted) reads += 1;
        return super.get(name);
      }
    }
    const map = new CountingFields(Object.entries(fields).map(([k, v]) => [k, new Secret(v)]));
    return { credential: { id: 'cred', version, fields: map }, reads: () => reads };
  }

  function ecKeyPem(namedCurve: string): { pem: string; publicKey: KeyObject } {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve });
    return { pem: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, publicKey };
  }

  function jwtVerifies(req: OutboundRequest, publicKey: KeyObject): boolean {
    const [h64, p64, s64] = req.headers.get('authorization')![0]!.slice('Bearer '.length).split('.');
    return verify('sha256', Buffer.from(`${h64}.${p64}`), { key: publicKey, dsaEncoding: 'ieee-p1363' }, Buffer.from(s64!, 'base64url'));
  }

  function tlSignatureVerifies(req: OutboundRequest, publicKey: KeyObject): boolean {
    const [h64, , s64] = req.headers.get('tl-signature')![0]!.split('.');
    const payload = Buffer.concat([Buffer.from(`${req.method} ${req.path}\n`), req.body ?? Buffer.alloc(0)]);
    return verify('sha512', Buffer.from(`${h64}.${payload.toString('base64url')}`), { key: publicKey, dsaEncoding: 'ieee-p1363' }, Buffer.from(s64!, 'base64url'));
  }

  it('coinbase_jwt: the same version signs every request with one parse; a rotated version parses and signs with its own key', () => {
    const a = ecKeyPem('prime256v1');
    const b = ecKeyPem('prime256v1');
    const v1 = countedCredential(1, { key_name: 'organizations/o/apiKeys/a', private_key: a.pem }, 'private_key');
    for (let i = 0; i < 3; i++) {
      const req = request({ method: 'GET' });
      run(coinbaseJwtInjector, { scheme: 'coinbase_jwt' }, req, v1.credential);
      expect(jwtVerifies(req, a.publicKey)).toBe(true);
    }
    expect(v1.reads()).toBe(1);
    const v2 = countedCredential(2, { key_name: 'organizations/o/apiKeys/b', private_key: b.pem }, 'private_key');
    const req = request({ method: 'GET' });
    run(coinbaseJwtInjector, { scheme: 'coinbase_jwt' }, req, v2.credential);
    expect(jwtVerifies(req, b.publicKey)).toBe(true);
    expect(jwtVerifies(req, a.publicKey)).toBe(false);
    expect(v2.reads()).toBe(1);
  });

  it('truelayer_signing: the same version signs every request with one parse; a rotated version parses and signs with its own key', () => {
    const a = ecKeyPem('secp521r1');
    const b = ecKeyPem('secp521r1');
    const v1 = countedCredential(1, { kid: 'kid-a', private_key: a.pem }, 'private_key');
    for (let i = 0; i < 3; i++) {
      const req = request({ method: 'POST', body: Buffer.from(`{"n":${i}}`) });
      run(truelayerSigningInjector, { scheme: 'truelayer_signing', signed_headers: [] }, req, v1.credential);
      expect(tlSignatureVerifies(req, a.publicKey)).toBe(true);
    }
    expect(v1.reads()).toBe(1);
    const v2 = countedCredential(2, { kid: 'kid-b', private_key: b.pem }, 'private_key');
    const req = request({ method: 'POST', body: Buffer.from('{}') });
    run(truelayerSigningInjector, { scheme: 'truelayer_signing', signed_headers: [] }, req, v2.credential);
    expect(tlSignatureVerifies(req, b.publicKey)).toBe(true);
    expect(tlSignatureVerifies(req, a.publicKey)).toBe(false);
    expect(v2.reads()).toBe(1);
  });

  it('hmac and kraken: the secret is decoded once per version; a rotated version signs with its own secret', () => {
    const hmacOptions = { scheme: 'hmac', key: '{secret}', key_encoding: 'base64', algorithm: 'sha512', string_to_sign: ['method', 'path'], output: 'base64', into: { header: 'X-Sig' } };
    for (const [version, secret] of [[1, randomBytes(64)], [2, randomBytes(64)]] as const) {
      const hmac = countedCredential(version, { secret: secret.toString('base64') }, 'secret');
      const kraken = countedCredential(version, { api_key: 'k', api_secret: secret.toString('base64') }, 'api_secret');
      for (let i = 1; i <= 3; i++) {
        const signed = request();
        run(hmacInjector, hmacOptions, signed, hmac.credential);
        expect(signed.headers.get('x-sig')).toEqual([createHmac('sha512', secret).update('POST\n/accounts/get').digest('base64')]);
        const form = request({ body: Buffer.from('pair=XBTUSD') });
        krakenInjector.inject({ request: form, credential: kraken.credential, options: krakenInjector.schema.parse({ scheme: 'kraken' }), redact: () => {}, now: new Date(), nonce: BigInt(i) });
        const digest = createHash('sha256').update(`${i}pair=XBTUSD&nonce=${i}`).digest();
        expect(form.headers.get('api-sign')).toEqual([createHmac('sha512', secret).update(Buffer.concat([Buffer.from('/accounts/get'), digest])).digest('base64')]);
      }
      expect([hmac.reads(), kraken.reads()]).toEqual([1, 1]);
    }
  });

  it('two key templates over one version are two keys (two routes reading two keys from one credential)', () => {
    const a = ecKeyPem('prime256v1');
    const b = ecKeyPem('prime256v1');
    const { credential: cred } = countedCredential(1, { key_name: 'k', live_key: a.pem, paper_key: b.pem }, 'none');
    const live = request({ method: 'GET' });
    run(coinbaseJwtInjector, { scheme: 'coinbase_jwt', private_key: '{live_key}' }, live, cred);
    const paper = request({ method: 'GET' });
    run(coinbaseJwtInjector, { scheme: 'coinbase_jwt', private_key: '{paper_key}' }, paper, cred);
    expect(jwtVerifies(live, a.publicKey)).toBe(true);
    expect(jwtVerifies(paper, b.publicKey)).toBe(true);
  });

  it('a key that does not parse is refused on every request, not remembered as good or bad', () => {
    const v = countedCredential(1, { key_name: 'k', private_key: 'not a key' }, 'private_key');
    for (let i = 0; i < 2; i++) {
      const err = thrown(() => run(coinbaseJwtInjector, { scheme: 'coinbase_jwt' }, request(), v.credential));
      expect((err as ProxyError).code).toBe('credential_unavailable');
    }
    expect(v.reads()).toBe(2);
  });
});
