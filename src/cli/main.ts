import { ConflictError, NotFoundError, UserError } from '../errors.ts';
import { EXIT, readStdin, type Outcome } from './io.ts';

const HELP = `egress: an egress proxy that holds provider credentials for the services that call through it

  egress serve                                   run the proxy (settings from EGRESS_* or flags)
  egress routes check [DIR]                      validate route files; errors as file:line:col
  egress routes schema                           JSON Schema of a route file, for editors
  egress routes explain --caller NAME METHOD URL which rule allows or denies, and why
  egress callers add NAME | rotate NAME [--grace 24h] | revoke NAME | list
  egress admin-token create NAME [--read-only] | rotate NAME [--grace 24h] | revoke NAME | list
  egress keys put ID (--from-file F | --from-stdin)
  egress keys rotate ID (--from-file F | --from-stdin) [--grace 24h | --stage]
  egress keys promote ID [--grace 24h] | rollback ID | revoke ID [--version N]
  egress keys list | show ID | due [--max-age 90d]   metadata only, never values
  egress master-key init | status | rotate [--resume] | remove --version N
  egress audit verify [--partial] [--head HASH] [FILE…|-]   check the audit log's hash chain (and that it reaches a recorded head)
  egress certs init [--refresh]                  the forward-mode CA, limited to the hosts routes name
  egress certs issue-caller NAME                 a client certificate for a caller on the TLS listener
  egress certs revoke-caller NAME                revoke every certificate issued to that caller

Every command takes --json. Exit codes: 0 ok, 1 failure or condition found, 2 usage, 3 conflict.`;

// Loaded on demand: a rotation script running `egress keys …` should not pay for the HTTP stack.
const COMMANDS: Readonly<Record<string, (args: readonly string[]) => Promise<Outcome>>> = {
  routes: async (args) => (await import('./routes.ts')).routes(args),
  keys: async (args) => (await import('./keys.ts')).keys(args, () => readStdin()),
  callers: async (args) => (await import('./callers.ts')).tokens('caller', args),
  'admin-token': async (args) => (await import('./callers.ts')).tokens('admin', args),
  'master-key': async (args) => (await import('./master-key.ts')).masterKey(args),
  audit: async (args) => (await import('./audit.ts')).audit(args),
  certs: async (args) => (await import('./certs.ts')).certs(args),
};

export async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  const json = rest.includes('--json');
  try {
    if (!command || command === 'help' || command === '--help' || command === '-h') {
      process.stdout.write(`${HELP}\n`);
      return command ? EXIT.ok : EXIT.usage;
    }
    // `egress serve --help`, `egress keys put --help`: asking is not a usage error, and must not run
    // the command (serve would start listening). Arguments after "--" are values, not flags.
    const flags = rest.includes('--') ? rest.slice(0, rest.indexOf('--')) : rest;
    if (flags.includes('--help') || flags.includes('-h')) {
      process.stdout.write(`${HELP}\n`);
      return EXIT.ok;
    }
    if (command === 'serve') return await (await import('./serve.ts')).serve(rest);
    const run = Object.hasOwn(COMMANDS, command) ? COMMANDS[command] : undefined;
    if (!run) throw new UserError(`unknown command "${command}"\n\n${HELP}`, EXIT.usage);
    const outcome = await run(rest);
    process.stdout.write(json ? `${JSON.stringify(outcome.data, null, 2)}\n` : `${outcome.text}\n`);
    return outcome.code;
  } catch (err) {
    const code = err instanceof UserError ? err.exitCode : EXIT.failure;
    // Not a UserError: say what kind of failure it was (a store timeout, say), first line only, bounded.
    const detail = err instanceof Error ? `${err.name}: ${err.message.split('\n')[0]!.slice(0, 160)}` : 'error';
    const message = err instanceof UserError ? err.message : `unexpected error (${detail})`;
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: err instanceof ConflictError ? 'conflict' : err instanceof NotFoundError ? 'not_found' : code === EXIT.usage ? 'usage' : 'failure', message } })}\n`);
    process.stderr.write(`egress: ${message}\n`);
    return code;
  }
}
