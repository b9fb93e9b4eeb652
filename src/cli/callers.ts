import { CALLER_NAME } from '../config/route-schema.ts';
import { formatDuration } from '../config/units.ts';
import { UserError } from '../errors.ts';
import * as ops from '../rotation/operations.ts';
import { liveTokenCount } from '../store/callers.ts';
import { openStore } from '../store/open-store.ts';
import { cliActor, EXIT, graceFlag, maxArgs, ok, onlyOptions, parse, requireArg, table, type Outcome } from './io.ts';

const WORDS = {
  caller: { command: 'callers', noun: 'caller', verb: 'add' },
  admin: { command: 'admin-token', noun: 'admin token', verb: 'create' },
} as const;

/**
 * `egress callers …` (caller identities) and `egress admin-token …` (admin API tokens): a new token
 * is printed once and stored as a hash; rotation keeps the old token working through a grace window.
 */
export async function tokens(kind: ops.TokenKind, args: readonly string[]): Promise<Outcome> {
  const w = WORDS[kind];
  const usage = `usage: egress ${w.command} ${w.verb} NAME | rotate NAME [--grace 24h] | revoke NAME | list`;
  const [sub, ...rest] = args;
  const p = parse(rest, { grace: { type: 'string' } });
  maxArgs(p.positionals, sub === 'list' ? 0 : 1, usage);
  onlyOptions(p.values, ['grace'], sub === 'rotate' ? ['grace'] : [], `${w.command} ${sub ?? ''}`.trim(), usage);
  const store = openStore(p.settings().store);
  const op: ops.Operator = { store, actor: cliActor() };
  const name = () => {
    const value = requireArg(p.positionals, 0, 'NAME');
    if (!CALLER_NAME.test(value)) throw new UserError('names are lower-case letters, digits, ".", "_" and "-"', EXIT.usage);
    return value;
  };
  try {
    switch (sub) {
      case w.verb: {
        const { record, token } = await ops.addToken(op, kind, name());
        return ok(`${w.noun} "${record.name}" added. Its token is shown this once; keep it in the service's secret settings:\n${token}`, { [kind === 'caller' ? 'caller' : 'name']: record.name, token });
      }
      case 'rotate': {
        const graceMs = graceFlag(p.values);
        const { record, token } = await ops.rotateToken(op, kind, name(), graceMs);
        const note = graceMs > 0 ? `the old token keeps working for ${formatDuration(graceMs)}` : 'the old token stopped working';
        return ok(`new token for ${w.noun} "${record.name}" (${note}). It is shown this once:\n${token}`, { [kind === 'caller' ? 'caller' : 'name']: record.name, token, grace_ms: graceMs });
      }
      case 'revoke': {
        const record = await ops.revokeToken(op, kind, name());
        // A caller is `caller` here as in add and rotate (and the admin API's answers); `name`, which
        // revoke printed alone before, stays for the scripts that read it.
        const named = kind === 'caller' ? { caller: record.name, name: record.name } : { name: record.name };
        return ok(`${w.noun} "${record.name}" revoked at ${record.revoked_at}; its tokens stop working within a second on every instance`, { ...named, revoked_at: record.revoked_at });
      }
      case 'list': {
        const snapshot = await store.load();
        const now = Date.now();
        const list = [...(kind === 'caller' ? snapshot.callers : snapshot.admins).values()].map((c) => ({
          name: c.name,
          created_at: c.created_at,
          tokens: liveTokenCount(c, now),
          revoked_at: c.revoked_at ?? null,
        }));
        const rows = [['NAME', 'CREATED', 'LIVE TOKENS', 'STATE'], ...list.map((c) => [c.name, c.created_at, String(c.tokens), c.revoked_at ? `revoked ${c.revoked_at}` : 'active'])];
        return ok(list.length === 0 ? `no ${w.noun}s` : table(rows), { [kind === 'caller' ? 'callers' : 'admin_tokens']: list });
      }
      default:
        throw new UserError(usage, EXIT.usage);
    }
  } finally {
    await store.close();
  }
}
