import { createPrivateKey, generateKeyPairSync, randomBytes, sign, X509Certificate, type KeyObject } from 'node:crypto';
import { lstat, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { replaceFiles } from '../store/temp-files.ts';
import type Forge from 'node-forge';
import { loadForge } from './forge.ts';
import { UserError } from '../errors.ts';

/**
 * The forward-mode CA. Services trust certs/ca.pem; so that trusting it cannot be abused for any
 * other site, the CA carries X.509 name constraints (RFC 5280 §4.2.1.10) permitting only the hosts
 * the route files name (plus localhost). Certificates are assembled with node-forge and signed
 * with node:crypto over the TBS bytes: forge's pure-JS RSA signing takes ~180 ms a certificate.
 */

export interface CaFiles {
  readonly certPem: string;
  readonly key: KeyObject;
  readonly cert: Forge.pki.Certificate;
}

export const CA_FILES = { cert: 'ca.pem', key: 'ca.key' } as const;

function rsaKeyPair(): { publicPem: string; privateKey: KeyObject } {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { publicPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(), privateKey };
}

/** Sign a forge certificate's TBS bytes with a node:crypto RSA key (sha256WithRSAEncryption). */
function signWith(cert: Forge.pki.Certificate, key: KeyObject): void {
  const { pki, md, asn1 } = loadForge();
  const oid = pki.oids.sha256WithRSAEncryption!;
  cert.signatureOid = oid;
  cert.siginfo.algorithmOid = oid;
  (cert as unknown as { md: Forge.md.MessageDigest }).md = md.sha256.create();
  const tbs = (pki as unknown as { getTBSCertificate(c: Forge.pki.Certificate): Forge.asn1.Asn1 }).getTBSCertificate(cert);
  (cert as unknown as { tbsCertificate: Forge.asn1.Asn1 }).tbsCertificate = tbs;
  const der = Buffer.from(asn1.toDer(tbs).getBytes(), 'binary');
  cert.signature = sign('sha256', der, key).toString('binary');
}

const NAME_CONSTRAINTS_OID = '2.5.29.30';

/** permittedSubtrees of dNSName entries: NameConstraints ::= SEQUENCE { permittedSubtrees [0] GeneralSubtrees }. */
function nameConstraints(hosts: readonly string[]): Forge.asn1.Asn1 {
  const { asn1 } = loadForge();
  const subtrees = hosts.map((host) =>
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
      // GeneralName dNSName [2] IA5String (implicit tag)
      asn1.create(asn1.Class.CONTEXT_SPECIFIC, 2, false, host),
    ]));
  return asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [asn1.create(asn1.Class.CONTEXT_SPECIFIC, 0, true, subtrees)]);
}

/**
 * 16 random bytes, the first in 0x01–0x7f: positive, and minimal DER (a first byte of 0x00 is not,
 * and Node reports such a serial without it, which revocation once failed to match).
 */
export function serial(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! & 0x7f) || 0x01;
  return bytes.toString('hex');
}

export function createCa(hosts: readonly string[], now = new Date()): { certPem: string; keyPem: string } {
  const { pki } = loadForge();
  const { publicPem, privateKey } = rsaKeyPair();
  const cert = pki.createCertificate();
  cert.publicKey = pki.publicKeyFromPem(publicPem);
  cert.serialNumber = serial();
  cert.validity.notBefore = new Date(now.getTime() - 60_000);
  cert.validity.notAfter = new Date(now.getTime() + 5 * 365 * 86_400_000);
  const name = [{ name: 'commonName', value: 'egress-proxy forward-mode CA' }, { name: 'organizationName', value: 'egress-proxy' }];
  cert.setSubject(name);
  cert.setIssuer(name);
  const permitted = [...new Set([...hosts, 'localhost'])].sort();
  cert.setExtensions([
    { name: 'basicConstraints', cA: true, pathLenConstraint: 0, critical: true },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
    { name: 'subjectKeyIdentifier' },
    { id: NAME_CONSTRAINTS_OID, critical: true, value: nameConstraints(permitted) },
  ]);
  signWith(cert, privateKey);
  return { certPem: pki.certificateToPem(cert), keyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString() };
}

export async function writeCa(dir: string, files: { certPem: string; keyPem: string }, overwrite: boolean): Promise<void> {
  // Both or neither: a new key written beside a ca.pem that is kept (a lost key, or a host given
  // only the public ca.pem) would sign with a key that ca.pem does not name.
  if (!overwrite) {
    for (const name of [CA_FILES.key, CA_FILES.cert]) {
      if (await lstat(join(dir, name)).then(() => true, () => false)) throw new UserError(`${join(dir, name)} already exists; use "certs init --refresh" to re-issue the CA`);
    }
  }
  // Both in full before either takes its name: a refresh that fails half-way (a full disk) leaves
  // the old pair as it was, not a truncated key or a new key beside the old certificate.
  await replaceFiles([
    { path: join(dir, CA_FILES.key), text: files.keyPem, mode: 0o600 },
    { path: join(dir, CA_FILES.cert), text: files.certPem, mode: 0o644 },
  ], (err) => new UserError(`the CA could not be written in ${dir} (${(err as NodeJS.ErrnoException).code ?? 'error'}); the files there are unchanged`));
}

/**
 * Read the CA; its key must be readable by its owner only, and must be the key of ca.pem (one from
 * another CA would sign leaves and caller certificates that nobody trusting ca.pem accepts).
 * Undefined when there is no CA.
 */
export async function readCa(dir: string): Promise<CaFiles | undefined> {
  const keyPath = join(dir, CA_FILES.key);
  const certPath = join(dir, CA_FILES.cert);
  const info = await stat(keyPath).catch(() => undefined);
  if (!info) return undefined;
  if ((info.mode & 0o077) !== 0) throw new UserError(`${keyPath} is readable by group or others; run "chmod 600 ${keyPath}"`);
  const read = (path: string) => readFile(path, 'utf8').catch((err: NodeJS.ErrnoException) => {
    throw new UserError(`${path} cannot be read (${err.code ?? 'error'}); restore the CA pair from a backup, or run "certs init --refresh" for a new one`);
  });
  const certPem = await read(certPath);
  const keyPem = await read(keyPath);
  let cert: X509Certificate;
  let key: KeyObject;
  try {
    cert = new X509Certificate(certPem);
  } catch {
    throw new UserError(`${certPath} is not a PEM certificate; restore the CA pair from a backup, or run "certs init --refresh" for a new one`);
  }
  try {
    key = createPrivateKey(keyPem);
  } catch {
    throw new UserError(`${keyPath} is not a PEM private key; restore the CA pair from a backup, or run "certs init --refresh" for a new one`);
  }
  if (!cert.checkPrivateKey(key)) throw new UserError(`${keyPath} does not belong to the certificate in ${certPath}; restore the pair from a backup, or run "certs init --refresh" for a new CA`);
  return { certPem, key, cert: loadForge().pki.certificateFromPem(certPem) };
}

/**
 * Leaf certificates for intercepted hosts: one key pair for all of them, short-lived leaves
 * (1 day), cached per host until an hour before they expire. A leaf is only ever minted for a host
 * a route names (the caller checks that first).
 */
export class LeafMinter {
  readonly #ca: CaFiles;
  readonly #keyPem: string;
  readonly #publicKey: Forge.pki.PublicKey;
  readonly #cache = new Map<string, { certPem: string; until: number }>();

  constructor(ca: CaFiles) {
    this.#ca = ca;
    const { publicPem, privateKey } = rsaKeyPair();
    this.#keyPem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    this.#publicKey = loadForge().pki.publicKeyFromPem(publicPem);
  }

  get keyPem(): string {
    return this.#keyPem;
  }

  /**
   * Whether the CA's name constraints let it vouch for `host`. They are the hosts the routes named
   * when the CA was made: a leaf for a host a route named later fails every client's verification
   * until "certs init --refresh".
   */
  covers(host: string): boolean {
    return dnsNamePermitted(this.#ca.cert, host);
  }

  get caPem(): string {
    return this.#ca.certPem;
  }

  leaf(host: string, now = Date.now()): string {
    const cached = this.#cache.get(host);
    if (cached && cached.until > now) return cached.certPem;
    const { pki } = loadForge();
    const cert = pki.createCertificate();
    cert.publicKey = this.#publicKey;
    cert.serialNumber = serial();
    cert.validity.notBefore = new Date(now - 60_000);
    cert.validity.notAfter = new Date(now + 86_400_000);
    cert.setSubject([{ name: 'commonName', value: host }]);
    cert.setIssuer(this.#ca.cert.subject.attributes);
    cert.setExtensions([
      { name: 'basicConstraints', cA: false, critical: true },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
      { name: 'extKeyUsage', serverAuth: true },
      { name: 'subjectAltName', altNames: [{ type: 2, value: host }] },
    ]);
    signWith(cert, this.#ca.key);
    const certPem = pki.certificateToPem(cert);
    this.#cache.set(host, { certPem, until: now + 86_400_000 - 3_600_000 });
    return certPem;
  }

  minted(): readonly string[] {
    return [...this.#cache.keys()];
  }
}

type Subtree = { readonly type: number; readonly value: unknown };

/**
 * RFC 5280 §4.2.1.10 for a dNSName: a constraint "example.com" covers it and every name below it
 * (".example.com", OpenSSL's form, only the names below). A CA without dNSName subtrees in its
 * permitted list is not constrained for host names.
 */
function dnsNamePermitted(ca: Forge.pki.Certificate, host: string): boolean {
  const within = (base: Subtree) => {
    const name = String(base.value).toLowerCase();
    return name === '' || (name.startsWith('.') ? host.endsWith(name) : host === name || host.endsWith(`.${name}`));
  };
  for (const ext of ca.extensions as { id?: string; permittedSubtrees?: Subtree[]; excludedSubtrees?: Subtree[] }[]) {
    if (ext.id !== NAME_CONSTRAINTS_OID) continue;
    // forge leaves a value it cannot read unparsed; clients refuse such a CA anyway.
    if (!ext.permittedSubtrees || !ext.excludedSubtrees) return false;
    const permitted = ext.permittedSubtrees.filter((t) => t.type === 2);
    if (permitted.length > 0 && !permitted.some(within)) return false;
    if (ext.excludedSubtrees.some((t) => t.type === 2 && within(t))) return false;
  }
  return true;
}

/** The one identity SAN of a caller certificate: a URI naming the caller. */
export const CALLER_URI_PREFIX = 'spiffe://egress-proxy/caller/';

/**
 * How far back a caller certificate's notBefore is set from the moment it is issued (a little clock
 * skew between hosts). A certificate identifies a caller only if it was issued after the caller was
 * (last) added to the store: see callerActive.
 */
export const CALLER_CERT_BACKDATE_MS = 60_000;

/**
 * A client certificate for an mTLS caller, signed by the CA: 90 days, one URI SAN, CN = the name.
 * A name with a dot has no CN: OpenSSL reads a dotted CN of a certificate without a DNS SAN as a
 * host name and checks it against the CA's name constraints (the route hosts), so the TLS listener
 * would refuse every certificate of a caller named `team.sync` (PERMITTED_VIOLATION).
 */
export function issueCallerCertificate(ca: CaFiles, name: string, now = new Date()): { certPem: string; keyPem: string; serial: string } {
  const { pki } = loadForge();
  const { publicPem, privateKey } = rsaKeyPair();
  const cert = pki.createCertificate();
  cert.publicKey = pki.publicKeyFromPem(publicPem);
  cert.serialNumber = serial();
  cert.validity.notBefore = new Date(now.getTime() - CALLER_CERT_BACKDATE_MS);
  cert.validity.notAfter = new Date(now.getTime() + 90 * 86_400_000);
  cert.setSubject(name.includes('.') ? [{ name: 'organizationName', value: 'egress-proxy caller' }] : [{ name: 'commonName', value: name }]);
  cert.setIssuer(ca.cert.subject.attributes);
  // The CA's key identifier (RFC 5280 §4.2.1.1): `certs init --refresh` makes a CA with the same
  // name, and with both in EGRESS_CLIENT_CA during a change-over, OpenSSL picks the issuer by name
  // and then by this; without it, it may try the other CA's key and refuse the certificate.
  const caKeyId = (ca.cert.getExtension('subjectKeyIdentifier') as { subjectKeyIdentifier?: string } | undefined)?.subjectKeyIdentifier;
  cert.setExtensions([
    { name: 'basicConstraints', cA: false, critical: true },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
    { name: 'extKeyUsage', clientAuth: true },
    { name: 'subjectAltName', altNames: [{ type: 6, value: `${CALLER_URI_PREFIX}${name}` }] },
    ...(caKeyId ? [{ name: 'authorityKeyIdentifier', keyIdentifier: loadForge().util.hexToBytes(caKeyId) }] : []),
  ]);
  signWith(cert, ca.key);
  return { certPem: pki.certificateToPem(cert), keyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), serial: cert.serialNumber };
}
