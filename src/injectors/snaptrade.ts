import { createHmac } from 'node:crypto';
import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import { UTF8 } from './json-body.ts';
import { compileTemplate, render, templateString } from './template.ts';
import type { Injector } from './types.ts';

const schema = z.strictObject({
  scheme: z.literal('snaptrade'),
  client_id: templateString.default(compileTemplate('{client_id}')),
  consumer_key: templateString.default(compileTemplate('{consumer_key}')),
});
type Options = z.output<typeof schema>;

/**
 * Compact JSON with the keys of every object sorted (UTF-16 order, as Array.prototype.sort), the
 * form SnapTrade's SDK signs (`JSONstringifyOrder`). Values come from JSON.parse, so they are only
 * null, booleans, numbers, strings, arrays and plain objects.
 */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const record = value as Record<string, unknown>;
    return `{${Object.keys(record).sort().map((k) => `${JSON.stringify(k)}:${canonicalJson(record[k])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/**
 * SnapTrade's request signature (passiv/snaptrade-sdks, sdks/typescript requestBeforeHook.ts and
 * requestAfterHook.ts): `clientId` and `timestamp` (seconds, Math.round as the SDK does) go into
 * the query; then `Signature` = base64(HMAC-SHA256(key = encodeURI(consumerKey), canonical JSON of
 * {content, path, query})), where content is the parsed JSON body (null when there is none or it
 * is exactly "{}"), path is the path sent and query is the raw query as sent, without "?".
 * User-scoped endpoints' userId and userSecret are the caller's own query parameters and are signed
 * as they arrive.
 */
export const snaptradeInjector: Injector<Options> = {
  scheme: 'snaptrade',
  schema,
  needsBody: true,
  readsBody: 'The proxy signs this route\'s parsed JSON body (snaptrade)',
  signsRequest: true,
  claims: () => ({ headers: ['signature'], query: ['clientId', 'timestamp'], bodyFields: [] }),
  templates: (options) => [options.client_id, options.consumer_key],
  inject({ request, credential, options, redact, now }) {
    const clientId = render(options.client_id, credential.fields);
    const consumerKey = render(options.consumer_key, credential.fields);
    const added = `clientId=${encodeURIComponent(clientId)}&timestamp=${Math.round(now.getTime() / 1000)}`;
    request.query = request.query ? `${request.query}&${added}` : added;

    let text: string | undefined;
    try {
      text = request.body && request.body.length > 0 ? UTF8.decode(request.body) : undefined;
    } catch {
      // Decoded leniently, the signature would cover U+FFFD where the bytes sent say something else.
      throw new ProxyError('bad_request', 'This route signs a JSON body; the body is not UTF-8.');
    }
    let content: unknown = null;
    if (text !== undefined && text !== '{}') {
      try {
        content = JSON.parse(text);
      } catch {
        throw new ProxyError('bad_request', 'This route signs a JSON body; the body is not JSON.');
      }
    }
    let message: string;
    try {
      message = canonicalJson({ content, path: request.path, query: request.query });
    } catch (err) {
      // JSON.parse takes nesting that the recursive serialisation cannot (RangeError): refuse it.
      if (err instanceof RangeError) throw new ProxyError('bad_request', 'This route signs a JSON body; the body nests too deeply to sign.');
      throw err;
    }
    const signature = createHmac('sha256', encodeURI(consumerKey)).update(message, 'utf8').digest('base64');
    redact(clientId);
    redact(consumerKey);
    redact(signature);
    request.headers.set('signature', [signature]);
  },
};
