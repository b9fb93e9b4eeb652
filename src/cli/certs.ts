import { X509Certificate } from 'node:crypto';
import { join } from 'node:path';
import { ConfigError, formatProblem, loadRoutes } from '../config/load-routes.ts';
import { CA_FILES, CALLER_URI_PREFIX, createCa, issueCallerCertificate, readCa, writeCa } from '../certs/ca.ts';
import { listenerClientCas, readListenerFile } from '../certs/listener-files.ts';
import { addRevoked, CERTS_LOCK, readCertsList } from '../certs/revocations.ts';
import { withFileLock } from '../store/lock-file.ts';
import { replaceFile, replaceFiles } from '../store/temp-files.ts';
import { CALLER_NAME } from '../config/route-schema.ts';
import { UserError } from '../errors.ts';
import { openStore } from '../store/open-store.ts';
import { callerActive } from '../store/store-view.ts';
import { EXIT, maxArgs, ok, parse, requireArg, type Outcome } from './io.ts';

const USAGE = 'usage: egress certs init [--refresh] | issue-caller NAME | revoke-caller NAME';
const ISSUED = 'issued.json';

/**
 * `egress certs init [--refresh]`: the forward-mode CA in EGRESS_CERTS (ca.pem, ca.key 0600). Its
 * name constraints permit only the hosts the route files name (and localhost): re-issue it with
 * --refresh when routes add hosts, and give services the new ca.pem.
 */
export async function certs(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest, { refresh: { type: 'boolean' } });
  maxArgs(p.positionals, sub === 'init' ? 0 : 1, USAGE);
  const settings = p.settings();
  if (sub === 'issue-caller' || sub === 'revoke-caller') {
    const name = requireArg(p.positionals, 0, 'caller NAME');
    if (!CALLER_NAME.test(name)) throw new UserError('caller names are lower-case letters, digits, ".", "_" and "-"', EXIT.usage);
    const issuedPath = join(settings.certsDir, ISSUED);
    const readIssued = () => readIssuedSerials(issuedPath);
    if (sub === 'revoke-caller') {
      const issued = await readIssued();
      const serials = Object.hasOwn(issued, name) ? issued[name]! : [];
      if (serials.length === 0) throw new UserError(`no certificate was issued to caller "${name}" from ${settings.certsDir}`);
      await addRevoked(settings.certsDir, serials, name);
      return ok(`revoked ${serials.length} certificate${serials.length === 1 ? '' : 's'} of caller "${name}"; running TLS listeners refuse them and close their connections`, { caller: name, revoked: serials });
    }
    const ca = await readCa(settings.certsDir);
    if (!ca) throw new UserError(`no CA in ${settings.certsDir}; run "egress certs init" first`);
    // The TLS listener accepts only certificates issued by the CA in EGRESS_CLIENT_CA: one signed
    // here for a listener pinned to another CA would be refused at every request.
    if (settings.clientCa !== undefined) await sameCa(settings.clientCa, ca.certPem, join(settings.certsDir, CA_FILES.cert));
    // A certificate identifies a caller only while the store has it (and it is not revoked).
    const store = openStore(settings.store);
    try {
      const snapshot = await store.load();
      if (!callerActive(snapshot, name)) throw new UserError(`caller "${name}" is ${snapshot.callers.get(name)?.revoked_at !== undefined ? 'revoked' : 'not in the store'}: a certificate identifies only a caller the store has; add it first with "egress callers add ${name}"`);
    } finally {
      await store.close();
    }
    const issuedCert = issueCallerCertificate(ca, name);
    // The serial is recorded before the certificate is written anywhere: one written first, and
    // then not recorded (issued.json unreadable, a full disk), could never be revoked.
    // Read and written under its lock: two issue-caller runs at once each wrote back what they had
    // read, and one certificate's serial was lost (revoke-caller could then never revoke it).
    // The certificate and key are written under the same lock: two runs for one name at once could
    // otherwise leave one run's certificate beside the other's key.
    const dir = join(settings.certsDir, 'callers');
    await withFileLock(issuedPath, CERTS_LOCK, async (held) => {
      const issued = await readIssued();
      issued[name] = [...(Object.hasOwn(issued, name) ? issued[name]! : []), issuedCert.serial.toLowerCase()];
      // As for revoked.json: a lock lost while held (past its stale age) means another run may have
      // recorded serials since; checked just before the rename.
      await replaceFile(issuedPath, `${JSON.stringify(issued, null, 2)}\n`, 0o644, undefined, () => held.confirm());
      // Both in full before either takes its name: a write cut short (a full disk) between the two
      // left the new certificate beside the old key, a pair that no TLS client can use.
      await replaceFiles([
        { path: join(dir, `${name}.pem`), text: issuedCert.certPem, mode: 0o644 },
        { path: join(dir, `${name}.key`), text: issuedCert.keyPem, mode: 0o600 },
      ], (err) => new UserError(`the certificate and key of caller "${name}" could not be written in ${dir} (${(err as NodeJS.ErrnoException).code ?? 'error'}); the ones there are unchanged`));
    });
    return ok(`issued a client certificate for caller "${name}" (identity ${CALLER_URI_PREFIX}${name}, 90 days): ${join(dir, `${name}.pem`)} and ${join(dir, `${name}.key`)} (0600); give both to the service`, { caller: name, cert: join(dir, `${name}.pem`), key: join(dir, `${name}.key`), serial: issuedCert.serial });
  }
  if (sub !== 'init') throw new UserError(USAGE, EXIT.usage);
  const config = await loadRoutes(settings.routesDir).catch((err: unknown) => {
    if (err instanceof ConfigError) throw new UserError(`the route folder does not load, so the CA's permitted hosts are unknown:\n${err.problems.map(formatProblem).join('\n')}`);
    throw err;
  });
  const hosts = [...new Set(config.routes.flatMap((r) => [...r.hosts]))].sort();
  await writeCa(settings.certsDir, createCa(hosts), p.values.refresh === true);
  const cert = join(settings.certsDir, CA_FILES.cert);
  return ok(`${p.values.refresh ? 're-issued' : 'created'} the forward-mode CA ${cert} (key ${join(settings.certsDir, CA_FILES.key)}, mode 0600)\npermitted hosts: ${[...hosts, 'localhost'].join(', ')}\nservices trust ${cert}; restart the proxy to use it`, { cert, hosts: [...hosts, 'localhost'] });
}

/** EGRESS_CLIENT_CA (one CA, or a bundle whose every CA the listener pins) must hold the CA issue-caller signs with. */
async function sameCa(clientCaPath: string, caPem: string, caPath: string): Promise<void> {
  const pinned = listenerClientCas(await readListenerFile(clientCaPath, 'EGRESS_CLIENT_CA'));
  const ours = new X509Certificate(caPem).fingerprint256;
  if (!pinned.some((ca) => ca.fingerprint256 === ours)) {
    throw new UserError(`EGRESS_CLIENT_CA ${clientCaPath} ${pinned.length > 1 ? 'does not hold' : 'is not'} the CA in ${caPath} that issue-caller signs with: a TLS listener with this EGRESS_CLIENT_CA would refuse the certificate (issue caller certificates with the CA it names, or unset EGRESS_CLIENT_CA)`);
  }
}

/**
 * The serials issued to each caller; empty when the file does not exist (nothing issued yet). A
 * file that exists but cannot be read as that is an error: read as empty, the next write would drop
 * every serial in it, and revoke-caller could never revoke those certificates.
 */
async function readIssuedSerials(path: string): Promise<Record<string, string[]>> {
  const doc = await readCertsList(path, { list: 'a list of issued serials', unknown: 'which certificates were issued to which caller' }, (d) =>
    typeof d === 'object' && d !== null && !Array.isArray(d) && Object.values(d).every((serials) => Array.isArray(serials) && serials.every((s) => typeof s === 'string')));
  return Object.assign(Object.create(null), doc) as Record<string, string[]>;
}
