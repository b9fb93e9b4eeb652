import { UserError } from '../errors.ts';
import { currentVersion, describeCredential, newCredentialRecord } from '../store/credentials.ts';
import { readKeyring } from '../store/keyring.ts';
import { openStore } from '../store/open-store.ts';
import { NAME } from '../config/route-schema.ts';
import { EXIT, fail, maxArgs, ok, parse, readFieldsInput, requireArg, table, type Outcome } from './io.ts';

const USAGE = 'usage: egress keys put ID (--from-file F | --from-stdin) | list | show ID';

/** `egress keys …`: credentials. Output is metadata only; values are never printed. */
export async function keys(args: readonly string[], stdin: () => Promise<string>): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest, { 'from-file': { type: 'string' }, 'from-stdin': { type: 'boolean' } });
  maxArgs(p.positionals, sub === 'list' ? 0 : 1, USAGE);
  const settings = p.settings();
  const backend = openStore(settings.store);
  try {
    const now = new Date();
    switch (sub) {
      case 'put': {
        const id = requireArg(p.positionals, 0, 'credential ID');
        if (!NAME.test(id)) throw new UserError('credential IDs are lower-case letters, digits, "_" and "-" (at most 63)', EXIT.usage);
        const fields = await readFieldsInput(p.values, stdin);
        const keyring = await readKeyring(settings.masterKeyFile);
        const snapshot = await backend.load();
        if (snapshot.credentials.has(id) || snapshot.damaged.has(`credential:${id}`)) {
          throw new UserError(`credential "${id}" already exists; a new version is a rotation, not a put`);
        }
        const record = newCredentialRecord(keyring, id, fields, now);
        await backend.put('credential', record, 0);
        return ok(`stored credential "${id}" version 1 (current) with fields ${Object.keys(fields).sort().join(', ')}`, describeCredential(record, now));
      }
      case 'list': {
        const snapshot = await backend.load();
        const list = [...snapshot.credentials.values()].map((r) => {
          const current = currentVersion(r);
          return { id: r.id, current_version: current?.version ?? null, versions: r.versions.length, created_at: r.created_at, current_age_days: current ? Math.floor((now.getTime() - Date.parse(current.created_at)) / 86_400_000) : null };
        });
        const damaged = [...snapshot.damaged.keys()].filter((k) => k.startsWith('credential:')).map((k) => k.slice('credential:'.length));
        const rows = [['ID', 'CURRENT', 'VERSIONS', 'AGE (DAYS)'], ...list.map((c) => [c.id, String(c.current_version ?? '-'), String(c.versions), String(c.current_age_days ?? '-')])];
        const text = list.length === 0 ? 'no credentials' : table(rows);
        return ok(damaged.length ? `${text}\ndamaged records (fail closed): ${damaged.join(', ')}` : text, { credentials: list, damaged });
      }
      case 'show': {
        const id = requireArg(p.positionals, 0, 'credential ID');
        const snapshot = await backend.load();
        const record = snapshot.credentials.get(id);
        if (!record) return fail(snapshot.damaged.has(`credential:${id}`) ? `credential "${id}" is damaged in the store` : `no credential "${id}"`, { error: 'not_found', id });
        const d = describeCredential(record, now);
        const rows = [['VERSION', 'STATE', 'CREATED', 'AGE (DAYS)', 'FIELDS'], ...d.versions.map((v) => [String(v.version), v.state, v.created_at, String(v.age_days), v.fields.join(',')])];
        return ok(`credential ${d.id} (revision ${d.revision})\n${table(rows)}`, d);
      }
      default:
        throw new UserError(USAGE, EXIT.usage);
    }
  } finally {
    await backend.close();
  }
}
