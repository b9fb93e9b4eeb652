import { z } from 'zod';
import { ProxyError } from '../errors.ts';
import type { Secret } from '../secret.ts';

/** A `{field}` template compiled once at config load: literal text and credential field references. */
export interface Template {
  readonly source: string;
  readonly parts: readonly (string | { readonly field: string })[];
  readonly fields: readonly string[];
}

const FIELD = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;

/** `"Bearer {token}"` -> parts. `{{` and `}}` stand for literal braces. Throws on a malformed template. */
export function compileTemplate(source: string): Template {
  const parts: (string | { field: string })[] = [];
  const fields: string[] = [];
  let literal = '';
  for (let i = 0; i < source.length; i++) {
    const ch = source[i]!;
    if ((ch === '{' || ch === '}') && source[i + 1] === ch) {
      literal += ch;
      i++;
    } else if (ch === '{') {
      const end = source.indexOf('}', i);
      const name = end === -1 ? '' : source.slice(i + 1, end);
      // The template is not quoted: the error reaches /readyz and logs, and a literal part may be a key pasted in by mistake.
      if (!FIELD.test(name)) throw new Error(`bad placeholder at character ${i + 1} of the template: expected {field_name}, or {{ for a literal "{"`);
      if (literal) parts.push(literal);
      literal = '';
      parts.push({ field: name });
      if (!fields.includes(name)) fields.push(name);
      i = end;
    } else if (ch === '}') {
      throw new Error(`unmatched "}" at character ${i + 1} of the template (write }} for a literal "}")`);
    } else {
      literal += ch;
    }
  }
  if (literal) parts.push(literal);
  return Object.freeze({ source, parts: Object.freeze(parts), fields: Object.freeze(fields) });
}

/** A zod string that compiles into a Template, reporting a bad placeholder as a validation issue. */
export const templateString = z.string().min(1).transform((value, ctx) => {
  try {
    return compileTemplate(value);
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: (err as Error).message });
    return z.NEVER;
  }
});

/**
 * Render a template with the credential's fields. A missing field refuses the request: sending it
 * without its credential is never an option.
 */
export function render(template: Template, fields: ReadonlyMap<string, Secret>): string {
  let out = '';
  for (const part of template.parts) {
    if (typeof part === 'string') {
      out += part;
      continue;
    }
    const value = fields.get(part.field);
    if (value === undefined) {
      throw new ProxyError('credential_unavailable', `The credential has no field "${part.field}".`);
    }
    out += value.reveal();
  }
  return out;
}
