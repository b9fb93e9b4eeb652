import { createPrivateKey, createPublicKey, X509Certificate, type KeyObject } from 'node:crypto';
import type Forge from 'node-forge';
import { loadForge } from '../certs/forge.ts';
import { UserError } from '../errors.ts';

/** Client certificate material as the TLS stack takes it. */
export type ClientCertificate =
  | { readonly kind: 'pem'; readonly cert: string; readonly key: string }
  | { readonly kind: 'pkcs12'; readonly pfx: Buffer; readonly passphrase: string };

const PEM_CERT = '-----BEGIN CERTIFICATE-----';
const PEM_KEY = /-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----/;

/**
 * Check certificate material when it is stored, not at request time: it must parse, each
 * certificate must have its private key among the fields, and be valid now. A credential may hold
 * several certificates (paper and live, each route presenting its own), in any field order. A
 * private key that belongs to no certificate is a signing key (coinbase_jwt, truelayer_signing):
 * it must parse. Fields that hold no such material pass untouched. Messages never quote the material.
 */
export function checkCertificateFields(fields: Readonly<Record<string, string>>, now = new Date()): void {
  const certFields = Object.keys(fields).filter((k) => fields[k]!.includes(PEM_CERT));
  const keyFields = Object.keys(fields).filter((k) => PEM_KEY.test(fields[k]!));
  if (certFields.length > 0 && keyFields.length === 0) throw new UserError(`the credential has a certificate (field "${certFields[0]}") without its private key`);
  const keys = keyFields.map((field) => ({ field, key: privateKeyOf(fields[field]!) }));
  const paired = new Set<string>();
  for (const certField of certFields) paired.add(checkPem(fields[certField]!, keys, certField, now));
  for (const { field } of keys) if (!paired.has(field)) checkSigningKey(fields[field]!, field);
  for (const name of ['pkcs12', 'p12', 'pfx']) {
    if (fields[name] !== undefined) checkPkcs12(fields[name]!, fields.passphrase ?? '', name, now);
  }
}

function privateKeyOf(pem: string): KeyObject | undefined {
  try {
    return createPrivateKey(pem);
  } catch {
    return undefined;
  }
}

/** Checks the certificate and returns the field of the private key that belongs to it. */
function checkPem(certPem: string, keys: readonly { field: string; key: KeyObject | undefined }[], field: string, now: Date): string {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(certPem);
  } catch {
    throw new UserError(`field "${field}" is not a valid PEM certificate`);
  }
  const match = keys.find(({ key }) => key !== undefined && cert.checkPrivateKey(key));
  if (!match) {
    if (keys.length === 1 && keys[0]!.key === undefined) throw new UserError('the private key is not a valid PEM private key (an encrypted key is not supported: use PKCS#12 with a passphrase)');
    throw new UserError(keys.length === 1 ? `the private key does not belong to the certificate in field "${field}"` : `none of the private keys (fields ${keys.map((k) => `"${k.field}"`).join(', ')}) belongs to the certificate in field "${field}"`);
  }
  checkValidity(new Date(cert.validFrom), new Date(cert.validTo), field, now);
  return match.field;
}

function checkSigningKey(keyPem: string, field: string): void {
  try {
    // A PEM pasted from a JSON download (Coinbase's) may keep its "\n" escapes; the signers read it so too.
    createPrivateKey(keyPem.includes('\\n') ? keyPem.replace(/\\n/g, '\n') : keyPem);
  } catch {
    throw new UserError(`field "${field}" is not a valid PEM private key (an encrypted key is not supported)`);
  }
}

function checkPkcs12(base64: string, passphrase: string, field: string, now: Date): void {
  const { util, pkcs12, asn1, pki } = loadForge();
  let p12: Forge.pkcs12.Pkcs12Pfx;
  try {
    const der = util.decode64(base64.replace(/\s+/g, ''));
    p12 = pkcs12.pkcs12FromAsn1(asn1.fromDer(der), passphrase);
  } catch {
    throw new UserError(`field "${field}" is not a PKCS#12 bundle that opens with the given passphrase`);
  }
  const bags = (type: string) => p12.getBags({ bagType: type })[type] ?? [];
  const certs = bags(pki.oids.certBag!);
  const keys = [...bags(pki.oids.pkcs8ShroudedKeyBag!), ...bags(pki.oids.keyBag!)];
  const key = keys[0]?.key;
  if (certs.length === 0 || !key) throw new UserError(`the PKCS#12 bundle in field "${field}" needs a certificate and its private key`);
  // The leaf is the certificate whose public key is the key's (compared as SPKI), wherever it is
  // in the bundle: the TLS stack presents that one, and a chain may list its CA first.
  const keySpki = createPublicKey(createPrivateKey(pki.privateKeyToPem(key as Forge.pki.rsa.PrivateKey))).export({ type: 'spki', format: 'der' });
  const cert = certs.map((bag) => bag.cert).find((c) => c !== undefined && createPublicKey(pki.publicKeyToPem(c.publicKey)).export({ type: 'spki', format: 'der' }).equals(keySpki));
  if (!cert) throw new UserError(`the private key in the PKCS#12 bundle in field "${field}" does not belong to its certificate`);
  checkValidity(cert.validity.notBefore, cert.validity.notAfter, field, now);
}

function checkValidity(from: Date, to: Date, field: string, now: Date): void {
  if (now < from) throw new UserError(`the certificate in field "${field}" is not valid until ${from.toISOString()}`);
  if (now > to) throw new UserError(`the certificate in field "${field}" expired on ${to.toISOString()}`);
}
