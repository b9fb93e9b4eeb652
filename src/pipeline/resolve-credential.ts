import { ProxyError } from '../errors.ts';
import { currentVersion, openVersion } from '../store/credentials.ts';
import { IntegrityError } from '../store/crypto.ts';
import type { RequestContext } from './context.ts';
import { echoForms } from './redact.ts';

/**
 * Decrypt the route's current credential version for this request only. Anything short of a whole,
 * authentic credential with every field the templates need refuses the request (fail closed).
 */
export function resolveCredential(ctx: RequestContext): void {
  const route = ctx.route!;
  const { store, keyring, log } = ctx.services;
  if (!store.usable()) throw new ProxyError('credential_unavailable', 'The credential store cannot be read.');
  if (store.isDamaged('credential', route.credential)) {
    throw new ProxyError('credential_unavailable', 'The stored credential record is damaged.');
  }
  const record = store.credential(route.credential);
  if (!record) {
    throw new ProxyError('credential_unavailable', 'The route names a credential that is not in the store.');
  }
  const version = currentVersion(record);
  if (!version) throw new ProxyError('credential_unavailable', 'The credential has no current version.');
  const missing = route.fields.filter((f) => !version.fields.includes(f));
  if (missing.length > 0) {
    throw new ProxyError('credential_unavailable', `The credential has no field ${missing.map((f) => `"${f}"`).join(', ')}.`);
  }
  try {
    ctx.credential = openVersion(keyring, record.id, version);
  } catch (err) {
    if (err instanceof IntegrityError) {
      log.error({ credential: record.id, version: version.version, request_id: ctx.id }, 'credential failed its integrity check; refusing to use it');
      throw new ProxyError('credential_unavailable', 'The stored credential failed its integrity check.');
    }
    throw err;
  }
  for (const secret of ctx.credential.fields.values()) ctx.redactions.push(...echoForms(secret.reveal()));
}
