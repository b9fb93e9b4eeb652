import { z } from 'zod';
import { render, templateString } from './template.ts';
import type { Injector } from './types.ts';

// RFC 9110 §5.1 token characters.
export const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

const schema = z.strictObject({
  scheme: z.literal('headers'),
  headers: z.record(z.string().regex(HEADER_NAME, 'not a valid header name'), templateString)
    .refine((h) => Object.keys(h).length > 0, 'at least one header is required'),
});
type Options = z.output<typeof schema>;

/** Static headers from templates: Plaid, Alpaca, Synth, Stripe, OpenAI. */
export const headersInjector: Injector<Options> = {
  scheme: 'headers',
  schema,
  needsBody: false,
  claims: (options) => ({ headers: Object.keys(options.headers).map((h) => h.toLowerCase()), query: [], bodyFields: [] }),
  templates: (options) => Object.values(options.headers),
  inject({ request, credential, options, redact }) {
    for (const [name, template] of Object.entries(options.headers)) {
      const value = render(template, credential.fields);
      redact(value);
      request.headers.set(name.toLowerCase(), [value]);
    }
  },
};
