import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { UserError } from '../errors.ts';

/**
 * The TLS listener's files (EGRESS_TLS_CERT, EGRESS_TLS_KEY, EGRESS_CLIENT_CA), read and parsed
 * with errors that name the setting and the file: OpenSSL's own ("PEM routines::no start line")
 * name neither. Messages never quote the files.
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

/** The file's (first) certificate. */
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
