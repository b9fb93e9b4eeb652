import { createHash, createHmac, createSecretKey } from 'node:crypto';
import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import { fromCredential } from './derived.ts';
import { decodeKey } from './encoding.ts';
import { compileTemplate, render, templateString } from './template.ts';
import type { Injector } from './types.ts';

const schema = z.strictObject({
  scheme: z.literal('kraken'),
  api_key: templateString.default(compileTemplate('{api_key}')),
  /** The base64 private key Kraken shows once. */
  api_secret: templateString.default(compileTemplate('{api_secret}')),
});
type Options = z.output<typeof schema>;

const FORM = 'application/x-www-form-urlencoded';
/** Sent when the caller sends no User-Agent: Kraken's private API refuses a request without one. */
const USER_AGENT = 'egress-proxy';

/** Is this raw `name=value` pair the nonce? Names are compared decoded, as Kraken reads them. */
function isNonce(pair: string): boolean {
  const raw = pair.split('=', 1)[0]!;
  try {
    return decodeURIComponent(raw.replace(/\+/g, ' ')) === 'nonce';
  } catch {
    return false;
  }
}

/**
 * Kraken spot REST (docs.kraken.com, "Authentication"): the nonce goes into the form body, then
 * `API-Key` = the public key and `API-Sign` = base64(HMAC-SHA512(key = base64-decoded secret,
 * msg = URI path + SHA-256(nonce + POST data))). The nonce is the pipeline's: strictly increasing
 * per credential across every instance sharing the store ("always increasing, unsigned 64-bit").
 * A caller's own nonce is replaced in place; the body is signed exactly as it is sent. Kraken's
 * private API is POST only: any other method is refused, not signed. A GET or HEAD cannot carry
 * the nonce; a PUT, PATCH or DELETE would go as a signed form that no private endpoint takes.
 * Kraken also requires a User-Agent: a caller's own goes as it came (it is not claimed), and a
 * request without one gets USER_AGENT, here rather than in the preset, so that a route that writes
 * `scheme: kraken` itself is served as well.
 */
export const krakenInjector: Injector<Options> = {
  scheme: 'kraken',
  schema,
  needsBody: true,
  readsBody: 'The proxy signs a nonce into this route\'s form body (kraken)',
  needsNonce: true,
  signsRequest: true,
  claims: () => ({ headers: ['api-key', 'api-sign'], query: [], bodyFields: ['nonce'] }),
  templates: (options) => [options.api_key, options.api_secret],
  inject({ request, credential, options, redact, nonce }) {
    if (nonce === undefined) throw new ProxyError('internal_error', 'The kraken signer was given no nonce.');
    if (request.method.toUpperCase() !== 'POST') throw new ProxyError('bad_request', `This route signs Kraken's private API, which is POST only (the nonce goes in a POST form body): a ${request.method} request is not signed.`);
    const type = request.headers.get('content-type')?.[0];
    if (type !== undefined && type.split(';', 1)[0]!.trim().toLowerCase() !== FORM) {
      throw new ProxyError('bad_request', `This route signs a form body (${FORM}).`);
    }
    const apiKey = render(options.api_key, credential.fields);
    const secret = fromCredential(credential, 'kraken', options.api_secret, (text) => createSecretKey(decodeKey(text, 'base64', 'api_secret')));

    // latin1 maps bytes to code units one to one, so the caller's bytes go through unchanged.
    const pairs = request.body && request.body.length > 0 ? request.body.toString('latin1').split('&') : [];
    const nonceText = nonce.toString();
    const kept: string[] = [];
    let placed = false;
    for (const pair of pairs) {
      if (!isNonce(pair)) kept.push(pair);
      else if (!placed) {
        kept.push(`nonce=${nonceText}`);
        placed = true;
      }
    }
    if (!placed) kept.push(`nonce=${nonceText}`);
    const body = Buffer.from(kept.join('&'), 'latin1');
    request.body = body;
    request.headers.set('content-type', [FORM]);

    const digest = createHash('sha256').update(nonceText, 'utf8').update(body).digest();
    const sign = createHmac('sha512', secret).update(Buffer.concat([Buffer.from(request.path, 'utf8'), digest])).digest('base64');
    redact(apiKey);
    redact(sign);
    request.headers.set('api-key', [apiKey]);
    request.headers.set('api-sign', [sign]);
    if (!request.headers.has('user-agent')) request.headers.set('user-agent', [USER_AGENT]);
  },
};
