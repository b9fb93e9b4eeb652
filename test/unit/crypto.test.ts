import { randomBytes } from 'node:crypto';
import { chmod, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.ts';
import type { Sealed } from '../../src/store/crypto.ts';
import { aad, IntegrityError, KEY_BYTES, open, seal } from '../../src/store/crypto.ts';
import { openVersion, sealVersion } from '../../src/store/credentials.ts';
import { createKeyring, Keyring, readKeyring } from '../../src/store/keyring.ts';
import type { CredentialVersionRecord } from '../../src/store/records.ts';
import { useTempDirs } from '../helpers/temp-dir.ts';

const tempDir = useTempDirs('egress-crypto-');

const NOW = new Date('2025-01-01T00:00:00Z');

function keyringOf(key = randomBytes(KEY_BYTES)): Keyring {
  return new Keyring(1, [{ version: 1, createdAt: NOW.toISOString(), key }]);
}

/** Flip one bit of a base64 field, keeping it valid base64 of the same length. */
function flipBit(b64: string, bit = 0): string {
  const buf = Buffer.from(b64, 'base64');
  buf[bit >> 3] = buf[bit >> 3]! ^ (1 << (bit & 7));
  return buf.toString('base64');
}

function expectIntegrityError(fn: () => unknown): void {
  expect(fn).toThrow(IntegrityError);
}

describe('seal / open (AES-256-GCM)', () => {
  const key = randomBytes(KEY_BYTES);
  const ad = aad('fields', 'plaid-production', 1);
  const plaintext = Buffer.from('{"secret":"sk_test_CANARY_7f3a9c"}');

  it('round-trips, and the sealed form holds no plaintext', () => {
    const sealed = seal(key, plaintext, ad);
    expect(open(key, sealed, ad, 'x').equals(plaintext)).toBe(true);
    expect(Buffer.from(sealed.nonce, 'base64')).toHaveLength(12);
    expect(Buffer.from(sealed.tag, 'base64')).toHaveLength(16);
    expect(JSON.stringify(sealed)).not.toContain('CANARY');
    expect(Buffer.from(sealed.ct, 'base64').toString('utf8')).not.toContain('CANARY');
  });

  it('round-trips an empty plaintext', () => {
    expect(open(key, seal(key, Buffer.alloc(0), ad), ad, 'x')).toHaveLength(0);
  });

  it('refuses a key that is not 32 bytes', () => {
    expect(() => seal(randomBytes(16), plaintext, ad)).toThrow();
    expect(() => seal(randomBytes(31), plaintext, ad)).toThrow();
  });

  it('fails closed on a bit flip anywhere in ct, tag or nonce', () => {
    const sealed = seal(key, plaintext, ad);
    for (const field of ['ct', 'tag', 'nonce'] as const) {
      const bits = Buffer.from(sealed[field], 'base64').length * 8;
      for (const bit of [0, 1, 7, bits >> 1, bits - 1]) {
        const tampered: Sealed = { ...sealed, [field]: flipBit(sealed[field], bit) };
        expectIntegrityError(() => open(key, tampered, ad, 'x'));
      }
    }
  });

  it('fails closed with the wrong key or wrong associated data', () => {
    const sealed = seal(key, plaintext, ad);
    expectIntegrityError(() => open(randomBytes(KEY_BYTES), sealed, ad, 'x'));
    expectIntegrityError(() => open(key, sealed, aad('fields', 'plaid-production', 2), 'x'));
    expectIntegrityError(() => open(key, sealed, aad('fields', 'bank-x', 1), 'x'));
    expectIntegrityError(() => open(key, sealed, aad('dek', 'plaid-production', 1), 'x'));
  });

  it('refuses a short tag, even the genuine tag truncated to 12 bytes (DEP0182)', () => {
    const sealed = seal(key, plaintext, ad);
    const truncated = Buffer.from(sealed.tag, 'base64').subarray(0, 12).toString('base64');
    expectIntegrityError(() => open(key, { ...sealed, tag: truncated }, ad, 'x'));
    const four = Buffer.from(sealed.tag, 'base64').subarray(0, 4).toString('base64');
    expectIntegrityError(() => open(key, { ...sealed, tag: four }, ad, 'x'));
    expectIntegrityError(() => open(key, { ...sealed, tag: '' }, ad, 'x'));
  });

  it('refuses a wrong-length nonce, non-canonical base64 and non-string fields', () => {
    const sealed = seal(key, plaintext, ad);
    expectIntegrityError(() => open(key, { ...sealed, nonce: randomBytes(16).toString('base64') }, ad, 'x'));
    expectIntegrityError(() => open(key, { ...sealed, nonce: `${sealed.nonce}\n` }, ad, 'x'));
    expectIntegrityError(() => open(key, { ...sealed, tag: sealed.tag.replace(/=*$/, '') }, ad, 'x'));
    expectIntegrityError(() => open(key, { ...sealed, ct: 42 } as unknown as Sealed, ad, 'x'));
    expectIntegrityError(() => open(key, { ...sealed, tag: null } as unknown as Sealed, ad, 'x'));
  });

  it('the error names what failed and carries no key or plaintext', () => {
    const sealed = seal(key, plaintext, ad);
    try {
      open(key, { ...sealed, tag: flipBit(sealed.tag) }, ad, 'credential "plaid" version 1');
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(IntegrityError);
      const message = (err as Error).message;
      expect(message).toContain('credential "plaid" version 1');
      expect(message).not.toContain('CANARY');
      expect(message).not.toContain(key.toString('base64'));
    }
  });

  it('never repeats a nonce over 10,000 seals', () => {
    const nonces = new Set<string>();
    const small = Buffer.from('x');
    for (let i = 0; i < 10_000; i++) nonces.add(seal(key, small, ad).nonce);
    expect(nonces.size).toBe(10_000);
  });
});

describe('aad: a tuple, never a concatenation', () => {
  it('distinguishes values a "|" join would confuse', () => {
    expect(aad('fields', 'a|b', 1).equals(aad('fields', 'a', 1))).toBe(false);
    // "a|b" + "|" + 1  vs  "a" + "|" + "b|1"-like shapes
    expect(aad('fields', 'a|1', 1).equals(aad('fields', 'a', 11))).toBe(false);
    expect(aad('dek', 'a', 1, 2).equals(aad('dek', 'a', 12))).toBe(false);
    expect(aad('dek', 'a', 1).equals(aad('fields', 'a', 1))).toBe(false);
    expect(aad('dek', 'a', 1, 1).equals(aad('dek', 'a', 1))).toBe(false);
    expect(aad('fields', 'a","fields', 1).equals(aad('fields', 'a', 1))).toBe(false);
  });

  it('is injective (property)', () => {
    const tuple = fc.record({
      purpose: fc.constantFrom('fields' as const, 'dek' as const),
      id: fc.string({ unit: fc.constantFrom('a', 'b', '|', '"', ',', '\\', '1', '[', ']', 'null'), maxLength: 6 }),
      version: fc.integer({ min: 1, max: 12 }),
      kek: fc.option(fc.integer({ min: 1, max: 12 }), { nil: undefined }),
    });
    fc.assert(
      fc.property(tuple, tuple, (x, y) => {
        const same = x.purpose === y.purpose && x.id === y.id && x.version === y.version && x.kek === y.kek;
        expect(aad(x.purpose, x.id, x.version, x.kek).equals(aad(y.purpose, y.id, y.version, y.kek))).toBe(same);
      }),
      { numRuns: 2000 },
    );
  });
});

describe('sealVersion / openVersion (envelope encryption, CRED-01/03)', () => {
  const keyring = keyringOf();
  const fieldsA = { client_id: 'cid-a', secret: 'sk_test_CANARY_A' };
  const fieldsB = { client_id: 'cid-b', secret: 'sk_test_CANARY_B' };

  function reveal(v: ReturnType<typeof openVersion>): Record<string, string> {
    return Object.fromEntries([...v.fields].map(([k, s]) => [k, s.reveal()]));
  }

  it('round-trips the fields, and the record holds names but no values', () => {
    const record = sealVersion(keyring, 'plaid', 1, 'current', fieldsA, NOW);
    expect(record).toMatchObject({ version: 1, state: 'current', kek: 1, fields: ['client_id', 'secret'], created_at: NOW.toISOString(), activated_at: NOW.toISOString() });
    expect(JSON.stringify(record)).not.toContain('CANARY');
    const opened = openVersion(keyring, 'plaid', record);
    expect(opened.id).toBe('plaid');
    expect(opened.version).toBe(1);
    expect(reveal(opened)).toEqual(fieldsA);
  });

  it('gives each version its own data key: the same fields seal differently', () => {
    const one = sealVersion(keyring, 'plaid', 1, 'current', fieldsA, NOW);
    const two = sealVersion(keyring, 'plaid', 1, 'current', fieldsA, NOW);
    expect(one.dek!.ct).not.toBe(two.dek!.ct);
    expect(one.data!.ct).not.toBe(two.data!.ct);
  });

  it('a version sealed for id A does not open as id B (ciphertext swap)', () => {
    const a = sealVersion(keyring, 'plaid-prod', 1, 'current', fieldsA, NOW);
    expectIntegrityError(() => openVersion(keyring, 'bank-x', a));
  });

  it('a version does not open under another version number', () => {
    const a = sealVersion(keyring, 'plaid', 1, 'current', fieldsA, NOW);
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a, version: 2 }));
  });

  it('swapping data or dek between two records fails for both', () => {
    const a = sealVersion(keyring, 'plaid', 1, 'current', fieldsA, NOW);
    const b = sealVersion(keyring, 'bank', 1, 'current', fieldsB, NOW);
    const a2 = sealVersion(keyring, 'plaid', 2, 'pending', fieldsB, NOW);
    // data from another credential (its own DEK does not open it)
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a, data: b.data }));
    // both dek and data from another credential (AAD names the other id)
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a, dek: b.dek, data: b.data }));
    // dek from another credential with this one's data
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a, dek: b.dek }));
    // another version of the same credential
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a, dek: a2.dek, data: a2.data }));
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a2, dek: a.dek, data: a.data }));
    // untouched records still open
    expect(reveal(openVersion(keyring, 'plaid', a))).toEqual(fieldsA);
    expect(reveal(openVersion(keyring, 'bank', b))).toEqual(fieldsB);
  });

  it('a bit flip in either envelope fails closed', () => {
    const a = sealVersion(keyring, 'plaid', 1, 'current', fieldsA, NOW);
    for (const part of ['dek', 'data'] as const) {
      for (const field of ['ct', 'tag', 'nonce'] as const) {
        const sealed = a[part]!;
        const tampered: CredentialVersionRecord = { ...a, [part]: { ...sealed, [field]: flipBit(sealed[field], 3) } };
        expectIntegrityError(() => openVersion(keyring, 'plaid', tampered));
      }
    }
  });

  it('a missing ciphertext, a wrong KEK or a KEK version not in the keyring fails closed', () => {
    const a = sealVersion(keyring, 'plaid', 1, 'current', fieldsA, NOW);
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a, data: undefined }));
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a, dek: undefined }));
    expectIntegrityError(() => openVersion(keyring, 'plaid', { ...a, kek: 2 }));
    expectIntegrityError(() => openVersion(keyringOf(), 'plaid', a));
  });

  it('a version wrapped by an older KEK still opens after the active KEK changes', () => {
    const old = keyringOf();
    const a = sealVersion(old, 'plaid', 1, 'current', fieldsA, NOW);
    const rotated = new Keyring(2, [
      { version: 1, createdAt: '', key: old.get(1)!.export() },
      { version: 2, createdAt: '', key: randomBytes(KEY_BYTES) },
    ]);
    expect(reveal(openVersion(rotated, 'plaid', a))).toEqual(fieldsA);
    const b = sealVersion(rotated, 'plaid', 2, 'pending', fieldsB, NOW);
    expect(b.kek).toBe(2);
    expectIntegrityError(() => openVersion(rotated, 'plaid', { ...b, kek: 1 }));
  });
});

describe('readKeyring', () => {
  const validKey = randomBytes(KEY_BYTES).toString('base64');

  async function keyFile(content: unknown, mode = 0o600): Promise<string> {
    const path = join(await tempDir(), 'master.key');
    await writeFile(path, typeof content === 'string' ? content : JSON.stringify(content));
    await chmod(path, mode);
    return path;
  }

  async function refusal(path: string): Promise<UserError> {
    const err = await readKeyring(path).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(UserError);
    return err as UserError;
  }

  const good = (key = validKey) => ({ format: 'egress-keyring/1', active: 1, keys: [{ version: 1, created_at: NOW.toISOString(), key }] });

  it('reads a valid 0600 keyring', async () => {
    const keyring = await readKeyring(await keyFile(good()));
    expect(keyring.active).toBe(1);
    expect(keyring.get(1)!.export().toString('base64')).toBe(validKey);
    expect(keyring.versions()).toEqual([{ version: 1, createdAt: NOW.toISOString(), active: true }]);
    expect(JSON.stringify({ keyring })).not.toContain(validKey);
  });

  it.each([0o644, 0o640, 0o604, 0o660])('refuses mode %s, telling how to fix it without printing the key', async (mode) => {
    const path = await keyFile(good(), mode);
    const err = await refusal(path);
    expect(err.message).toContain('chmod 600');
    expect(err.message).toContain(path);
    expect(err.message).not.toContain(validKey);
  });

  it('refuses a missing file and a directory', async () => {
    const dir = await tempDir();
    expect((await refusal(join(dir, 'nope.key'))).message).toContain('master-key init');
    await refusal(dir);
  });

  it.each([
    ['malformed JSON', `{"format":"egress-keyring/1","keys":[{"key":"${validKey}"`],
    ['empty file', ''],
    ['a JSON string', JSON.stringify(validKey)],
    ['null', 'null'],
    ['wrong format', { ...good(), format: 'egress-keyring/2' }],
    ['no format', { active: 1, keys: good().keys }],
    ['no keys', { ...good(), keys: [] }],
    ['a 31-byte key', good(randomBytes(31).toString('base64'))],
    ['a 33-byte key', good(randomBytes(33).toString('base64'))],
    ['an all-zero key', good(Buffer.alloc(32).toString('base64'))],
    ['a key that is not base64', good('!'.repeat(44))],
    ['a non-canonical base64 key', good(validKey.replace(/=*$/, ''))],
    ['an active version with no key', { ...good(), active: 2 }],
    ['no active version', { format: 'egress-keyring/1', keys: good().keys }],
    ['a key with no version', { ...good(), keys: [{ key: validKey }] }],
    ['duplicate versions', { ...good(), keys: [...good().keys, ...good().keys] }],
  ])('refuses %s, without printing key material', async (_what, content) => {
    const err = await refusal(await keyFile(content));
    expect(err.message).toContain('not a valid keyring');
    expect(err.message).not.toContain(validKey);
    expect(err.message).not.toContain(validKey.slice(0, 16));
  });
});

describe('createKeyring', () => {
  it('writes a 0600 file that readKeyring reads back with the same key', async () => {
    const path = join(await tempDir(), 'nested', 'master.key');
    const created = await createKeyring(path);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    const read = await readKeyring(path);
    expect(read.active).toBe(1);
    expect(read.get(1)!.equals(created.get(1)!)).toBe(true);
    expect(created.get(1)!.export().every((b) => b === 0)).toBe(false);
    expect(created.get(1)!.export()).toHaveLength(KEY_BYTES);
  });

  it('refuses to overwrite an existing file and leaves it unchanged', async () => {
    const path = join(await tempDir(), 'master.key');
    await createKeyring(path);
    const before = await readFile(path, 'utf8');
    await expect(createKeyring(path)).rejects.toThrow(/already exists/);
    await expect(createKeyring(path)).rejects.toBeInstanceOf(UserError);
    expect(await readFile(path, 'utf8')).toBe(before);
  });

  it('two keyrings never share a key', async () => {
    const dir = await tempDir();
    const a = await createKeyring(join(dir, 'a.key'));
    const b = await createKeyring(join(dir, 'b.key'));
    expect(a.get(1)!.equals(b.get(1)!)).toBe(false);
  });
});
