import { readFile } from 'node:fs/promises';
import { LineCounter, parseDocument } from 'yaml';
import { z } from 'zod';
import { parseDuration } from '../config/units.ts';
import { UserError } from '../errors.ts';

const duration = (fallback: string) =>
  z.string().default(fallback).transform((text, ctx) => {
    const ms = parseDuration(text);
    if (ms === undefined || ms <= 0) ctx.addIssue({ code: 'custom', message: `"${text}" is not a duration like 30s, 5m or 90d` });
    return ms ?? 0;
  });

const windowRule = (count: number, window: string) => z.strictObject({ count: z.number().int().min(1).default(count), window: duration(window) }).prefault({});

/**
 * Alert thresholds (EGRESS_ALERTS, a YAML file; every key optional). Defaults are meant to be quiet
 * on normal traffic and loud on the incidents they name.
 */
export const alertSettingsSchema = z.strictObject({
  /** Repeats of one alert for one subject inside this window are counted, not sent again. */
  cooldown: duration('5m'),
  /** Upstream rejections of the current key answered by falling back to the previous one. */
  fallback: windowRule(3, '1m'),
  /** Requests refused (403/404/400/413/429) for one caller. */
  denied_spike: windowRule(20, '1m'),
  /**
   * Unknown, expired or revoked tokens from one address (count), and from all addresses together
   * (total): brute force or a forgotten rotation, and guessing spread over many addresses. total
   * defaults to ten times count (100): a file that raised count for one busy address, written
   * before there was a total, must not have that address alert at 100 as "all addresses".
   */
  unknown_token: z.strictObject({ count: z.number().int().min(1).default(10), total: z.number().int().min(1).optional(), window: duration('1m') }).prefault({})
    .transform((rule) => ({ ...rule, total: rule.total ?? rule.count * 10 })),
  credential_max_age: z.strictObject({ default: duration('90d'), credentials: z.record(z.string(), z.string()).default({}) }).prefault({}),
  /** A caller's rate of use of a credential far above its own exponentially weighted baseline. */
  unusual_usage: z.strictObject({
    /** Alert when a bucket's count exceeds factor x the baseline… */
    factor: z.number().min(1.5).default(5),
    /** …and at least this many requests (quiet callers never alert on a handful). */
    min_count: z.number().int().min(1).default(60),
    bucket: duration('1m'),
    /** No alert until a caller has this much history. */
    warmup: duration('10m'),
    half_life: duration('30m'),
  }).prefault({}),
});

export type AlertSettings = z.output<typeof alertSettingsSchema>;

export function defaultAlertSettings(): AlertSettings {
  return alertSettingsSchema.parse({});
}

export async function loadAlertSettings(path: string | undefined): Promise<AlertSettings> {
  if (!path) return defaultAlertSettings();
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new UserError(`EGRESS_ALERTS file ${path} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, uniqueKeys: true, merge: false, schema: 'core' });
  if (doc.errors.length > 0) {
    const e = doc.errors[0]!;
    const pos = lineCounter.linePos(e.pos[0]);
    throw new UserError(`${path}:${pos.line}:${pos.col}: ${e.message.split('\n')[0]}`);
  }
  const parsed = alertSettingsSchema.safeParse(doc.toJS({ maxAliasCount: 0 }) ?? {});
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const node = doc.getIn(issue.path.map(String), true) as { range?: [number, number, number] } | undefined;
    const pos = lineCounter.linePos(node?.range?.[0] ?? 0);
    const where = issue.path.length ? `${issue.path.join('.')}: ` : '';
    throw new UserError(`${path}:${pos.line}:${pos.col}: ${where}${issue.code === 'unrecognized_keys' ? `unknown key ${issue.keys.map((k) => `"${k}"`).join(', ')}` : issue.message}`);
  }
  for (const [id, text] of Object.entries(parsed.data.credential_max_age.credentials)) {
    if (parseDuration(text) === undefined) throw new UserError(`${path}: credential_max_age.credentials.${id}: "${text}" is not a duration`);
  }
  return parsed.data;
}

export function maxAgeMs(settings: AlertSettings, credential: string): number {
  // Own entries only: "constructor" is a valid credential id, and the inherited property is a function.
  const table = settings.credential_max_age.credentials;
  const specific = Object.hasOwn(table, credential) ? table[credential] : undefined;
  return (specific !== undefined ? parseDuration(specific) : undefined) ?? settings.credential_max_age.default;
}
