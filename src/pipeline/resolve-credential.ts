import { ProxyError } from '../errors.ts';
import { currentVersion, openVersion } from '../store/credentials.ts';
import { IntegrityError } from '../store/crypto.ts';
import { inGrace } from '../rotation/transitions.ts';
import type { ResolvedCredential } from '../injectors/types.ts';
import type { CredentialVersionRecord } from '../store/records.ts';
import { matchPattern } from '../config/path-pattern.ts';
import type { RequestContext } from './context.ts';
import { echoForms } from './redact.ts';

/**
 * Decrypt the route's current credential version for this request only. Anything short of a whole,
 * authentic credential with every field the templates need refuses the request (fail closed).
 */
export function resolveCredential(ctx: RequestContext): void {
  const route = ctx.route!;
  const { store } = ctx.services;
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
  ctx.credential = open(ctx, record.id, version);
  const previous = record.versions.find((v) => v.state === 'previous');
  if (previous && inGrace(previous, new Date()) && route.fields.every((f) => previous.fields.includes(f))) {
    ctx.previous = previous;
    const method = ctx.req.method ?? '';
    const segments = ctx.relativeSegments!;
    ctx.replayable = method === 'GET' || method === 'HEAD' || route.replaySafe.some((r) => r.method === method && matchPattern(r.pattern, segments));
  }
}

/** Decrypt one version for this request; its values are registered for redaction. */
export function open(ctx: RequestContext, id: string, version: CredentialVersionRecord): ResolvedCredential {
  let credential: ResolvedCredential;
  try {
    credential = openVersion(ctx.services.keys.current, id, version);
  } catch (err) {
    if (err instanceof IntegrityError) {
      ctx.services.log.error({ alert: 'credential_integrity', credential: id, version: version.version, request_id: ctx.id }, 'credential failed its integrity check; refusing to use it');
      throw new ProxyError('credential_unavailable', 'The stored credential failed its integrity check.');
    }
    throw err;
  }
  for (const secret of credential.fields.values()) ctx.redactions.push(...echoForms(secret.reveal()));
  return credential;
}
