import type { IncomingMessage } from 'node:http';
import { ProxyError } from '../errors.ts';
import { claimedName, claimedPiece, ownedNames } from './param-names.ts';

/**
 * Form bodies are read by frameworks as parameters beside the query's: Rack::MethodOverride takes
 * `_method` from a POST's form fields (multipart too), Laravel and Symfony from $_POST, and PHP's
 * $_REQUEST and Laravel's input() let a body field win over the query parameter of the same name.
 * So a form body holding a name the route claims in the query (`_method`, a query credential) is
 * refused, compared as the query check compares names (param-names.ts). Refused, not rewritten: a
 * body is sent as the caller wrote it or not at all.
 */

type FormKind = 'urlencoded' | 'multipart';

/** What the check does, for the refusal of a form body under a Content-Encoding (refuseCodedBody). */
export const FORM_CHECK = 'The proxy checks a form body for fields read as parameters (_method, and those the route sets in the query)';

/**
 * The body's form kinds, each with the Content-Type that makes it one: multipart as Rack parses it
 * (form-data, mixed, related), and a POST with no Content-Type, which Rack parses as a form. Every
 * Content-Type line counts, in either spelling ("Content_Type" is CONTENT_TYPE to CGI and PHP):
 * Node keeps the first, and an upstream may take another, so a second line must not hide a form.
 */
export function formKinds(req: IncomingMessage): [FormKind, string][] {
  const kinds: [FormKind, string][] = [];
  let typed = false;
  const raw = req.rawHeaders;
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.toLowerCase().replaceAll('_', '-') !== 'content-type') continue;
    typed = true;
    const type = raw[i + 1]!;
    const media = type.split(';', 1)[0]!.trim().toLowerCase();
    if (media === 'application/x-www-form-urlencoded') kinds.push(['urlencoded', type]);
    else if (media === 'multipart/form-data' || media === 'multipart/mixed' || media === 'multipart/related') kinds.push(['multipart', type]);
  }
  if (!typed && req.method === 'POST') kinds.push(['urlencoded', '']);
  return kinds;
}

/**
 * Refuse (400 bad_request) a form body with a field read as a claimed name; the message names the
 * claimed name, never the caller's bytes. `kinds` is formKinds of the request the body came with.
 */
export function refuseClaimedFields(kinds: readonly [FormKind, string][], body: Buffer, claimed: ReadonlySet<string>): void {
  if (body.length === 0) return;
  const owned = ownedNames(claimed);
  const text = body.toString('latin1');
  for (const [kind, type] of kinds) {
    const name = kind === 'urlencoded' ? urlencodedField(text, owned) : multipartField(text, type, owned);
    if (name === undefined) continue;
    const why = name === '_method' ? 'which frameworks read as the request method' : 'which the proxy sets itself on this route';
    throw new ProxyError('bad_request', `The form body carries a field read as "${name}", ${why}; remove it.`);
  }
}

/** As the query check splits: on "&", and on ";" inside a pair. */
function urlencodedField(text: string, owned: ReadonlyMap<string, string>): string | undefined {
  for (const pair of text.split('&')) {
    for (const piece of pair.split(';')) {
      const name = claimedPiece(piece, owned);
      if (name !== undefined) return name;
    }
  }
  return undefined;
}

/**
 * Each part's Content-Disposition `name` (quoted or not, and RFC 5987's `name*=`). Without a
 * boundary the body is no multipart body any parser reads, and it goes on as before. Part headers
 * end at an empty line, CRLF or bare LF (PHP accepts both).
 */
function multipartField(text: string, contentType: string, owned: ReadonlyMap<string, string>): string | undefined {
  const boundary = parameter(contentType, 'boundary');
  if (!boundary) return undefined;
  const delimiter = `--${boundary}`;
  for (let at = text.indexOf(delimiter); at !== -1;) {
    const start = at + delimiter.length;
    // A part's headers are looked for up to the next delimiter only: searched to the end of the body
    // from every delimiter, a body of delimiters and no empty line cost time in the square of its size.
    const next = text.indexOf(delimiter, start);
    const part = text.slice(start, next === -1 ? text.length : next);
    const end = part.search(/\r?\n\r?\n/);
    const head = end === -1 ? part : part.slice(0, end);
    at = next;
    for (const line of head.split(/\r?\n/)) {
      const colon = line.indexOf(':');
      if (colon === -1 || line.slice(0, colon).trim().toLowerCase() !== 'content-disposition') continue;
      for (const value of [parameter(line.slice(colon + 1), 'name'), extendedName(parameter(line.slice(colon + 1), 'name*'))]) {
        const name = value === undefined ? undefined : claimedName(value, owned);
        if (name !== undefined) return name;
      }
    }
  }
  return undefined;
}

/** A header parameter's value (RFC 9110 §5.6.6): a token, or a quoted string (also in single quotes, as PHP reads them) unescaped. */
function parameter(header: string, wanted: string): string | undefined {
  const re = /;\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|'[^']*'|[^;]*)/g;
  for (const match of `;${header.replace(/^[^;]*;?/, '')}`.matchAll(re)) {
    if (match[1]!.toLowerCase() !== wanted) continue;
    const raw = match[2]!.trim();
    if (raw.startsWith('"')) return raw.slice(1, -1).replace(/\\(.)/g, '$1');
    if (raw.startsWith("'")) return raw.slice(1, -1);
    return raw;
  }
  return undefined;
}

/** RFC 8187's charset''percent-encoded form of `name*`. */
function extendedName(value: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  const encoded = value.slice(value.indexOf("''") + 2);
  try {
    return decodeURIComponent(encoded);
  } catch {
    return encoded;
  }
}
