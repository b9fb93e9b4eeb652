import { join } from 'node:path';
import { ConfigError, formatProblem, loadRoutes } from '../config/load-routes.ts';
import { CA_FILES, createCa, writeCa } from '../certs/ca.ts';
import { UserError } from '../errors.ts';
import { EXIT, maxArgs, ok, parse, type Outcome } from './io.ts';

const USAGE = 'usage: egress certs init [--refresh]';

/**
 * `egress certs init [--refresh]`: the forward-mode CA in EGRESS_CERTS (ca.pem, ca.key 0600). Its
 * name constraints permit only the hosts the route files name (and localhost): re-issue it with
 * --refresh when routes add hosts, and give services the new ca.pem.
 */
export async function certs(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest, { refresh: { type: 'boolean' } });
  maxArgs(p.positionals, 0, USAGE);
  if (sub !== 'init') throw new UserError(USAGE, EXIT.usage);
  const settings = p.settings();
  const config = await loadRoutes(settings.routesDir).catch((err: unknown) => {
    if (err instanceof ConfigError) throw new UserError(`the route folder does not load, so the CA's permitted hosts are unknown:\n${err.problems.map(formatProblem).join('\n')}`);
    throw err;
  });
  const hosts = [...new Set(config.routes.flatMap((r) => [...r.hosts]))].sort();
  await writeCa(settings.certsDir, createCa(hosts), p.values.refresh === true);
  const cert = join(settings.certsDir, CA_FILES.cert);
  return ok(`${p.values.refresh ? 're-issued' : 'created'} the forward-mode CA ${cert} (key ${join(settings.certsDir, CA_FILES.key)}, mode 0600)\npermitted hosts: ${[...hosts, 'localhost'].join(', ')}\nservices trust ${cert}; restart the proxy to use it`, { cert, hosts: [...hosts, 'localhost'] });
}
