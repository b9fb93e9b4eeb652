import { createCipheriv, createDecipheriv, createSecretKey, KeyObject, randomBytes } from 'node:crypto';

/**
 * AES-256-GCM (NIST SP 800-38D) with a 96-bit random nonce and a full 16-byte tag. Every credential
 * version has its own random data key, so no key comes near the 2^32 random-nonce limit.
 */

export interface Sealed {
  readonly nonce: string;
  readonly ct: string;
  readonly tag: string;
}

const NONCE_BYTES = 12;
const TAG_BYTES = 16;
export const KEY_BYTES = 32;

export class IntegrityError extends Error {
  constructor(what: string) {
    super(`integrity check failed: ${what}`);
    this.name = 'IntegrityError';
  }
}

/**
 * Associated data as a JSON tuple, never a concatenation: ("a|b", "c") and ("a", "b|c") must differ.
 */
export function aad(purpose: 'fields' | 'dek', credentialId: string, version: number, kekVersion?: number): Buffer {
  return Buffer.from(JSON.stringify(['egress-proxy/v1', purpose, credentialId, version, kekVersion ?? null]), 'utf8');
}

/** A key for AES-256-GCM: raw bytes, or a KeyObject (prepared once, cheaper on every use). */
export type AesKey = Buffer | KeyObject;

export function toKeyObject(key: Buffer): KeyObject {
  if (key.length !== KEY_BYTES) throw new Error('AES-256-GCM needs a 32-byte key');
  return createSecretKey(key);
}

export function seal(key: AesKey, plaintext: Buffer, associated: Buffer): Sealed {
  if ((key instanceof KeyObject ? key.symmetricKeySize : key.length) !== KEY_BYTES) throw new Error('AES-256-GCM needs a 32-byte key');
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(associated);
  const ct = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return { nonce: nonce.toString('base64'), ct: ct.toString('base64'), tag: cipher.getAuthTag().toString('base64') };
}

export function open(key: AesKey, sealed: Sealed, associated: Buffer, what: string): Buffer {
  const nonce = decodeExact(sealed.nonce, NONCE_BYTES, what);
  // Node 24 only warns about short tags (DEP0182); a tag of any other length is refused here.
  const tag = decodeExact(sealed.tag, TAG_BYTES, what);
  if (typeof sealed.ct !== 'string') throw new IntegrityError(what);
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
    decipher.setAAD(associated);
    decipher.setAuthTag(tag);
    return Buffer.concat([decipher.update(Buffer.from(sealed.ct, 'base64')), decipher.final()]);
  } catch {
    throw new IntegrityError(what);
  }
}

function decodeExact(text: unknown, bytes: number, what: string): Buffer {
  if (typeof text !== 'string') throw new IntegrityError(what);
  const buf = Buffer.from(text, 'base64');
  if (buf.length !== bytes || buf.toString('base64') !== text) throw new IntegrityError(what);
  return buf;
}
