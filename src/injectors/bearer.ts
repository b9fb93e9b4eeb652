import { z } from 'zod';
import { compileTemplate, render, templateString } from './template.ts';
import type { Injector } from './types.ts';

const schema = z.strictObject({
  scheme: z.literal('bearer'),
  token: templateString.default(compileTemplate('{token}')),
});
type Options = z.output<typeof schema>;

/** `Authorization: Bearer {token}`: Tradier, Synth, Stripe. */
export const bearerInjector: Injector<Options> = {
  scheme: 'bearer',
  schema,
  needsBody: false,
  claims: () => ({ headers: ['authorization'], query: [], bodyFields: [] }),
  templates: (options) => [options.token],
  inject({ request, credential, options, redact }) {
    const token = render(options.token, credential.fields);
    redact(token);
    request.headers.set('authorization', [`Bearer ${token}`]);
  },
};
