import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { UserError } from '../errors.ts';

/**
 * The TLS listener's files (EGRESS_TLS_CERT, EGRESS_TLS_KEY, EGRESS_CLIENT_CA), read and parsed
 * with errors that name the setting and the file: OpenSSL's own ("PEM routines::no start line")
 * name neither. Messages never quote the files (a certificate's subject at most).
 */
export interface ListenerFile {
  readonly setting: string;
  readonly path: string;
  readonly pem: string;
}

export async function readListenerFile(path: string, setting: string): Promise<ListenerFile> {
  const pem = await readFile(path, 'utf8').catch((err: NodeJS.ErrnoException) => {
    throw new UserError(`${setting} ${path} cannot be read (${err.code ?? 'error'})`);
  });
  return { setting, path, pem };
}

/** The file's (first) certificate: the listener's own, whose chain may follow it. */
export function listenerCertificate(file: ListenerFile): X509Certificate {
  try {
    return new X509Certificate(file.pem);
  } catch {
    throw new UserError(`${file.setting} ${file.path} holds no PEM certificate`);
  }
}

export function listenerPrivateKey(file: ListenerFile): KeyObject {
  try {
    return createPrivateKey(file.pem);
  } catch {
    throw new UserError(`${file.setting} ${file.path} holds no PEM private key (an encrypted key is not supported)`);
  }
}

/**
 * The client CAs: every certificate in EGRESS_CLIENT_CA (a bundle during a CA change-over), each a
 * CA. A certificate that is not one (a caller's or the listener's own, given by mistake) would
 * start a listener that accepts no certificate at all, and says so only at every request.
 */
export function listenerClientCas(file: ListenerFile): readonly X509Certificate[] {
  const blocks = file.pem.match(/-----BEGIN CERTIFICATE-----[^-]*-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw new UserError(`${file.setting} ${file.path} holds no PEM certificate`);
  return blocks.map((block, i) => {
    const which = `${file.setting} ${file.path}: certificate ${i + 1} of ${blocks.length}`;
    let cert: X509Certificate;
    try {
      cert = new X509Certificate(block);
    } catch {
      throw new UserError(`${which} is not a valid PEM certificate`);
    }
    // OpenSSL's X509_check_ca: basicConstraints CA:TRUE, and keyCertSign when a keyUsage is present.
    if (!cert.ca) throw new UserError(`${which} (${cert.subject.replaceAll('\n', ', ')}) is not a CA (it needs basicConstraints CA:TRUE and, if it has a keyUsage, keyCertSign); name the CA that issues the caller certificates`);
    return cert;
  });
}
