import { z } from 'zod';
import type { ClientCertificate } from '../store/tls-material.ts';
import { render, templateString } from './template.ts';
import type { Injector, ResolvedCredential } from './types.ts';

const schema = z.strictObject({
  scheme: z.literal('mtls'),
  /** PEM certificate (chain) and its private key… */
  certificate: templateString.optional(),
  private_key: templateString.optional(),
  /** …or a PKCS#12 bundle (base64) and its passphrase. */
  pkcs12: templateString.optional(),
  passphrase: templateString.optional(),
}).superRefine((o, ctx) => {
  if (!((o.certificate && o.private_key && !o.pkcs12) || (o.pkcs12 && !o.certificate && !o.private_key))) {
    ctx.addIssue({ code: 'custom', path: [], message: 'give certificate and private_key, or pkcs12 (with passphrase)' });
  } else if (o.passphrase && !o.pkcs12) {
    // A PEM key goes to TLS as stored, with no passphrase (an encrypted one is refused when stored): nothing would read it.
    ctx.addIssue({ code: 'custom', path: ['passphrase'], message: 'a passphrase goes with pkcs12 only (an encrypted PEM private_key is not supported): remove it and store private_key unencrypted, or store the certificate and key as a pkcs12 bundle' });
  }
});
type Options = z.output<typeof schema>;

/**
 * The upstream TLS client certificate comes from the credential (Teller). It changes no header:
 * the proxy originates TLS with it, through one connection pool per credential version, so a
 * rotation moves new requests to the new certificate and the old pool drains. Combine it with
 * another scheme in an `inject` list, or with `caller_headers` for a caller's own token.
 */
export const mtlsInjector: Injector<Options> = {
  scheme: 'mtls',
  schema: schema as unknown as z.ZodType<Options>,
  needsBody: false,
  claims: () => ({ headers: [], query: [], bodyFields: [] }),
  templates: (o) => [o.certificate, o.private_key, o.pkcs12, o.passphrase].filter((t) => t !== undefined),
  clientCertificate(options: Options, credential: ResolvedCredential): ClientCertificate {
    if (options.pkcs12) {
      return { kind: 'pkcs12', pfx: Buffer.from(render(options.pkcs12, credential.fields).replace(/\s+/g, ''), 'base64'), passphrase: options.passphrase ? render(options.passphrase, credential.fields) : '' };
    }
    return { kind: 'pem', cert: render(options.certificate!, credential.fields), key: render(options.private_key!, credential.fields) };
  },
  inject() {
    // Nothing to attach to the request itself: the certificate is presented in the TLS handshake.
  },
};
