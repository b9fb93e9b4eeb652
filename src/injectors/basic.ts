import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import { compileTemplate, render, templateString } from './template.ts';
import type { Injector } from './types.ts';

const schema = z.strictObject({
  scheme: z.literal('basic'),
  username: templateString.default(compileTemplate('{username}')),
  // RFC 7617 allows an empty password: Teller takes its access token as the user-id with none ("token:").
  password: z.union([z.literal('').transform(() => compileTemplate('')), templateString]).default(compileTemplate('{password}')),
});
type Options = z.output<typeof schema>;

/** `Authorization: Basic base64(user:pass)` (RFC 7617): SimpleFIN, Alpaca Broker. */
export const basicInjector: Injector<Options> = {
  scheme: 'basic',
  schema,
  needsBody: false,
  claims: () => ({ headers: ['authorization'], query: [], bodyFields: [] }),
  templates: (options) => [options.username, options.password],
  inject({ request, credential, options, redact }) {
    const username = render(options.username, credential.fields);
    const password = render(options.password, credential.fields);
    // RFC 7617 §2: the user-id cannot contain ':'. The upstream splits at the first one, so it would
    // check a different user and password than the credential holds: refuse instead of sending that.
    if (username.includes(':')) {
      throw new ProxyError('credential_unavailable', "The credential's Basic user-id contains ':', which HTTP Basic cannot carry.");
    }
    const encoded = Buffer.from(`${username}:${password}`, 'utf8').toString('base64');
    redact(password);
    redact(encoded);
    request.headers.set('authorization', [`Basic ${encoded}`]);
  },
};
