import { X509Certificate } from 'node:crypto';
import { createServer, type Server } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { TLSSocket } from 'node:tls';
import type { CompiledConfig } from '../config/compile-routes.ts';
import { CALLER_URI_PREFIX } from '../certs/ca.ts';
import { listenerCertificate, listenerClientCas, listenerPrivateKey, outsideValidity, type CheckedListenerFiles, type ListenerFile } from '../certs/listener-files.ts';
import { RevocationList, serialKey } from '../certs/revocations.ts';
import { ProxyError, UserError } from '../errors.ts';
import { handleRequest } from '../pipeline/index.ts';
import type { Services } from '../pipeline/services.ts';
import { CALLER_HTTP, answerClientError, closeIfSilent, refuseConnect, servePipeline } from './reverse.ts';

/** TLS 1.2+ with AEAD suites only (TLS 1.3 suites are all AEAD), and in TLS 1.2 only with ECDHE (forward secrecy). */
const CIPHERS = ['TLS_AES_256_GCM_SHA384', 'TLS_CHACHA20_POLY1305_SHA256', 'TLS_AES_128_GCM_SHA256', 'ECDHE-ECDSA-AES256-GCM-SHA384', 'ECDHE-RSA-AES256-GCM-SHA384', 'ECDHE-ECDSA-CHACHA20-POLY1305', 'ECDHE-RSA-CHACHA20-POLY1305', 'ECDHE-ECDSA-AES128-GCM-SHA256', 'ECDHE-RSA-AES128-GCM-SHA256'].join(':');

/**
 * What every TLS endpoint that callers talk to offers: the TLS listener, and the TLS the proxy
 * terminates inside forward-mode tunnels. Node's defaults would add CBC suites and RSA key exchange.
 */
export const CALLER_TLS = Object.freeze({ minVersion: 'TLSv1.2', ciphers: CIPHERS, honorCipherOrder: true } as const);

export interface CertIdentity {
  readonly caller?: string;
  /** Why a presented certificate was refused. */
  readonly refused?: string;
  readonly serial?: string;
  /** The certificate's notBefore, epoch ms: it must not predate the caller's (last) add to the store. */
  readonly notBefore?: number;
}

/** The client CAs (EGRESS_CLIENT_CA, one or a bundle) by their SHA-256 fingerprint. */
export type PinnedCas = ReadonlyMap<string, X509Certificate>;

/**
 * The caller named by a client certificate, or why it is refused. Only a leaf issued directly by
 * one of our CAs counts (depth 1: AUTH-05, a CA:TRUE leaf minting identities), with exactly one
 * identity SAN whose name matches its CN (a dotted name has none), it and its CA inside their
 * validity periods now, and a serial that is not revoked.
 */
export function certIdentity(socket: TLSSocket, pinned: PinnedCas, revoked: RevocationList): CertIdentity {
  const peer = socket.getPeerCertificate(true);
  if (!peer || Object.keys(peer).length === 0) return {};
  if (!socket.authorized) return { refused: `certificate not accepted (${String(socket.authorizationError ?? 'unverified')})` };
  const leaf = new X509Certificate(peer.raw);
  if (leaf.ca) return { refused: 'a CA certificate cannot be a caller identity' };
  const now = Date.now();
  const leafDates = outsideValidity(leaf, now);
  if (leafDates) return { refused: `the certificate ${leafDates}` };
  const issuer = peer.issuerCertificate;
  const ca = issuer && issuer !== peer ? pinned.get(issuer.fingerprint256) : undefined;
  if (!ca) return { refused: 'the certificate was not issued directly by the egress CA' };
  const caDates = outsideValidity(ca, now);
  if (caDates) return { refused: `the CA that issued the certificate ${caDates}` };
  const uris = (leaf.subjectAltName ?? '').split(',').map((s) => s.trim()).filter((s) => s.startsWith('URI:')).map((s) => s.slice(4));
  if (uris.length !== 1 || !uris[0]!.startsWith(CALLER_URI_PREFIX)) return { refused: 'the certificate must carry exactly one identity URI SAN' };
  const name = uris[0]!.slice(CALLER_URI_PREFIX.length);
  // A CN must say the same name; issue-caller leaves it out for a name with a dot (see issueCallerCertificate).
  const cn = /(?:^|\n)CN=([^\n]*)/.exec(leaf.subject)?.[1];
  if (cn !== undefined ? cn !== name : !name.includes('.')) return { refused: 'the certificate CN and identity SAN disagree' };
  const serial = serialKey(leaf.serialNumber);
  if (revoked.has(serial)) return { refused: 'the certificate is revoked', serial };
  return { caller: name, serial, notBefore: Date.parse(leaf.validFrom) };
}

/** The listener's certificate, key and client CAs, checked before they are used (listener-files.ts), and parsed for what uses them. */
export function checkListenerFiles(cert: ListenerFile, key: ListenerFile, clientCa: ListenerFile): CheckedListenerFiles {
  const certificate = listenerCertificate(cert);
  const clientCas = listenerClientCas(clientCa);
  if (!certificate.checkPrivateKey(listenerPrivateKey(key))) throw new UserError(`${key.setting} ${key.path} does not belong to the certificate in ${cert.setting} ${cert.path}`);
  return { cert, certificate, key, clientCa, clientCas };
}

/**
 * The secure context's options, at start and at each reload: setSecureContext resets every option
 * it is not given (the cipher list and the protocol floor among them) to Node's defaults.
 */
function contextOptions(files: CheckedListenerFiles) {
  return { cert: files.cert.pem, key: files.key.pem, ca: files.clientCa.pem, ...CALLER_TLS };
}

/** Every CA in the file is pinned, as every one is trusted in the TLS context (`ca` above). */
function pinnedCas(files: CheckedListenerFiles): PinnedCas {
  return new Map(files.clientCas.map((ca) => [ca.fingerprint256, ca]));
}

export interface TlsListener {
  readonly server: Server;
  /**
   * Serve new handshakes with these files (checked: checkListenerFiles). Connections already open
   * keep the certificate they were made with; the client CAs pinned for every request move with
   * the context, so a CA taken out of EGRESS_CLIENT_CA vouches for no one from then on, on a
   * connection or a TLS session made before included (a new context has new session ticket keys).
   */
  use(files: CheckedListenerFiles): void;
  close(): void;
}

/** The TLS listener: callers identified by a client certificate from our CA, or by a token as on the plain listener. */
export async function createTlsServer(options: { files: CheckedListenerFiles; certsDir: string; onRevocationsDamaged?: (reason: string) => void }, getConfig: () => CompiledConfig, services: Services): Promise<TlsListener> {
  let pinned = pinnedCas(options.files);
  const sockets = new Set<TLSSocket>();
  const serialOf = new WeakMap<TLSSocket, string>();
  // A revocation closes the caller's open connections at once (AUTH-07).
  const revoked = new RevocationList(options.certsDir, (serials) => {
    for (const s of sockets) if (serials.has(serialOf.get(s) ?? '')) s.destroy();
  }, options.onRevocationsDamaged);
  await revoked.start();
  const server = createServer({
    ...contextOptions(options.files),
    requestCert: true,
    // Token callers have no certificate; a certificate that fails is refused per request, below.
    rejectUnauthorized: false,
    handshakeTimeout: 10_000,
    ...CALLER_HTTP,
  }, onRequest);
  function onRequest(req: IncomingMessage, res: ServerResponse): void {
    const socket = req.socket as TLSSocket;
    const identity = certIdentity(socket, pinned, revoked);
    if (identity.serial) serialOf.set(socket, identity.serial);
    void handleRequest(req, res, getConfig(), services, undefined, identity);
  }
  servePipeline(server, onRequest);
  server.on('secureConnection', (s: TLSSocket) => {
    // No renegotiation (TLS 1.2): a client-initiated one costs the server a handshake each time and buys the caller nothing.
    s.disableRenegotiation();
    // After its handshake, as on the plain listener: a caller that then sends nothing is let go.
    closeIfSilent(s);
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  server.on('tlsClientError', (_err: Error, s: TLSSocket) => s.destroy());
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    // A client certificate whose signature does not verify (one from an earlier CA of the same
    // name, before `certs init --refresh`) leaves an OpenSSL error behind that Node raises at the
    // first read, before any request is parsed: the caller is told its certificate was refused
    // (401, with the reason), as for any other refused certificate, not that its request did not parse.
    const refused = err.code?.startsWith('ERR_SSL_') && socket instanceof TLSSocket ? certIdentity(socket, pinned, revoked).refused : undefined;
    answerClientError(err, socket, refused ? new ProxyError('caller_unauthenticated', `Client certificate refused: ${refused}.`) : undefined);
  });
  server.on('connect', refuseConnect);
  const use = (files: CheckedListenerFiles): void => {
    server.setSecureContext(contextOptions(files));
    pinned = pinnedCas(files);
  };
  return { server, use, close: () => revoked.close() };
}
