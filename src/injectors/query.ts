import { z } from 'zod';
import { render, templateString } from './template.ts';
import type { Injector } from './types.ts';

export const PARAM = /^[A-Za-z0-9_.~-]+$/;

const schema = z.strictObject({
  scheme: z.literal('query'),
  params: z.record(z.string().regex(PARAM, 'query parameter names are limited to A-Z a-z 0-9 _ . ~ -'), templateString)
    .refine((p) => Object.keys(p).length > 0, 'at least one parameter is required'),
});
type Options = z.output<typeof schema>;

/** Query parameters from templates, appended after the caller's (whose copies were removed). */
export const queryInjector: Injector<Options> = {
  scheme: 'query',
  schema,
  needsBody: false,
  claims: (options) => ({ headers: [], query: Object.keys(options.params), bodyFields: [] }),
  templates: (options) => Object.values(options.params),
  inject({ request, credential, options, redact }) {
    const added: string[] = [];
    for (const [name, template] of Object.entries(options.params)) {
      const value = render(template, credential.fields);
      const encoded = encodeURIComponent(value);
      redact(value);
      redact(encoded);
      added.push(`${name}=${encoded}`);
    }
    request.query = request.query ? `${request.query}&${added.join('&')}` : added.join('&');
  },
};
