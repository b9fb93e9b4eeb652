import { CALLER_NAME } from '../config/route-schema.ts';
import { UserError } from '../errors.ts';
import { generateToken, hashToken, newTokenId } from '../store/callers.ts';
import { openStore } from '../store/open-store.ts';
import type { CallerRecord } from '../store/records.ts';
import { EXIT, fail, maxArgs, ok, parse, requireArg, table, type Outcome } from './io.ts';

const USAGE = 'usage: egress callers add NAME | list | revoke NAME';

/** `egress callers …`: caller identities and their tokens (shown once, stored as hashes). */
export async function callers(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest);
  maxArgs(p.positionals, sub === 'list' ? 0 : 1, USAGE);
  const backend = openStore(p.settings().store);
  try {
    const now = new Date().toISOString();
    switch (sub) {
      case 'add': {
        const name = requireArg(p.positionals, 0, 'caller NAME');
        if (!CALLER_NAME.test(name)) throw new UserError('caller names are lower-case letters, digits, ".", "_" and "-"', EXIT.usage);
        const existing = (await backend.load()).callers.get(name);
        if (existing && !existing.revoked_at) throw new UserError(`caller "${name}" already exists; revoke it first to issue a new identity`);
        const token = generateToken();
        const record: CallerRecord = {
          name,
          revision: (existing?.revision ?? 0) + 1,
          created_at: now,
          updated_at: now,
          tokens: [{ id: newTokenId(), hash: hashToken(token), created_at: now }],
        };
        await backend.put('caller', record, existing?.revision ?? 0);
        return ok(`caller "${name}" added. Its token is shown this once; keep it in the service's secret settings:\n${token}`, { caller: name, token });
      }
      case 'list': {
        const snapshot = await backend.load();
        const list = [...snapshot.callers.values()].map((c) => ({ name: c.name, created_at: c.created_at, tokens: c.tokens.length, revoked_at: c.revoked_at ?? null }));
        const rows = [['NAME', 'CREATED', 'TOKENS', 'STATE'], ...list.map((c) => [c.name, c.created_at, String(c.tokens), c.revoked_at ? `revoked ${c.revoked_at}` : 'active'])];
        return ok(list.length === 0 ? 'no callers' : table(rows), { callers: list });
      }
      case 'revoke': {
        const name = requireArg(p.positionals, 0, 'caller NAME');
        const existing = (await backend.load()).callers.get(name);
        if (!existing) return fail(`no caller "${name}"`, { error: 'not_found', caller: name });
        if (existing.revoked_at) return ok(`caller "${name}" was already revoked at ${existing.revoked_at}`, { caller: name, revoked_at: existing.revoked_at });
        const record: CallerRecord = { ...existing, revision: existing.revision + 1, updated_at: now, revoked_at: now, tokens: [] };
        await backend.put('caller', record, existing.revision);
        return ok(`caller "${name}" revoked; its tokens stop working within a second on every instance`, { caller: name, revoked_at: now });
      }
      default:
        throw new UserError(USAGE, EXIT.usage);
    }
  } finally {
    await backend.close();
  }
}
