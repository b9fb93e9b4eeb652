import { createPrivateKey, randomBytes, sign, type KeyObject } from 'node:crypto';
import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import { fromCredential } from './derived.ts';
import { base64url, decodeKey, pastedPem } from './encoding.ts';
import { compileTemplate, render, templateString } from './template.ts';
import type { Injector } from './types.ts';

const schema = z.strictObject({
  scheme: z.literal('coinbase_jwt'),
  /** "organizations/{org}/apiKeys/{id}": the JWT's kid and sub. */
  key_name: templateString.default(compileTemplate('{key_name}')),
  /** An EC P-256 key (PEM) or an Ed25519 key (PEM, or CDP's base64 of seed + public key). */
  private_key: templateString.default(compileTemplate('{private_key}')),
  // Coinbase changed these once (iss "coinbase-cloud", 60 s): kept in configuration, not code.
  issuer: z.string().min(1).max(64).default('cdp'),
  lifetime_seconds: z.number().int().min(1).max(600).default(120),
});
type Options = z.output<typeof schema>;

// RFC 8410 PKCS#8 prefix of an Ed25519 private key: the 32-byte seed follows.
const ED25519_PKCS8_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');

/** The signing key and its JWS algorithm; any other key type refuses the request. */
function signingKey(text: string): { key: KeyObject; alg: 'ES256' | 'EdDSA' } {
  let key: KeyObject;
  try {
    if (text.includes('-----BEGIN')) {
      key = createPrivateKey(pastedPem(text));
    } else {
      const raw = decodeKey(text, 'base64', 'private_key');
      if (raw.length !== 32 && raw.length !== 64) throw new Error('length');
      key = createPrivateKey({ key: Buffer.concat([ED25519_PKCS8_PREFIX, raw.subarray(0, 32)]), format: 'der', type: 'pkcs8' });
    }
  } catch {
    // Never the parser's message: it is about the key material.
    throw new ProxyError('credential_unavailable', "The credential's private_key is not a PEM key or a base64 Ed25519 key.");
  }
  if (key.asymmetricKeyType === 'ed25519') return { key, alg: 'EdDSA' };
  if (key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'prime256v1') return { key, alg: 'ES256' };
  throw new ProxyError('credential_unavailable', "The credential's private_key is neither EC P-256 nor Ed25519.");
}

/**
 * Coinbase App / Advanced Trade keys (coinbase/coinbase-advanced-py `jwt_generator.py`): a new JWT
 * for every request, `Authorization: Bearer <jwt>`. Header {alg, kid: key name, nonce: random hex,
 * typ: JWT}; claims {sub: key name, iss: "cdp", nbf: now, exp: now + 120, uri: "METHOD host path"}
 * (no query string). ES256 signatures are JWS's raw r||s (RFC 7518 §3.4), not DER.
 */
export const coinbaseJwtInjector: Injector<Options> = {
  scheme: 'coinbase_jwt',
  schema,
  needsBody: false,
  signsRequest: true,
  claims: () => ({ headers: ['authorization'], query: [], bodyFields: [] }),
  templates: (options) => [options.key_name, options.private_key],
  inject({ request, credential, options, redact, now }) {
    const keyName = render(options.key_name, credential.fields);
    const { key, alg } = fromCredential(credential, 'coinbase_jwt', options.private_key, signingKey);
    const nbf = Math.floor(now.getTime() / 1000);
    const header = { alg, kid: keyName, nonce: randomBytes(16).toString('hex'), typ: 'JWT' };
    const claims = { sub: keyName, iss: options.issuer, nbf, exp: nbf + options.lifetime_seconds, uri: `${request.method.toUpperCase()} ${request.host}${request.path}` };
    const input = `${base64url(JSON.stringify(header))}.${base64url(JSON.stringify(claims))}`;
    const signature = alg === 'ES256'
      ? sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' })
      : sign(null, Buffer.from(input), key);
    const jwt = `${input}.${base64url(signature)}`;
    redact(jwt);
    request.headers.set('authorization', [`Bearer ${jwt}`]);
  },
};
