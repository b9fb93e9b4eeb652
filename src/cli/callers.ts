import { CALLER_NAME } from '../config/route-schema.ts';
import { formatDuration } from '../config/units.ts';
import { UserError } from '../errors.ts';
import * as ops from '../rotation/operations.ts';
import { liveTokenCount } from '../store/callers.ts';
import type { AdminRecord } from '../store/records.ts';
import { openStore } from '../store/open-store.ts';
import { cliActor, EXIT, graceFlag, maxArgs, ok, onlyOptions, parse, requireArg, table, type Outcome } from './io.ts';

const WORDS = {
  caller: { command: 'callers', noun: 'caller', verb: 'add', create: '' },
  admin: { command: 'admin-token', noun: 'admin token', verb: 'create', create: ' [--read-only]' },
} as const;

/**
 * `egress callers …` (caller identities) and `egress admin-token …` (admin API tokens): a new token
 * is printed once and stored as a hash; rotation keeps the old token working through a grace window.
 */
export async function tokens(kind: ops.TokenKind, args: readonly string[]): Promise<Outcome> {
  const w = WORDS[kind];
  const usage = `usage: egress ${w.command} ${w.verb} NAME${w.create} | rotate NAME [--grace 24h] | revoke NAME | list`;
  const [sub, ...rest] = args;
  const p = parse(rest, { grace: { type: 'string' }, 'read-only': { type: 'boolean' } });
  maxArgs(p.positionals, sub === 'list' ? 0 : 1, usage);
  // --read-only is chosen when an admin token is made; rotate keeps it (a token that should change
  // its access is revoked and created again, so the old access cannot linger in a grace window).
  const allowed = sub === 'rotate' ? ['grace'] : sub === w.verb && kind === 'admin' ? ['read-only'] : [];
  onlyOptions(p.values, ['grace', 'read-only'], allowed, `${w.command} ${sub ?? ''}`.trim(), usage);
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
        const { record, token } = await ops.addToken(op, kind, name(), { readOnly: p.values['read-only'] === true });
        const what = record.read_only ? `read-only ${w.noun}` : w.noun;
        return ok(`${what} "${record.name}" added. Its token is shown this once; keep it in the service's secret settings:\n${token}`, { [kind === 'caller' ? 'caller' : 'name']: record.name, token, ...access(kind, record) });
      }
      case 'rotate': {
        const graceMs = graceFlag(p.values);
        const { record, token } = await ops.rotateToken(op, kind, name(), graceMs);
        const note = graceMs > 0 ? `the old token keeps working for ${formatDuration(graceMs)}` : 'the old token stopped working';
        const what = record.read_only ? `read-only ${w.noun}` : w.noun;
        return ok(`new token for ${what} "${record.name}" (${note}). It is shown this once:\n${token}`, { [kind === 'caller' ? 'caller' : 'name']: record.name, token, grace_ms: graceMs, ...access(kind, record) });
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
        const list = [...(kind === 'caller' ? snapshot.callers : snapshot.admins).values()].map((c: AdminRecord) => ({
          name: c.name,
          created_at: c.created_at,
          tokens: liveTokenCount(c, now),
          revoked_at: c.revoked_at ?? null,
          ...access(kind, c),
        }));
        const rows = kind === 'admin'
          ? [['NAME', 'CREATED', 'LIVE TOKENS', 'ACCESS', 'STATE'], ...list.map((c) => [c.name, c.created_at, String(c.tokens), c.read_only ? 'read-only' : 'full', state(c)])]
          : [['NAME', 'CREATED', 'LIVE TOKENS', 'STATE'], ...list.map((c) => [c.name, c.created_at, String(c.tokens), state(c)])];
        // As `keys list`: a damaged record works for nobody, and is named so that it gets repaired.
        const damaged = [...snapshot.damaged.keys()].filter((k) => k.startsWith(`${kind}:`)).map((k) => k.slice(kind.length + 1));
        const text = list.length === 0 ? `no ${w.noun}s` : table(rows);
        return ok(damaged.length ? `${text}\ndamaged records (fail closed): ${damaged.join(', ')}` : text, { [kind === 'caller' ? 'callers' : 'admin_tokens']: list, damaged });
      }
      default:
        throw new UserError(usage, EXIT.usage);
    }
  } finally {
    await store.close();
  }
}

/** An admin token's access, for --json: `read_only` on every admin token (false: a full token), on no caller. */
function access(kind: ops.TokenKind, record: AdminRecord): { read_only?: boolean } {
  return kind === 'admin' ? { read_only: record.read_only === true } : {};
}

function state(record: { readonly revoked_at: string | null }): string {
  return record.revoked_at ? `revoked ${record.revoked_at}` : 'active';
}
