import { ProxyError } from '../errors.ts';
import { currentVersion, openVersion } from '../store/credentials.ts';
import { IntegrityError } from '../store/crypto.ts';
import { inGrace } from '../rotation/transitions.ts';
import type { ResolvedCredential } from '../injectors/types.ts';
import type { CredentialVersionRecord } from '../store/records.ts';
import type { Keyring } from '../store/keyring.ts';
import { matchPattern } from '../config/path-pattern.ts';
import type { RequestContext } from './context.ts';
import { carriesOnce } from './headers.ts';
import { echoForms, needlesOf } from './redact.ts';

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
    // Only here, inside a grace window, does a route with idempotency_key read the header.
    ctx.replayable = method === 'GET' || method === 'HEAD' || route.replaySafe.some((r) => r.method === method && matchPattern(r.pattern, segments))
      || (route.idempotencyKey !== undefined && carriesOnce(ctx.req.rawHeaders, route.idempotencyKey));
  }
}

/**
 * The stored version with this number if it may still be used (current, or previous inside its
 * grace), as the store has it now; undefined when it has been revoked or retired, or the record
 * cannot be used. A request resolves its versions when its head arrives, and sends them later:
 * after a slow body (up to the listener's request timeout), a token endpoint, or an upstream that
 * takes its time to reject the current key. A revoke is immediate and a grace end is an end; a
 * request that started before either must not use the version after it.
 */
export function liveVersion(ctx: RequestContext, version: number): CredentialVersionRecord | undefined {
  const { store } = ctx.services;
  const id = ctx.route!.credential;
  if (!store.usable() || store.isDamaged('credential', id)) return undefined;
  const stored = store.credential(id)?.versions.find((v) => v.version === version);
  return stored && (stored.state === 'current' || inGrace(stored, new Date())) ? stored : undefined;
}

/**
 * The version opened for this request; its values (in every form an upstream might echo them) are
 * registered for redaction.
 */
export function open(ctx: RequestContext, id: string, version: CredentialVersionRecord): ResolvedCredential {
  const keyring = ctx.services.keys.current;
  let opened = openedVersions.get(version);
  if (!opened || opened.keyring !== keyring || opened.id !== id || opened.data !== version.data || opened.dek !== version.dek || opened.kek !== version.kek) {
    let credential: ResolvedCredential;
    try {
      credential = openVersion(keyring, id, version);
    } catch (err) {
      if (err instanceof IntegrityError) {
        // Each refused request is logged with its id; the alert (webhook, metric) goes once per credential in a cool-down.
        ctx.services.log.error({ credential: id, version: version.version, request_id: ctx.id }, 'credential failed its integrity check; refusing to use it');
        ctx.services.rules.alerts.raise('credential_integrity', 'critical', id, 'a stored credential failed its integrity check (tampering, or a master key file that is not the store\'s); its requests are refused', { credential: id, version: version.version });
        throw new ProxyError('credential_unavailable', 'The stored credential failed its integrity check.');
      }
      throw err;
    }
    const echoes = needlesOf([...credential.fields.values()].flatMap((secret) => echoForms(secret.reveal())));
    opened = { keyring, id, data: version.data, dek: version.dek, kek: version.kek, credential, echoes };
    openedVersions.set(version, opened);
  }
  for (const echo of opened.echoes) ctx.redactions.push(echo);
  return opened.credential;
}

/**
 * Opened versions, keyed by the stored record they came from and valid only while everything the
 * decryption read is the same object (keyring, id, ciphertext, wrapped key): a reload, a rotation,
 * a master-key change or a tampered record is a new object and is decrypted and authenticated
 * afresh. Holding the opened fields adds no exposure over the unwrapped data keys the proxy
 * already holds (either is one step from the plaintext for anyone who can read its memory), and
 * decrypting on every request was a tenth of a proxied request's CPU. What the signers make from
 * the fields (a parsed private key) is kept with the ResolvedCredential returned here
 * (injectors/derived.ts), so it is dropped with it.
 */
interface OpenedVersion {
  readonly keyring: Keyring;
  readonly id: string;
  readonly data: CredentialVersionRecord['data'];
  readonly dek: CredentialVersionRecord['dek'];
  readonly kek: CredentialVersionRecord['kek'];
  readonly credential: ResolvedCredential;
  /** Its values in every form an upstream might echo them, as the redactor's needles. */
  readonly echoes: readonly string[];
}
const openedVersions = new WeakMap<CredentialVersionRecord, OpenedVersion>();
