import { loadRoutes } from '../config/load-routes.ts';
import { NAME } from '../config/route-schema.ts';
import { formatDuration } from '../config/units.ts';
import { NotFoundError, UserError } from '../errors.ts';
import * as ops from '../rotation/operations.ts';
import { ageDays, currentVersion, describeCredential, dueForRotation } from '../store/credentials.ts';
import { readKeyring } from '../store/keyring.ts';
import { openStore } from '../store/open-store.ts';
import { lastUseByVersion } from '../observe/usage.ts';
import type { CredentialRecord } from '../store/records.ts';
import { cliActor, durationFlag, EXIT, graceFlag, maxArgs, ok, onlyOptions, parse, readFieldsInput, requireArg, table, type Outcome } from './io.ts';

const USAGE = `usage: egress keys put ID (--from-file F | --from-stdin)
       egress keys rotate ID (--from-file F | --from-stdin) [--grace 24h | --stage]
       egress keys promote ID [--grace 24h] | rollback ID | revoke ID [--version N]
       egress keys list | show ID | due [--max-age 90d]`;

const ARGS: Readonly<Record<string, number>> = { put: 1, rotate: 1, promote: 1, rollback: 1, revoke: 1, show: 1, list: 0, due: 0 };

/** The options each subcommand takes (besides --json and the settings). */
const OPTIONS: Readonly<Record<string, readonly string[]>> = {
  put: ['from-file', 'from-stdin'],
  rotate: ['from-file', 'from-stdin', 'grace', 'stage'],
  promote: ['grace'],
  rollback: [],
  revoke: ['version'],
  show: [],
  list: [],
  due: ['max-age'],
};
const OWN = ['from-file', 'from-stdin', 'grace', 'stage', 'version', 'max-age'] as const;

/** `egress keys …`: credentials and their versions. Output is metadata only; values are never printed. */
export async function keys(args: readonly string[], stdin: () => Promise<string>): Promise<Outcome> {
  const [sub, ...rest] = args;
  if (!sub || !Object.hasOwn(ARGS, sub)) throw new UserError(USAGE, EXIT.usage);
  const p = parse(rest, { 'from-file': { type: 'string' }, 'from-stdin': { type: 'boolean' }, grace: { type: 'string' }, stage: { type: 'boolean' }, version: { type: 'string' }, 'max-age': { type: 'string' } });
  maxArgs(p.positionals, ARGS[sub]!, USAGE);
  onlyOptions(p.values, OWN, OPTIONS[sub]!, `keys ${sub}`, USAGE);
  const settings = p.settings();
  const store = openStore(settings.store);
  // The routes the proxy serves from EGRESS_ROUTES: a version that would leave one of them without
  // its fields is not made current. A folder that does not load (or is not there) skips the check.
  const routes = sub === 'rotate' || sub === 'promote' || sub === 'rollback'
    ? await loadRoutes(settings.routesDir).then((c) => c.routes, () => undefined)
    : undefined;
  const op: ops.Operator = { store, actor: cliActor(), ...(routes ? { routes: () => routes } : {}) };
  const id = () => {
    const value = requireArg(p.positionals, 0, 'credential ID');
    if (!NAME.test(value)) throw new UserError('credential IDs are lower-case letters, digits, "_" and "-" (at most 63)', EXIT.usage);
    return value;
  };
  const shown = (record: CredentialRecord, what: string) => ok(`${what}\n${showText(record)}`, describeCredential(record, new Date()));
  try {
    switch (sub) {
      case 'put': {
        const credentialId = id();
        const fields = await readFieldsInput(p.values, stdin);
        const record = await ops.putCredential(op, await readKeyring(settings.masterKeyFile), credentialId, fields);
        return shown(record, `stored credential "${credentialId}" version 1 (current) with fields ${Object.keys(fields).sort().join(', ')}`);
      }
      case 'rotate': {
        const credentialId = id();
        const graceMs = graceFlag(p.values);
        const stage = p.values.stage === true;
        // The grace belongs to the moment the version becomes current, and a staged one becomes
        // current at `keys promote`, which takes its own --grace (24h when not given): given here,
        // it was dropped without a word. Refused rather than kept on the pending version: a field
        // the record schema of earlier releases refuses, so their instances would fail it closed.
        if (stage && p.values.grace !== undefined) throw new UserError(`--grace applies when a version becomes current, and a staged version becomes current with "egress keys promote ${credentialId} --grace ${formatDuration(graceMs)}": give it there; nothing was staged`, EXIT.usage);
        const fields = await readFieldsInput(p.values, stdin);
        const record = await ops.rotateCredential(op, await readKeyring(settings.masterKeyFile), credentialId, fields, { stage, graceMs });
        const v = Math.max(...record.versions.map((x) => x.version));
        return shown(record, stage ? `staged version ${v} of "${credentialId}" as pending; "keys promote ${credentialId}" makes it current` : `version ${v} of "${credentialId}" is current; ${graceNote(graceMs)}`);
      }
      case 'promote': {
        const graceMs = graceFlag(p.values);
        const record = await ops.promoteCredential(op, id(), graceMs);
        return shown(record, `version ${currentVersion(record)!.version} of "${record.id}" is current; ${graceNote(graceMs)}`);
      }
      case 'rollback': {
        const record = await ops.rollbackCredential(op, id());
        // Rollback refuses while a version is pending, so a pending one now is the version rolled back;
        // there is none when the current version had been revoked (the compromise path).
        const pending = record.versions.find((v) => v.state === 'pending');
        return shown(record, `rolled back: version ${currentVersion(record)!.version} of "${record.id}" is current again${pending ? `; version ${pending.version} is pending` : ''}`);
      }
      case 'revoke': {
        const raw = p.values.version;
        // Digits only: Number() also reads "0x2", "1e1" and " 3 ", and a revoke cannot be undone.
        if (typeof raw === 'string' && !/^[1-9][0-9]{0,14}$/.test(raw)) throw new UserError('--version must be a version number', EXIT.usage);
        const version = typeof raw === 'string' ? Number(raw) : undefined;
        const record = await ops.revokeCredential(op, id(), version);
        return shown(record, `revoked ${version === undefined ? 'the current version' : `version ${version}`} of "${record.id}" and destroyed its ciphertext`);
      }
      case 'list': {
        const snapshot = await store.load();
        const now = Date.now();
        const list = [...snapshot.credentials.values()].map((r) => {
          const current = currentVersion(r);
          return { id: r.id, current_version: current?.version ?? null, states: r.versions.map((v) => `${v.version}:${v.state}`), created_at: r.created_at, current_age_days: current ? ageDays(current.activated_at ?? current.created_at, now) : null };
        });
        const damaged = [...snapshot.damaged.keys()].filter((k) => k.startsWith('credential:')).map((k) => k.slice('credential:'.length));
        const rows = [['ID', 'CURRENT', 'VERSIONS', 'AGE (DAYS)'], ...list.map((c) => [c.id, String(c.current_version ?? '-'), c.states.join(' '), String(c.current_age_days ?? '-')])];
        const text = list.length === 0 ? 'no credentials' : table(rows);
        return ok(damaged.length ? `${text}\ndamaged records (fail closed): ${damaged.join(', ')}` : text, { credentials: list, damaged });
      }
      case 'show': {
        // Checked like every other subcommand's ID, so a value typed here (a secret) is not printed back.
        const credentialId = id();
        const snapshot = await store.load();
        const record = snapshot.credentials.get(credentialId);
        if (!record) throw new NotFoundError(snapshot.damaged.has(`credential:${credentialId}`) ? `credential "${credentialId}" is damaged in the store` : `no credential "${credentialId}"`);
        const lastUse = lastUseByVersion(await store.readUsage(credentialId));
        return ok(showText(record, lastUse), describeCredential(record, new Date(), lastUse));
      }
      default: {
        // due: for cron; exit 1 when any current version is older than --max-age.
        const maxAgeMs = durationFlag(p.values, 'max-age', '90d');
        const due = dueForRotation((await store.load()).credentials.values(), maxAgeMs, Date.now());
        const text = due.length === 0 ? `no credential is older than ${formatDuration(maxAgeMs)}` : `due for rotation (older than ${formatDuration(maxAgeMs)}):\n${table([['ID', 'VERSION', 'AGE (DAYS)'], ...due.map((d) => [d.id, String(d.version), String(d.age_days)])])}`;
        return { code: due.length === 0 ? EXIT.ok : EXIT.failure, text, data: { max_age_days: maxAgeMs / 86_400_000, due } };
      }
    }
  } finally {
    await store.close();
  }
}

function graceNote(graceMs: number): string {
  return graceMs > 0 ? `the previous version keeps working for ${formatDuration(graceMs)}` : 'cutover: the previous version was retired at once';
}

function showText(record: CredentialRecord, lastUse: ReadonlyMap<number, readonly { caller: string; at: string }[]> = new Map()): string {
  const d = describeCredential(record, new Date(), lastUse);
  const rows = [['VERSION', 'STATE', 'CREATED', 'AGE (DAYS)', 'UNTIL', 'FIELDS', 'LAST USED'], ...d.versions.map((v) => [String(v.version), v.state, v.created_at, String(v.age_days), v.grace_until ?? v.retired_at ?? v.revoked_at ?? '', v.fields.join(','), v.last_used[0] ? `${v.last_used[0].at} by ${v.last_used.map((u) => u.caller).join(', ')}` : '-'])];
  const history = d.history.slice(-5).map((h) => `  ${h.at}  ${h.actor}  ${h.action}${h.version ? ` v${h.version}` : ''}${h.detail ? `  (${h.detail})` : ''}`);
  return `credential ${d.id} (revision ${d.revision})\n${table(rows)}${history.length ? `\nrecent changes:\n${history.join('\n')}` : ''}`;
}
