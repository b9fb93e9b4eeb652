import { text } from 'node:stream/consumers';
import { ConflictError, UserError } from '../errors.ts';
import { audit } from './audit.ts';
import { callers } from './callers.ts';
import { EXIT, type Outcome } from './io.ts';
import { keys } from './keys.ts';
import { masterKey } from './master-key.ts';
import { routes } from './routes.ts';
import { serve } from './serve.ts';

const HELP = `egress: an egress proxy that holds provider credentials for the services that call through it

  egress serve                                   run the proxy (settings from EGRESS_* or flags)
  egress routes check [DIR]                      validate route files; errors as file:line:col
  egress routes schema                           JSON Schema of a route file, for editors
  egress routes explain --caller NAME METHOD URL which rule allows or denies, and why
  egress callers add NAME | list | revoke NAME   caller identities; a new token is shown once
  egress keys put ID (--from-file F | --from-stdin)
  egress keys list | show ID                     metadata only, never values
  egress master-key init | status                the key-encryption keyring
  egress audit verify [FILE…]                    check the audit log's hash chain

Every command takes --json. Exit codes: 0 ok, 1 failure or condition found, 2 usage, 3 conflict.`;

const COMMANDS: Readonly<Record<string, (args: readonly string[]) => Promise<Outcome>>> = {
  routes,
  keys: (args) => keys(args, () => text(process.stdin)),
  callers,
  'master-key': masterKey,
  audit,
};

export async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  const json = rest.includes('--json');
  try {
    if (!command || command === 'help' || command === '--help' || command === '-h') {
      process.stdout.write(`${HELP}\n`);
      return command ? EXIT.ok : EXIT.usage;
    }
    if (command === 'serve') return await serve(rest);
    const run = Object.hasOwn(COMMANDS, command) ? COMMANDS[command] : undefined;
    if (!run) throw new UserError(`unknown command "${command}"\n\n${HELP}`, EXIT.usage);
    const outcome = await run(rest);
    process.stdout.write(json ? `${JSON.stringify(outcome.data, null, 2)}\n` : `${outcome.text}\n`);
    return outcome.code;
  } catch (err) {
    const code = err instanceof UserError ? err.exitCode : EXIT.failure;
    const message = err instanceof UserError ? err.message : `unexpected error (${(err as Error)?.name ?? 'error'})`;
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: err instanceof ConflictError ? 'conflict' : code === EXIT.usage ? 'usage' : 'failure', message } })}\n`);
    process.stderr.write(`egress: ${message}\n`);
    return code;
  }
}
