import { REDACTED } from '../secret.ts';

/** Values shorter than this are not treated as echoes: redacting every "1" would mangle responses. */
const MIN_SECRET_LENGTH = 4;

/** Replace every occurrence of any of `secrets` in `text` with [REDACTED]. */
export function redactText(text: string, secrets: readonly string[]): string {
  return redactor(secrets)(text);
}

/**
 * A redaction function for one set of secrets, prepared once (deduplicated, too-short ones dropped,
 * longest first so a secret that contains another is replaced whole) and applied to many values.
 */
export function redactor(secrets: readonly string[]): (text: string) => string {
  const ordered = [...new Set(secrets)].filter((s) => s.length >= MIN_SECRET_LENGTH).sort((a, b) => b.length - a.length);
  return (text) => {
    let out = text;
    for (const secret of ordered) if (out.includes(secret)) out = out.split(secret).join(REDACTED);
    return out;
  };
}

/** A secret's forms as an upstream might echo it: raw, URL-encoded, JSON-escaped and base64. */
export function echoForms(value: string): string[] {
  const forms = new Set([value, encodeURIComponent(value), JSON.stringify(value).slice(1, -1), Buffer.from(value, 'utf8').toString('base64')]);
  return [...forms];
}
