import { createHash, createHmac, createSecretKey } from 'node:crypto';
import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import { fromCredential } from './derived.ts';
import { decodeKey, KEY_ENCODINGS } from './encoding.ts';
import { HEADER_NAME } from './headers.ts';
import { PARAM } from './query.ts';
import { render, templateString } from './template.ts';
import type { Injector, OutboundRequest } from './types.ts';

/**
 * What a string-to-sign is made of. Every part is read from the request as it will be sent, after
 * the injections before this one and after this one's own timestamp and nonce are attached.
 */
const PARTS = {
  method: 'the method, upper case',
  host: 'the upstream host (and port when not the default), as sent in Host',
  path: 'the path sent upstream, without the query',
  query: 'the raw query as sent, without "?" (empty when there is none)',
  path_and_query: 'the path, then "?query" when there is a query',
  body: 'the body bytes exactly as sent (empty when there is none)',
  body_sha256: 'lower-case hex SHA-256 of the body bytes',
  body_sha512: 'lower-case hex SHA-512 of the body bytes',
  timestamp: 'the timestamp, in seconds or milliseconds since the epoch',
  nonce: 'a nonce strictly greater than any before for this credential',
} as const;
type PartName = keyof typeof PARTS;

const headerName = z.string().regex(HEADER_NAME, 'not a valid header name');
const paramName = z.string().regex(PARAM, 'query parameter names are limited to A-Z a-z 0-9 _ . ~ -');
const part = z.union([
  z.enum(Object.keys(PARTS) as [PartName, ...PartName[]]),
  z.strictObject({ literal: z.string().max(1024) }),
]);

const schema = z.strictObject({
  scheme: z.literal('hmac'),
  /** The key, e.g. "{secret}", decoded per key_encoding. */
  key: templateString,
  key_encoding: z.enum(KEY_ENCODINGS).default('raw'),
  algorithm: z.enum(['sha256', 'sha512']).default('sha256'),
  string_to_sign: z.array(part).min(1),
  separator: z.string().max(16).default('\n'),
  timestamp: z.enum(['seconds', 'milliseconds']).default('seconds'),
  timestamp_header: headerName.optional(),
  timestamp_param: paramName.optional(),
  nonce_header: headerName.optional(),
  nonce_param: paramName.optional(),
  /** More headers from templates, e.g. the key id. */
  headers: z.record(headerName, templateString).default({}),
  output: z.enum(['hex', 'base64']).default('hex'),
  into: z.union([z.strictObject({ header: headerName }), z.strictObject({ query: paramName })]),
}).superRefine((o, ctx) => {
  const signs = (name: PartName) => o.string_to_sign.includes(name);
  if (signs('timestamp') && !o.timestamp_header && !o.timestamp_param) {
    ctx.addIssue({ code: 'custom', path: ['string_to_sign'], message: 'a signed timestamp must also be sent: set timestamp_header or timestamp_param' });
  }
  if (signs('nonce') && !o.nonce_header && !o.nonce_param) {
    ctx.addIssue({ code: 'custom', path: ['string_to_sign'], message: 'a signed nonce must also be sent: set nonce_header or nonce_param' });
  }
  const headers = writtenHeaders(o);
  if (new Set(headers).size !== headers.length) ctx.addIssue({ code: 'custom', path: [], message: `the signature, timestamp, nonce and extra headers must be different headers (${headers.join(', ')})` });
  const params = writtenParams(o);
  if (new Set(params).size !== params.length) ctx.addIssue({ code: 'custom', path: [], message: `the signature, timestamp and nonce must be different query parameters (${params.join(', ')})` });
});
type Options = z.output<typeof schema>;

function writtenHeaders(o: Pick<Options, 'headers' | 'timestamp_header' | 'nonce_header' | 'into'>): string[] {
  const names = [...Object.keys(o.headers), o.timestamp_header, o.nonce_header, 'header' in o.into ? o.into.header : undefined];
  return names.filter((n): n is string => n !== undefined).map((n) => n.toLowerCase());
}

function writtenParams(o: Pick<Options, 'timestamp_param' | 'nonce_param' | 'into'>): string[] {
  return [o.timestamp_param, o.nonce_param, 'query' in o.into ? o.into.query : undefined].filter((n): n is string => n !== undefined);
}

function usesNonce(o: Options): boolean {
  return o.string_to_sign.includes('nonce') || o.nonce_header !== undefined || o.nonce_param !== undefined;
}

function appendParam(request: OutboundRequest, name: string, value: string): void {
  const pair = `${name}=${encodeURIComponent(value)}`;
  request.query = request.query ? `${request.query}&${pair}` : pair;
}

const EMPTY = Buffer.alloc(0);

/**
 * A declared HMAC over parts of the final request, for exchanges and generic signed APIs. It must
 * be the route's last injection (compile-time check): it signs exactly the method, path, query and
 * body bytes that are sent, and nothing after it may change them.
 *
 * Order of work: extra headers, then timestamp and nonce (so a timestamp_param is part of a signed
 * query), then the signature over `string_to_sign` joined by `separator`, then the signature into
 * its header or, last, its query parameter.
 */
export const hmacInjector: Injector<Options> = {
  scheme: 'hmac',
  schema,
  needsBody: true,
  needsNonce: usesNonce,
  signsRequest: true,
  claims: (options) => ({ headers: writtenHeaders(options), query: writtenParams(options), bodyFields: [] }),
  templates: (options) => [options.key, ...Object.values(options.headers)],
  inject({ request, credential, options, redact, now, nonce }) {
    for (const [name, template] of Object.entries(options.headers)) {
      const value = render(template, credential.fields);
      redact(value);
      request.headers.set(name.toLowerCase(), [value]);
    }
    const timestamp = String(options.timestamp === 'seconds' ? Math.floor(now.getTime() / 1000) : now.getTime());
    if (options.timestamp_header) request.headers.set(options.timestamp_header.toLowerCase(), [timestamp]);
    if (options.timestamp_param) appendParam(request, options.timestamp_param, timestamp);
    if (usesNonce(options) && nonce === undefined) throw new ProxyError('internal_error', 'The hmac signer was given no nonce.');
    const nonceText = nonce === undefined ? '' : nonce.toString();
    if (options.nonce_header) request.headers.set(options.nonce_header.toLowerCase(), [nonceText]);
    if (options.nonce_param) appendParam(request, options.nonce_param, nonceText);

    const body = request.body ?? EMPTY;
    const value = (p: Options['string_to_sign'][number]): Buffer | string => {
      if (typeof p !== 'string') return p.literal;
      switch (p) {
        case 'method': return request.method.toUpperCase();
        case 'host': return request.host;
        case 'path': return request.path;
        case 'query': return request.query;
        case 'path_and_query': return request.query ? `${request.path}?${request.query}` : request.path;
        case 'body': return body;
        case 'body_sha256': return createHash('sha256').update(body).digest('hex');
        case 'body_sha512': return createHash('sha512').update(body).digest('hex');
        case 'timestamp': return timestamp;
        case 'nonce': return nonceText;
      }
    };
    const key = fromCredential(credential, `hmac:${options.key_encoding}`, options.key, (text) => createSecretKey(decodeKey(text, options.key_encoding, 'signing key')));
    const mac = createHmac(options.algorithm, key);
    options.string_to_sign.forEach((p, i) => {
      if (i > 0) mac.update(options.separator, 'utf8');
      const v = value(p);
      if (typeof v === 'string') mac.update(v, 'utf8');
      else mac.update(v);
    });
    const signature = mac.digest(options.output);
    redact(signature);
    if ('header' in options.into) request.headers.set(options.into.header.toLowerCase(), [signature]);
    else appendParam(request, options.into.query, signature);
  },
};
