import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import { NO_CONTENT_METHODS } from '../pipeline/body.ts';
import { render, templateString } from './template.ts';
import type { Injector } from './types.ts';

const schema = z.strictObject({
  scheme: z.literal('json_body'),
  fields: z.record(z.string().min(1).max(128), templateString)
    .refine((f) => Object.keys(f).length > 0, 'at least one field is required'),
});
type Options = z.output<typeof schema>;

// ES2025 JSON.parse source text access (Node 22+), not yet in TypeScript's lib.
type SourceReviver = (key: string, value: unknown, context: { source?: string }) => unknown;
const json = JSON as unknown as {
  parse(text: string, reviver: SourceReviver): unknown;
  rawJSON(text: string): unknown;
  isRawJSON(value: unknown): boolean;
};

/** Decodes UTF-8 or throws: a lenient decode would turn bytes it cannot read into U+FFFD unseen. */
export const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Numbers keep the text the caller wrote: a 64-bit id or a decimal amount parsed into a double and
 * written out again would change (12345678901234567890 -> 12345678901234567000, 10.10 -> 10.1).
 */
const keepNumberText: SourceReviver = (_key, value, context) =>
  typeof value === 'number' && context.source !== undefined ? json.rawJSON(context.source) : value;

/**
 * Credential fields merged into a top-level JSON object body (Plaid body mode). The proxy's fields
 * win over any the caller sent; Content-Length is recomputed when the request is sent.
 */
export const jsonBodyInjector: Injector<Options> = {
  scheme: 'json_body',
  schema,
  needsBody: true,
  readsBody: 'The proxy merges this route\'s credential into the JSON body (json_body)',
  claims: (options) => ({ headers: [], query: [], bodyFields: Object.keys(options.fields) }),
  templates: (options) => Object.values(options.fields),
  inject({ request, credential, options, redact }) {
    // The credential travels in the body: a method without content cannot carry it (see NO_CONTENT_METHODS).
    if (NO_CONTENT_METHODS.has(request.method.toUpperCase())) throw new ProxyError('bad_request', `This route sends its credential in a JSON body, which a ${request.method} request cannot carry.`);
    const body = jsonObjectBody(request.body) ?? (Object.create(null) as Record<string, unknown>);
    // Decoders that match keys without regard to case (Go's encoding/json, Jackson with
    // ACCEPT_CASE_INSENSITIVE_PROPERTIES) take the last of "secret" and "SECRET": a caller copy in
    // another case is dropped, and the proxy's fields go last.
    dropFields(body, new Set(Object.keys(options.fields).map((n) => n.toLowerCase())));
    for (const [name, template] of Object.entries(options.fields)) {
      const value = render(template, credential.fields);
      redact(value);
      redact(JSON.stringify(value).slice(1, -1));
      body[name] = value;
    }
    request.body = Buffer.from(JSON.stringify(body), 'utf8');
    request.headers.set('content-type', ['application/json']);
  },
};

/**
 * A request body as a JSON object (a null-prototype copy: a "__proto__" key stays a plain key, and
 * numbers keep their text); undefined when there is no body. Anything else is a 400.
 */
export function jsonObjectBody(raw: Buffer | undefined): Record<string, unknown> | undefined {
  if (!raw || raw.length === 0) return undefined;
  let text: string;
  try {
    // RFC 8259 §8.1: JSON between systems is UTF-8. Other bytes would be replaced by U+FFFD and
    // sent on silently changed (a Latin-1 "é" in a name); refuse them instead.
    text = UTF8.decode(raw);
  } catch {
    throw new ProxyError('bad_request', 'This route needs a JSON object body in UTF-8.');
  }
  let parsed: unknown;
  try {
    parsed = json.parse(text, keepNumberText);
  } catch {
    throw new ProxyError('bad_request', 'This route needs a JSON object body.');
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed) || json.isRawJSON(parsed)) {
    throw new ProxyError('bad_request', 'This route needs a JSON object body.');
  }
  return Object.assign(Object.create(null), parsed) as Record<string, unknown>;
}

/** Remove the top-level fields whose lower-cased names are in `lowerNames`; whether any was there. */
export function dropFields(body: Record<string, unknown>, lowerNames: ReadonlySet<string>): boolean {
  let dropped = false;
  for (const key of Object.keys(body)) {
    if (!lowerNames.has(key.toLowerCase())) continue;
    delete body[key];
    dropped = true;
  }
  return dropped;
}
