import { render, type Template } from './template.ts';
import type { ResolvedCredential } from './types.ts';

/**
 * What a signer makes from a credential's key field (a parsed private key, an HMAC key decoded
 * into a KeyObject), kept with the opened credential it was made from. resolve-credential hands
 * every request the same ResolvedCredential while the version's stored record is unchanged, and a
 * new one once it changes (a rotation, a revoke, a removal, a reload, a master-key change): keyed
 * weakly by that object, what is kept here goes when the decrypted fields go, and is never used
 * for another credential or version.
 * Parsing the PEM again on every signed request cost more than the signature itself, and an HMAC
 * keyed with bytes costs several times one keyed with a KeyObject.
 */
const made = new WeakMap<ResolvedCredential, Map<string, unknown>>();

/**
 * `make(rendered template)` once per credential version, kind and template (two routes may read
 * two keys from one credential). A value `make` refuses is not kept: the next request tries again
 * and is refused again.
 */
export function fromCredential<T>(credential: ResolvedCredential, kind: string, template: Template, make: (text: string) => T): T {
  const slot = `${kind}\u0000${template.source}`;
  let kept = made.get(credential);
  if (kept?.has(slot)) return kept.get(slot) as T;
  const value = make(render(template, credential.fields));
  if (!kept) {
    kept = new Map();
    made.set(credential, kept);
  }
  kept.set(slot, value);
  return value;
}
