import { createPrivateKey, sign, type KeyObject } from 'node:crypto';
import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import { fromCredential } from './derived.ts';
import { base64url, pastedPem } from './encoding.ts';
import { HEADER_NAME } from './headers.ts';
import { compileTemplate, render, templateString } from './template.ts';
import type { Injector, OutboundRequest } from './types.ts';

/** The methods truelayer-signing signs (its HttpMethod); TrueLayer asks for a signature on modifying ones. */
const METHODS = ['POST', 'PUT', 'PATCH', 'DELETE', 'GET'] as const;

const headerName = z.string().regex(HEADER_NAME, 'not a valid header name').refine((h) => h.toLowerCase() !== 'tl-signature', 'Tl-Signature cannot sign itself');

const schema = z.strictObject({
  scheme: z.literal('truelayer_signing'),
  /** The signing key's id, shown in TrueLayer Console next to the uploaded public key: the JWS kid. */
  kid: templateString.default(compileTemplate('{kid}')),
  /** The EC P-521 private key (PEM, PKCS#8 or SEC1) whose public key is uploaded in Console. */
  private_key: templateString.default(compileTemplate('{private_key}')),
  /** Request headers to sign, in this order and with this casing, each when the request carries it. */
  signed_headers: z.array(headerName).max(32).default(['Idempotency-Key'])
    .refine((names) => new Set(names.map((h) => h.toLowerCase())).size === names.length, 'a header is listed twice (header names are case-insensitive)'),
  /** The methods that are signed; others are sent without Tl-Signature. */
  methods: z.array(z.enum(METHODS)).min(1).default(['POST', 'PUT', 'PATCH', 'DELETE'])
    .refine((m) => new Set(m).size === m.length, 'a method is listed twice'),
});
type Options = z.output<typeof schema>;

/** The signing key; any key but EC P-521 refuses the request (ES512 is all TrueLayer takes). */
function signingKey(text: string): KeyObject {
  let key: KeyObject;
  try {
    key = createPrivateKey(pastedPem(text));
  } catch {
    // Never the parser's message: it is about the key material.
    throw new ProxyError('credential_unavailable', "The credential's private_key is not a PEM private key.");
  }
  if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'secp521r1') {
    throw new ProxyError('credential_unavailable', "The credential's private_key is not an EC P-521 key: TrueLayer request signing is ES512.");
  }
  return key;
}

/** Each listed header the request carries, with its name as the route writes it. */
function signedHeaders(request: OutboundRequest, names: readonly string[]): [string, string][] {
  const signed: [string, string][] = [];
  for (const name of names) {
    const values = request.headers.get(name.toLowerCase());
    if (!values || values.length === 0) continue;
    // truelayer-signing takes one value per name: two could be joined or picked either way upstream.
    if (values.length > 1) throw new ProxyError('bad_request', `This route signs the ${name} header; the request carries it more than once.`);
    signed.push([name, values[0]!]);
  }
  return signed;
}

/**
 * TrueLayer request signing v2 (TrueLayer/truelayer-signing `request-signing-v2.md`,
 * `nodejs/src/lib.ts`): `Tl-Signature` is a JWS with detached content (RFC 7515 appendix F),
 * `b64url(header) + ".." + b64url(signature)`, ES512 over P-521 with the raw r||s signature
 * (RFC 7518 §3.4). Header {alg: "ES512", kid, tl_version: "2", tl_headers: "Name,…"}; payload
 * `${METHOD} ${path}\n`, then `${name}: ${value}\n` per signed header in tl_headers order, then the
 * body bytes. The path is the one sent upstream, without the query ("the absolute path"), exactly
 * as sent: TrueLayer's verifier tries it with and without a trailing slash. This runs last, over
 * the final bytes, and again with the previous key when a request is re-sent (same
 * Idempotency-Key, as TrueLayer asks).
 */
export const truelayerSigningInjector: Injector<Options> = {
  scheme: 'truelayer_signing',
  schema,
  needsBody: true,
  signsRequest: true,
  explain: (options, method) => ((options.methods as readonly string[]).includes(method)
    ? `Tl-Signature (ES512) over ${[method, 'the path', ...options.signed_headers].join(', ')} and the body${options.signed_headers.length > 0 ? ' (each header when the request has it)' : ''}`
    : `${method} is sent without Tl-Signature (truelayer_signing signs ${options.methods.join(', ')})`),
  claims: () => ({ headers: ['tl-signature'], query: [], bodyFields: [] }),
  templates: (options) => [options.kid, options.private_key],
  inject({ request, credential, options, redact }) {
    const method = request.method.toUpperCase();
    if (!(options.methods as readonly string[]).includes(method)) return;
    const kid = render(options.kid, credential.fields);
    const key = fromCredential(credential, 'truelayer_signing', options.private_key, signingKey);
    const headers = signedHeaders(request, options.signed_headers);
    const header = { alg: 'ES512', kid, tl_version: '2', tl_headers: headers.map(([name]) => name).join(',') };
    // Header values as they go on the wire: the HTTP client writes each character as one byte.
    const lines = `${method} ${request.path}\n${headers.map(([name, value]) => `${name}: ${value}\n`).join('')}`;
    const payload = Buffer.concat([Buffer.from(lines, 'latin1'), request.body ?? Buffer.alloc(0)]);
    const protectedHeader = base64url(JSON.stringify(header));
    const signature = sign('sha512', Buffer.from(`${protectedHeader}.${base64url(payload)}`), { key, dsaEncoding: 'ieee-p1363' });
    const value = `${protectedHeader}..${base64url(signature)}`;
    redact(value);
    request.headers.set('tl-signature', [value]);
  },
};
