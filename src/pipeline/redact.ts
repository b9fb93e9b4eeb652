import { REDACTED } from '../secret.ts';

/** Values shorter than this are not treated as echoes: redacting every "1" would mangle responses. */
const MIN_SECRET_LENGTH = 4;

/** Replace every occurrence of any of `secrets` in `text` (a byte string, see redactor) with [REDACTED]. */
export function redactText(text: string, secrets: readonly string[]): string {
  return redactor(needlesOf(secrets))(text);
}

/**
 * A redaction function for one set of needles (needlesOf: the secrets as lower-cased byte
 * strings), applied to many values. Values are byte strings, one character per byte (latin1), as
 * undici decodes header values and as inspected bodies are read. Case is ignored: upstreams quote
 * a key upper-cased, and hex and \uXXXX escapes come in either case. Both sides are lower-cased,
 * and toLowerCase maps each of the 256 latin1 characters to exactly one latin1 character, so an
 * index into the lowered value is the same index into the value (toUpperCase would not do: ß, µ
 * and ÿ grow or leave latin1). A value that contains no secret (nearly every response header)
 * costs one lower-casing (none for a value that is lower-case already) and one search per needle.
 */
export function redactor(needles: readonly string[]): (text: string) => string {
  return (text) => {
    if (needles.length === 0) return text;
    const lower = text.toLowerCase();
    for (const needle of needles) if (lower.includes(needle)) return replace(text, lower, needles);
    return text;
  };
}

/**
 * What the redactor looks for, for these secrets: each secret's UTF-8 bytes, lower-cased, and for
 * a secret of latin1 characters beyond ASCII also its latin1 bytes (undici writes header values
 * as latin1, one byte per character, so an upstream that got it in a header echoes those bytes).
 * Deduplicated, too-short ones dropped. A credential's needles are made once per opened version
 * (resolve-credential.ts); a value made per request (a signature, a fetched token) when it is sent.
 */
export function needlesOf(secrets: readonly string[]): string[] {
  const needles: string[] = [];
  const add = (needle: string) => {
    if (needle.length >= MIN_SECRET_LENGTH && !needles.includes(needle)) needles.push(needle);
  };
  for (const secret of secrets) {
    if (/^[\x00-\x7f]*$/.test(secret)) add(secret.toLowerCase());
    else {
      add(Buffer.from(secret, 'utf8').toString('latin1').toLowerCase());
      if (/^[\x00-\xff]*$/.test(secret)) add(secret.toLowerCase());
    }
  }
  return needles;
}

/**
 * `text` with every range where `lower` holds a needle replaced by [REDACTED]; overlapping and
 * touching matches become one [REDACTED], so no part of either is left.
 */
function replace(text: string, lower: string, needles: readonly string[]): string {
  const covered = new Uint8Array(text.length);
  for (const needle of needles) {
    let filledTo = 0;
    for (let at = lower.indexOf(needle); at !== -1; at = lower.indexOf(needle, at + 1)) {
      const end = at + needle.length;
      covered.fill(1, Math.max(at, filledTo), end);
      filledTo = end;
    }
  }
  let out = '';
  let kept = 0;
  for (let i = 0; i < covered.length; i++) {
    if (covered[i] === 0) continue;
    out += text.slice(kept, i) + REDACTED;
    while (i < covered.length && covered[i] === 1) i++;
    kept = i;
  }
  return out + text.slice(kept);
}

/** `\\uXXXX` of each ASCII code unit, made once: tokens and signatures are escaped on every request. */
const ASCII_ESCAPES = Array.from({ length: 128 }, (_, c) => `\\u${c.toString(16).padStart(4, '0')}`);

function unicodeEscape(code: number): string {
  return code < 128 ? ASCII_ESCAPES[code]! : `\\u${code.toString(16).padStart(4, '0')}`;
}

const HTML_ESCAPES: Readonly<Record<string, string>> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

/**
 * The secret inside a longer base64 text (a request body, "user:secret", a header line quoted
 * whole): at each of the three byte offsets it may start at, the characters that encode its bytes
 * only. The characters at either end, which also encode a neighbour's bits, are left as they are.
 * A slice shorter than MIN_EMBEDDED_BASE64 is not looked for: it would turn up by chance in
 * unrelated base64 (an image, a certificate) and mangle it.
 */
function embeddedBase64(bytes: Buffer): string[] {
  const inner: string[] = [];
  for (let shift = 0; shift < 3; shift++) {
    const text = Buffer.concat([Buffer.alloc(shift), bytes]).toString('base64');
    const slice = text.slice(Math.ceil((8 * shift) / 6), Math.floor((8 * (shift + bytes.length)) / 6));
    if (slice.length >= MIN_EMBEDDED_BASE64) inner.push(slice);
  }
  return inner;
}

/** Characters of a secret's base64 inside a longer text (embeddedBase64) worth looking for: 48 bits. */
const MIN_EMBEDDED_BASE64 = 8;

/**
 * A secret's forms as an upstream might echo it: raw; percent-encoded (upper- and lower-case hex,
 * form-encoded, with "/" kept, and as the stricter encoders of Go, PHP, Python and Java write it); JSON-escaped (also with "/" as "\/", as PHP writes it; with <, >, & and the
 * line and paragraph separators as \uXXXX, as Go and Rails write it; with every character as
 * \uXXXX, as some encoders and loggers write it; with only its non-ASCII characters as \uXXXX,
 * as Python's json.dumps does); HTML-escaped; base64 with and without padding, and base64url, also
 * inside a longer base64 text (embeddedBase64); the hex of its UTF-8 bytes. The redactor ignores case, which covers upper- and lower-case hex and a
 * key quoted upper- or lower-cased; for a secret with non-ASCII letters, its upper- and
 * lower-cased forms are listed too (their UTF-8 bytes differ by more than ASCII case). For a
 * secret of letters and digits many of these are the raw value again, and the set holds each form
 * once.
 */
export function echoForms(value: string): string[] {
  const percent = encodeURIComponent(value);
  // RFC 3986 as strict encoders apply it (Go's url.QueryEscape, PHP's rawurlencode, Python's
  // quote with safe=''): ! ' ( ) * are escaped too, which encodeURIComponent leaves.
  const strict = percent.replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  const json = JSON.stringify(value).slice(1, -1);
  const bytes = Buffer.from(value, 'utf8');
  const base64 = bytes.toString('base64');
  let unicodeEscaped = '';
  for (let i = 0; i < value.length; i++) unicodeEscaped += unicodeEscape(value.charCodeAt(i));
  const forms = new Set([
    value,
    percent,
    percent.replace(/%[0-9A-F]{2}/g, (escape) => escape.toLowerCase()),
    percent.replaceAll('%20', '+'),
    // Python's urllib.parse.quote keeps "/" unless told otherwise.
    percent.replaceAll('%2F', '/'),
    strict,
    strict.replaceAll('%20', '+'),
    // Java's URLEncoder: a form, with "*" kept and "~" escaped.
    strict.replaceAll('%20', '+').replaceAll('%2A', '*').replaceAll('~', '%7E'),
    json,
    json.replaceAll('/', '\\/'),
    // HTML-safe JSON, as Go's encoding/json and Rails write it: <, >, &, U+2028 and U+2029 as \uXXXX.
    json.replace(/[<>&\u2028\u2029]/g, (c) => unicodeEscape(c.charCodeAt(0))),
    unicodeEscaped,
    value.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]!),
    base64,
    base64.replace(/=+$/, ''),
    bytes.toString('base64url'),
    bytes.toString('hex'),
  ]);
  for (const inner of embeddedBase64(bytes)) {
    forms.add(inner);
    forms.add(inner.replaceAll('+', '-').replaceAll('/', '_'));
  }
  if (/[^\x00-\x7f]/.test(value)) {
    forms.add(value.toUpperCase());
    forms.add(value.toLowerCase());
    // Python's json.dumps by default (ensure_ascii) escapes only these characters; PHP's
    // json_encode by default escapes them and "/" as well.
    const asciiOnly = json.replace(/[^\x00-\x7f]/g, (c) => unicodeEscape(c.charCodeAt(0)));
    forms.add(asciiOnly);
    forms.add(asciiOnly.replaceAll('/', '\\/'));
  }
  return [...forms];
}
