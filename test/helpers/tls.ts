import forge from 'node-forge';

export interface TestPki {
  readonly caCert: string;
  readonly serverKey: string;
  readonly serverCert: string;
}

/** A throwaway CA and a server certificate for 127.0.0.1 / localhost, made with node-forge. */
export interface PkiOptions {
  readonly commonName?: string;
  /** DNS names and IPs the server certificate is valid for. */
  readonly dnsNames?: readonly string[];
  readonly ips?: readonly string[];
  /** Validity of the server certificate relative to now, in ms. */
  readonly notBeforeMs?: number;
  readonly notAfterMs?: number;
}

export function makeTestPki(options: PkiOptions = {}): TestPki {
  const commonName = options.commonName ?? 'egress test CA';
  const caKeys = forge.pki.rsa.generateKeyPair(2048);
  const ca = forge.pki.createCertificate();
  ca.publicKey = caKeys.publicKey;
  ca.serialNumber = '01';
  ca.validity.notBefore = new Date(Date.now() - 60_000);
  ca.validity.notAfter = new Date(Date.now() + 86_400_000);
  const caName = [{ name: 'commonName', value: commonName }];
  ca.setSubject(caName);
  ca.setIssuer(caName);
  ca.setExtensions([{ name: 'basicConstraints', cA: true, critical: true }, { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true }]);
  ca.sign(caKeys.privateKey, forge.md.sha256.create());

  const keys = forge.pki.rsa.generateKeyPair(2048);
  const cert = forge.pki.createCertificate();
  cert.publicKey = keys.publicKey;
  cert.serialNumber = '02';
  cert.validity.notBefore = new Date(Date.now() + (options.notBeforeMs ?? -60_000));
  cert.validity.notAfter = new Date(Date.now() + (options.notAfterMs ?? 86_400_000));
  cert.setSubject([{ name: 'commonName', value: options.dnsNames?.[0] ?? 'localhost' }]);
  cert.setIssuer(caName);
  cert.setExtensions([
    { name: 'basicConstraints', cA: false },
    { name: 'extKeyUsage', serverAuth: true },
    {
      name: 'subjectAltName',
      altNames: [...(options.dnsNames ?? ['localhost']).map((value) => ({ type: 2, value })), ...(options.ips ?? ['127.0.0.1']).map((ip) => ({ type: 7, ip }))],
    },
  ]);
  cert.sign(caKeys.privateKey, forge.md.sha256.create());
  return { caCert: forge.pki.certificateToPem(ca), serverKey: forge.pki.privateKeyToPem(keys.privateKey), serverCert: forge.pki.certificateToPem(cert) };
}
