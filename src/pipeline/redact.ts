import { REDACTED } from '../secret.ts';

/** Values shorter than this are not treated as echoes: redacting every "1" would mangle responses. */
const MIN_SECRET_LENGTH = 4;

/** Replace every occurrence of any of `secrets` in `text` with [REDACTED]. */
export function redactText(text: string, secrets: readonly string[]): string {
  return redactor(secrets)(text);
}

/**
 * A redaction function for one set of secrets, applied to many values. A value that contains none
 * of them (nearly every response header) costs one search per secret; the first value that does
 * prepares the list (deduplicated, too-short ones dropped, longest first so a secret that contains
 * another is replaced whole).
 */
export function redactor(secrets: readonly string[]): (text: string) => string {
  let ordered: string[] | undefined;
  return (text) => {
    if (!containsAny(text, secrets)) return text;
    ordered ??= [...new Set(secrets)].filter((s) => s.length >= MIN_SECRET_LENGTH).sort((a, b) => b.length - a.length);
    let out = text;
    for (const secret of ordered) if (out.includes(secret)) out = out.split(secret).join(REDACTED);
    return out;
  };
}

function containsAny(text: string, secrets: readonly string[]): boolean {
  for (const secret of secrets) if (secret.length >= MIN_SECRET_LENGTH && text.includes(secret)) return true;
  return false;
}

/** A secret's forms as an upstream might echo it: raw, URL-encoded, JSON-escaped and base64. */
export function echoForms(value: string): string[] {
  const forms = new Set([value, encodeURIComponent(value), JSON.stringify(value).slice(1, -1), Buffer.from(value, 'utf8').toString('base64')]);
  return [...forms];
}
