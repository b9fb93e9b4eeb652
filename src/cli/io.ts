import { readFile } from 'node:fs/promises';
import { userInfo } from 'node:os';
import { text } from 'node:stream/consumers';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { loadSettings, SETTINGS, type SettingName, type Settings } from '../config/settings.ts';
import { UserError } from '../errors.ts';
import { validateFields, type FieldValues } from '../store/credentials.ts';
import { parseDuration } from '../config/units.ts';
import { parseGrace } from '../rotation/transitions.ts';

export const EXIT = { ok: 0, failure: 1, usage: 2, conflict: 3 } as const;

/** What a command hands back: text for people, data for `--json`, and the exit code. */
export interface Outcome {
  readonly code: number;
  readonly text: string;
  readonly data: unknown;
}

export function ok(text: string, data: unknown): Outcome {
  return { code: EXIT.ok, text, data };
}

export function fail(text: string, data: unknown, code: number = EXIT.failure): Outcome {
  return { code, text, data };
}

type Options = NonNullable<ParseArgsConfig['options']>;

const SETTING_OPTIONS: Options = Object.fromEntries(Object.values(SETTINGS).map((s) => [s.flag, { type: 'string' }]));

export interface Parsed {
  readonly values: Record<string, string | boolean | undefined>;
  readonly positionals: string[];
  readonly json: boolean;
  settings(): Settings;
}

/** Parse a command's arguments: its own options, `--json`, and every setting flag. Unknown flags are usage errors. */
export function parse(args: readonly string[], options: Options = {}): Parsed {
  let result;
  try {
    result = parseArgs({ args: [...args], options: { ...SETTING_OPTIONS, ...options, json: { type: 'boolean' } }, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UserError((err as Error).message, EXIT.usage);
  }
  const values = result.values as Record<string, string | boolean | undefined>;
  return {
    values,
    positionals: result.positionals,
    json: values.json === true,
    settings: () => {
      const flags: Partial<Record<SettingName, string>> = {};
      for (const [name, spec] of Object.entries(SETTINGS) as [SettingName, (typeof SETTINGS)[SettingName]][]) {
        const v = values[spec.flag];
        if (typeof v === 'string') flags[name] = v;
      }
      return loadSettings(process.env, flags);
    },
  };
}

/**
 * Secret values come only from a file or standard input, as a JSON object of fields: never argv,
 * where every user of the machine can read them.
 */
export async function readFieldsInput(values: Parsed['values'], stdin: () => Promise<string>): Promise<FieldValues> {
  const file = values['from-file'];
  const fromStdin = values['from-stdin'] === true;
  if ((typeof file === 'string') === fromStdin) throw new UserError('give the credential fields with exactly one of --from-file FILE or --from-stdin', EXIT.usage);
  let text: string;
  if (typeof file === 'string') {
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      // The file's name is not repeated: what was typed here may be the secret, or the fields themselves.
      throw new UserError(`cannot read the --from-file file (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
    }
  } else {
    text = await stdin();
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new UserError('the credential fields are not valid JSON (expected an object such as {"client_id": "...", "secret": "..."})');
  }
  const checked = validateFields(parsed);
  if (!checked.ok) throw new UserError(checked.message);
  return checked.fields;
}

/**
 * Standard input for --from-stdin. From a pipe or a file, all of it. From a terminal, read with
 * echo off (raw mode), so typed or pasted fields do not stay on the screen, in its scrollback or in
 * a session recording: Ctrl-D ends the input, Ctrl-C cancels, Backspace removes a character.
 */
export async function readStdin(stdin: NodeJS.ReadStream = process.stdin, prompt: NodeJS.WritableStream = process.stderr): Promise<string> {
  if (!stdin.isTTY) return text(stdin);
  prompt.write('credential fields as a JSON object, then Ctrl-D (not shown as you type): ');
  stdin.setRawMode(true);
  stdin.setEncoding('utf8');
  try {
    return await new Promise<string>((resolveInput, reject) => {
      let input = '';
      const onData = (chunk: string) => {
        for (const ch of chunk) {
          if (ch === '\x04') return done(() => resolveInput(input));
          if (ch === '\x03') return done(() => reject(new UserError('cancelled')));
          if (ch === '\x7f' || ch === '\b') input = [...input].slice(0, -1).join('');
          else input += ch === '\r' ? '\n' : ch;
        }
      };
      const onEnd = () => done(() => resolveInput(input));
      const done = (settle: () => void) => {
        stdin.off('data', onData);
        stdin.off('end', onEnd);
        settle();
      };
      stdin.on('data', onData);
      stdin.on('end', onEnd);
    });
  } finally {
    stdin.setRawMode(false);
    stdin.pause();
    prompt.write('\n');
  }
}

/**
 * Refuse a command's own option given to a subcommand that does not take it: ignored, it would do
 * what was not asked (`keys revoke ID --grace 24h` revokes at once; `keys rollback ID --version 1`
 * rolls back to whichever version is previous).
 */
export function onlyOptions(values: Parsed['values'], own: readonly string[], allowed: readonly string[], command: string, usage: string): void {
  const stray = own.find((name) => values[name] !== undefined && !allowed.includes(name));
  if (stray) throw new UserError(`--${stray} is not an option of "${command}"\n${usage}`, EXIT.usage);
}

/** Refuse extra positionals: a value typed where it does not belong (a secret in argv) must not pass silently. */
export function maxArgs(positionals: readonly string[], max: number, usage: string): void {
  if (positionals.length > max) throw new UserError(`unexpected argument${positionals.length - max > 1 ? 's' : ''} after the command\n${usage}`, EXIT.usage);
}

/** `--grace`, or 24h: a grace window of at most a year (see parseGrace). */
export function graceFlag(values: Parsed['values']): number {
  const text = values.grace;
  const ms = parseGrace(typeof text === 'string' ? text : '24h');
  if (ms === undefined) throw new UserError('--grace must be a duration like 0, 30m, 24h or 7d, at most 365d', EXIT.usage);
  return ms;
}

/** A duration flag (`--max-age 90d`), or its default. */
export function durationFlag(values: Parsed['values'], name: string, fallback: string): number {
  const text = values[name];
  const ms = parseDuration(typeof text === 'string' ? text : fallback);
  if (ms === undefined) throw new UserError(`--${name} must be a duration like 0, 30s, 24h or 90d`, EXIT.usage);
  return ms;
}

/** Who runs this command, for the record's history and the audit log: EGRESS_ACTOR, or the OS user. */
export function cliActor(): string {
  const who = process.env.EGRESS_ACTOR ?? (() => {
    try {
      return userInfo().username;
    } catch {
      return 'unknown';
    }
  })();
  return `cli:${who.slice(0, 64)}`;
}

export function requireArg(positionals: readonly string[], index: number, what: string): string {
  const v = positionals[index];
  if (!v) throw new UserError(`missing ${what}`, EXIT.usage);
  return v;
}

export function table(rows: readonly (readonly string[])[]): string {
  if (rows.length === 0) return '';
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n');
}
