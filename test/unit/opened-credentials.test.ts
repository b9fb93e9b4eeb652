import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ProxyError } from '../../src/errors.ts';
import type { RequestContext } from '../../src/pipeline/context.ts';
import { open } from '../../src/pipeline/resolve-credential.ts';
import { sealVersion } from '../../src/store/credentials.ts';
import { KEY_BYTES } from '../../src/store/crypto.ts';
import { Keyring } from '../../src/store/keyring.ts';
import type { CredentialVersionRecord } from '../../src/store/records.ts';

const NOW = new Date('2026-01-01T00:00:00Z');
const SECRET = 'sk_test_CANARY_opened_1';

function keyringOf(key = randomBytes(KEY_BYTES)): Keyring {
  return new Keyring(1, [{ version: 1, createdAt: NOW.toISOString(), key }]);
}

/** The smallest context open() reads: the live keyring, a logger, the alerts and the request's redaction list. */
function contextWith(keyring: Keyring, errors: unknown[] = []): RequestContext {
  return {
    id: 'req-1',
    redactions: [],
    services: {
      keys: { current: keyring },
      log: { error: (fields: unknown) => errors.push(fields) },
      rules: { alerts: { raise: (...args: unknown[]) => errors.push({ alert: args }) } },
    },
  } as unknown as RequestContext;
}

function flipFirstBit(b64: string): string {
  const buf = Buffer.from(b64, 'base64');
  buf[0] = buf[0]! ^ 1;
  return buf.toString('base64');
}

describe('open(): a credential version is decrypted once while its stored record is unchanged', () => {
  it('returns the same opened version for the same record and keyring, and registers the echo forms every time', () => {
    const keyring = keyringOf();
    const record = sealVersion(keyring, 'plaid', 1, 'current', { client_id: 'client-1', secret: SECRET }, NOW);
    const first = contextWith(keyring);
    const second = contextWith(keyring);
    const a = open(first, 'plaid', record);
    const b = open(second, 'plaid', record);
    expect(b).toBe(a);
    expect(a.fields.get('secret')!.reveal()).toBe(SECRET);
    // The redactor's needles: every echo form, lower-cased.
    for (const ctx of [first, second]) {
      expect(ctx.redactions).toContain(SECRET.toLowerCase());
      expect(ctx.redactions).toContain(Buffer.from(SECRET).toString('base64').toLowerCase());
    }
  });

  it('decrypts afresh for another keyring object (a master-key rotation or reload), and fails closed when it cannot', () => {
    const key = randomBytes(KEY_BYTES);
    const record = sealVersion(keyringOf(key), 'plaid', 1, 'current', { secret: SECRET }, NOW);
    const cached = open(contextWith(keyringOf(key)), 'plaid', record);
    // Same bytes, new keyring object: a new opening, equal in value.
    const reopened = open(contextWith(keyringOf(key)), 'plaid', record);
    expect(reopened).not.toBe(cached);
    expect(reopened.fields.get('secret')!.reveal()).toBe(SECRET);
    // A keyring without that key: refused, even though the version was opened before.
    const errors: unknown[] = [];
    expect(() => open(contextWith(keyringOf(), errors), 'plaid', record)).toThrow(ProxyError);
    expect(JSON.stringify(errors)).toContain('credential_integrity');
    expect(JSON.stringify(errors)).not.toContain(SECRET);
  });

  it('a record whose ciphertext object changed (tampered in place) is authenticated again and refused', () => {
    const keyring = keyringOf();
    const record = sealVersion(keyring, 'plaid', 1, 'current', { secret: SECRET }, NOW);
    open(contextWith(keyring), 'plaid', record);
    const mutable = record as { data: CredentialVersionRecord['data'] };
    mutable.data = { ...record.data!, ct: flipFirstBit(record.data!.ct) };
    expect(() => open(contextWith(keyring), 'plaid', record)).toThrow(/integrity/);
  });

  it('the same record presented under another credential id is refused (the id is bound into the ciphertext)', () => {
    const keyring = keyringOf();
    const record = sealVersion(keyring, 'plaid', 1, 'current', { secret: SECRET }, NOW);
    open(contextWith(keyring), 'plaid', record);
    expect(() => open(contextWith(keyring), 'bank-x', record)).toThrow(ProxyError);
  });
});
