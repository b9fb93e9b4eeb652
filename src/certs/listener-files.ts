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

/**
 * OpenSSL checks a certificate's dates in a full handshake only: a keep-alive connection outlives
 * the certificate, and a resumed session keeps the verdict of the handshake that made it (AUTH-03).
 * So the TLS listener checks them again at every request, for the caller's certificate and its CA.
 */
export function outsideValidity(cert: X509Certificate, now: number): 'has expired' | 'is not yet valid' | undefined {
  if (now > cert.validToDate.getTime()) return 'has expired';
  if (now < cert.validFromDate.getTime()) return 'is not yet valid';
  return undefined;
}

const DAY_MS = 86_400_000;
const SOON_MS = 30 * DAY_MS;

/** The listener's files, parsed and checked (checkListenerFiles) at start and at each reload, for what uses them after. */
export interface CheckedListenerFiles {
  readonly cert: ListenerFile;
  readonly certificate: X509Certificate;
  readonly key: ListenerFile;
  readonly clientCa: ListenerFile;
  readonly clientCas: readonly X509Certificate[];
}

/**
 * For the log at start and at each reload: the listener's certificate and the client CAs that are
 * outside their validity or within 30 days of its end. Warned, not refused: an expired CA kept in a
 * bundle while its successor takes over is normal, and token callers do not need either.
 */
export function listenerDateWarnings({ cert, certificate, clientCa, clientCas }: CheckedListenerFiles, now: number): { setting: string; message: string }[] {
  const note = (c: X509Certificate, consequence: string): string | undefined => {
    const outside = outsideValidity(c, now);
    if (outside) return `${outside} (${outside === 'has expired' ? c.validTo : c.validFrom}): ${consequence}`;
    const left = c.validToDate.getTime() - now;
    if (left >= SOON_MS) return undefined;
    const days = Math.floor(left / DAY_MS);
    return `expires in ${days} day${days === 1 ? '' : 's'} (${c.validTo}): after that, ${consequence}`;
  };
  const subject = (c: X509Certificate): string => c.subject.replaceAll('\n', ', ');
  const warnings: { setting: string; message: string }[] = [];
  const ownNote = note(certificate, 'callers\' TLS clients refuse the listener');
  if (ownNote) warnings.push({ setting: cert.setting, message: `${cert.setting} ${cert.path} (${subject(certificate)}) ${ownNote}` });
  clientCas.forEach((ca, i) => {
    const caNote = note(ca, 'the caller certificates it issued are refused');
    if (caNote) warnings.push({ setting: clientCa.setting, message: `${clientCa.setting} ${clientCa.path}: certificate ${i + 1} of ${clientCas.length} (${subject(ca)}) ${caNote}` });
  });
  return warnings;
}
