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

const HTML_ESCAPES: Readonly<Record<string, string>> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

/**
 * A secret's forms as an upstream might echo it: raw; percent-encoded (upper- and lower-case hex,
 * and form-encoded); JSON-escaped (also with "/" as "\/", as PHP writes it); HTML-escaped; base64
 * with and without padding, and base64url. For a secret of letters and digits most of these are
 * the raw value again, and the set holds each form once.
 */
export function echoForms(value: string): string[] {
  const percent = encodeURIComponent(value);
  const json = JSON.stringify(value).slice(1, -1);
  const base64 = Buffer.from(value, 'utf8').toString('base64');
  const forms = new Set([
    value,
    percent,
    percent.replace(/%[0-9A-F]{2}/g, (escape) => escape.toLowerCase()),
    percent.replaceAll('%20', '+'),
    json,
    json.replaceAll('/', '\\/'),
    value.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]!),
    base64,
    base64.replace(/=+$/, ''),
    Buffer.from(value, 'utf8').toString('base64url'),
  ]);
  return [...forms];
}
