import { UserError } from '../errors.ts';
import { rewrapAll } from '../rotation/operations.ts';
import { createKeyring, readKeyring, withKeyringLock, writeKeyring } from '../store/keyring.ts';
import { openStore } from '../store/open-store.ts';
import type { StoreBackend } from '../store/types.ts';
import { cliActor, EXIT, maxArgs, ok, onlyOptions, parse, table, type Outcome } from './io.ts';

const USAGE = 'usage: egress master-key init | status | rotate [--resume] | remove --version N';

/** The options each subcommand takes (besides --json and the settings). */
const OPTIONS: Readonly<Record<string, readonly string[]>> = { init: [], status: [], rotate: ['resume'], remove: ['version'] };

/**
 * How many stored data keys each KEK version wraps, and the credential records that could not be
 * read (damaged: a hand edit, a field a newer release writes). Those are not counted and not
 * re-wrapped, and may hold data keys wrapped by any version: no version is free to remove while
 * there is one, or the record, once repaired, could never be decrypted again.
 */
async function wrapCounts(store: StoreBackend): Promise<{ wraps: Map<number, number>; damaged: string[] }> {
  const snapshot = await store.load();
  const wraps = new Map<number, number>();
  for (const record of snapshot.credentials.values()) {
    for (const v of record.versions) if (v.dek) wraps.set(v.kek, (wraps.get(v.kek) ?? 0) + 1);
  }
  return { wraps, damaged: [...snapshot.damaged.keys()].filter((k) => k.startsWith('credential:')) };
}

function damagedNote(damaged: readonly string[]): string {
  return `damaged credential records, not read and not re-wrapped (they may need any key version; repair them, then run "master-key rotate --resume"): ${damaged.join(', ')}`;
}

/**
 * `egress master-key …`: the key-encryption keyring. Key material is never printed.
 * rotate: (1) the keyring file gains a new active key, atomically; (2) every data key is re-wrapped
 * with it, one record at a time, each write atomic. A crash at any point leaves every record
 * wrapped by a key the keyring still holds; running rotate again finishes the re-wrap. rotate and
 * remove hold the keyring's writer lock from their first read to their last write. Record writers
 * do not take that lock: they read the keyring when they start, and the store refuses a data key
 * wrapped below the floor that rotate and remove raise (store/kek-floor.ts).
 */
export async function masterKey(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest, { version: { type: 'string' }, resume: { type: 'boolean' } });
  maxArgs(p.positionals, 0, USAGE);
  // Ignored, they would do what was not asked: `rotate --version 1` added a key.
  if (sub !== undefined && Object.hasOwn(OPTIONS, sub)) onlyOptions(p.values, ['version', 'resume'], OPTIONS[sub]!, `master-key ${sub}`, USAGE);
  const settings = p.settings();
  switch (sub) {
    case 'init': {
      const keyring = await createKeyring(settings.masterKeyFile);
      return ok(`created master key file ${settings.masterKeyFile} (mode 0600) with key version ${keyring.active}; back it up: without it no credential can be decrypted`, { file: settings.masterKeyFile, versions: keyring.versions() });
    }
    case 'status': {
      const keyring = await readKeyring(settings.masterKeyFile);
      const store = openStore(settings.store);
      try {
        const { wraps, damaged } = await wrapCounts(store);
        const floor = await store.kekFloor();
        const versions = keyring.versions().map((v) => ({ ...v, wraps: wraps.get(v.version) ?? 0 }));
        const missing = [...wraps.keys()].filter((k) => keyring.get(k) === undefined);
        const rows = [['VERSION', 'ACTIVE', 'CREATED', 'WRAPS'], ...versions.map((v) => [String(v.version), v.active ? 'yes' : '', v.createdAt, String(v.wraps)])];
        const warnings = [
          ...(missing.length ? [`records wrapped by key versions missing from the keyring: ${missing.join(', ')}`] : []),
          ...(floor > keyring.active ? [olderCopy(settings.masterKeyFile, floor, keyring.active)] : []),
          ...(damaged.length ? [damagedNote(damaged)] : []),
        ];
        const floorLine = floor > 0 ? `\nthe store takes new data keys wrapped by key version ${floor} or later` : '';
        return { code: warnings.length ? EXIT.failure : EXIT.ok, text: `${settings.masterKeyFile}\n${table(rows)}${floorLine}${warnings.map((w) => `\n${w}`).join('')}`, data: { file: settings.masterKeyFile, versions, missing_versions: missing, kek_floor: floor, damaged } };
      } finally {
        await store.close();
      }
    }
    case 'rotate':
      return withKeyringLock(settings.masterKeyFile, async (held) => {
        let keyring = await readKeyring(settings.masterKeyFile);
        const store = openStore(settings.store);
        try {
          // Before a key is added: with an older copy of the master key file, every attempt would
          // add a key and then fail, and the keys added would never be used.
          const floor = await store.kekFloor();
          if (floor > keyring.active) throw new UserError(`${olderCopy(settings.masterKeyFile, floor, keyring.active)}; nothing was changed`);
          // --resume finishes an interrupted re-wrap with the key already active, adding no new one.
          if (p.values.resume !== true) {
            keyring = keyring.withNewKey(new Date());
            await writeKeyring(settings.masterKeyFile, keyring, held);
          }
          // Before the re-wrap reads the records: a writer that wrapped with an older key and
          // commits after this is refused, so none slips in behind the re-wrap.
          await store.raiseKekFloor(keyring.active);
          const changed = await rewrapAll({ store, actor: cliActor() }, keyring);
          const { wraps, damaged } = await wrapCounts(store);
          const versions = keyring.versions().map((v) => ({ ...v, wraps: wraps.get(v.version) ?? 0 }));
          const removable = damaged.length ? [] : versions.filter((v) => !v.active && v.wraps === 0).map((v) => v.version);
          return ok(`key version ${keyring.active} is active; re-wrapped ${changed} record${changed === 1 ? '' : 's'}${removable.length ? `; versions ${removable.join(', ')} wrap nothing now and can be removed with "master-key remove --version N"` : ''}${damaged.length ? `\n${damagedNote(damaged)}` : ''}`, { active: keyring.active, rewrapped: changed, versions, damaged });
        } finally {
          await store.close();
        }
      });
    case 'remove': {
      const raw = p.values.version;
      // Digits only, as keys revoke --version: Number() also reads "0x2", "2e0" and " 2 ", and a removed key is gone for good.
      if (typeof raw !== 'string' || !/^[1-9][0-9]{0,14}$/.test(raw)) throw new UserError('remove needs --version N (a key version number)', EXIT.usage);
      const version = Number(raw);
      return withKeyringLock(settings.masterKeyFile, async (held) => {
        const keyring = await readKeyring(settings.masterKeyFile);
        if (version === keyring.active) throw new UserError(`key version ${version} is the active one and cannot be removed; rotate first`);
        const store = openStore(settings.store);
        try {
          const floor = await store.kekFloor();
          if (floor > keyring.active) throw new UserError(`${olderCopy(settings.masterKeyFile, floor, keyring.active)}; nothing was changed`);
          // Before the count (a store last rotated without the floor): no write after it can wrap with `version`.
          await store.raiseKekFloor(keyring.active);
          const counted = await wrapCounts(store);
          const wraps = counted.wraps.get(version) ?? 0;
          if (wraps > 0) throw new UserError(`key version ${version} still wraps ${wraps} data key${wraps === 1 ? '' : 's'}; run "master-key rotate --resume" first`);
          if (counted.damaged.length) throw new UserError(`key version ${version} was not removed: ${damagedNote(counted.damaged)}`);
          await writeKeyring(settings.masterKeyFile, keyring.without(version), held);
          return ok(`removed key version ${version} from ${settings.masterKeyFile}`, { removed: version });
        } finally {
          await store.close();
        }
      });
    }
    default:
      throw new UserError(USAGE, EXIT.usage);
  }
}

/** The store was rotated past this master key file: it is an older copy (or the store's floor was edited by hand). */
function olderCopy(file: string, floor: number, active: number): string {
  return `the store takes new data keys from master key version ${floor} on, but the newest key in ${file} is version ${active}: this file is an older copy of the master key (use the current one), or the store's floor (kek_floor) was edited by hand`;
}
