import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import { render, templateString } from './template.ts';
import type { Injector } from './types.ts';

const schema = z.strictObject({
  scheme: z.literal('json_body'),
  fields: z.record(z.string().min(1).max(128), templateString)
    .refine((f) => Object.keys(f).length > 0, 'at least one field is required'),
});
type Options = z.output<typeof schema>;

/**
 * Credential fields merged into a top-level JSON object body (Plaid body mode). The proxy's fields
 * win over any the caller sent; Content-Length is recomputed when the request is sent.
 */
export const jsonBodyInjector: Injector<Options> = {
  scheme: 'json_body',
  schema,
  needsBody: true,
  claims: (options) => ({ headers: [], query: [], bodyFields: Object.keys(options.fields) }),
  templates: (options) => Object.values(options.fields),
  inject({ request, credential, options, redact }) {
    const text = request.body && request.body.length > 0 ? request.body.toString('utf8') : '{}';
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new ProxyError('bad_request', 'This route needs a JSON object body.');
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
      throw new ProxyError('bad_request', 'This route needs a JSON object body.');
    }
    // A null-prototype copy: a "__proto__" key from the caller stays a plain key.
    const body: Record<string, unknown> = Object.assign(Object.create(null), parsed);
    for (const [name, template] of Object.entries(options.fields)) {
      const value = render(template, credential.fields);
      redact(value);
      redact(JSON.stringify(value).slice(1, -1));
      body[name] = value;
    }
    request.body = Buffer.from(JSON.stringify(body), 'utf8');
    request.headers.set('content-type', ['application/json']);
  },
};
