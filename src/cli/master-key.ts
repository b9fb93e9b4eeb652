import { UserError } from '../errors.ts';
import { createKeyring, readKeyring } from '../store/keyring.ts';
import { openStore } from '../store/open-store.ts';
import { EXIT, maxArgs, ok, parse, table, type Outcome } from './io.ts';

const USAGE = 'usage: egress master-key init | status';

/** `egress master-key …`: the key-encryption keyring. Key material is never printed. */
export async function masterKey(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest);
  maxArgs(p.positionals, 0, USAGE);
  const settings = p.settings();
  switch (sub) {
    case 'init': {
      const keyring = await createKeyring(settings.masterKeyFile);
      return ok(`created master key file ${settings.masterKeyFile} (mode 0600) with key version ${keyring.active}; back it up: without it no credential can be decrypted`, { file: settings.masterKeyFile, versions: keyring.versions() });
    }
    case 'status': {
      const keyring = await readKeyring(settings.masterKeyFile);
      const backend = openStore(settings.store);
      try {
        const snapshot = await backend.load();
        const wraps = new Map<number, number>();
        for (const record of snapshot.credentials.values()) {
          for (const v of record.versions) if (v.dek) wraps.set(v.kek, (wraps.get(v.kek) ?? 0) + 1);
        }
        const versions = keyring.versions().map((v) => ({ ...v, wraps: wraps.get(v.version) ?? 0 }));
        const orphaned = [...wraps.keys()].filter((k) => keyring.get(k) === undefined);
        const rows = [['VERSION', 'ACTIVE', 'CREATED', 'WRAPS'], ...versions.map((v) => [String(v.version), v.active ? 'yes' : '', v.createdAt, String(v.wraps)])];
        const warn = orphaned.length ? `\nrecords wrapped by key versions missing from the keyring: ${orphaned.join(', ')}` : '';
        return { code: orphaned.length ? EXIT.failure : EXIT.ok, text: `${settings.masterKeyFile}\n${table(rows)}${warn}`, data: { file: settings.masterKeyFile, versions, missing_versions: orphaned } };
      } finally {
        await backend.close();
      }
    }
    default:
      throw new UserError(USAGE, EXIT.usage);
  }
}
