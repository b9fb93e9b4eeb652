import fc from 'fast-check';
import { stringify } from 'yaml';
import { describe, expect, it } from 'vitest';
import { parseRouteText } from '../../src/config/load-routes.ts';
import { runs } from './runs.ts';

/**
 * The route-file loader against arbitrary input: it never throws, never pollutes a prototype,
 * reports every refusal as problems with a position, and whatever it accepts is a well-formed route.
 */
const noCa = async () => {
  throw Object.assign(new Error('no'), { code: 'ENOENT' });
};

function check(result: Awaited<ReturnType<typeof parseRouteText>>): void {
  expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  expect(Object.prototype).not.toHaveProperty('polluted');
  if ('problems' in result) {
    expect(result.problems.length).toBeGreaterThan(0);
    for (const p of result.problems) {
      expect(typeof p.message).toBe('string');
      expect(p.line).toBeGreaterThanOrEqual(0);
      expect(p.col).toBeGreaterThanOrEqual(0);
    }
    return;
  }
  const r = result.route;
  expect(r.prefix.startsWith('/')).toBe(true);
  expect(r.prefix.endsWith('/')).toBe(false);
  expect(r.prefixSegments.every((s) => s !== '' && s !== '.' && s !== '..')).toBe(true);
  expect(Object.isFrozen(r)).toBe(true);
  expect(['http:', 'https:']).toContain(new URL(r.origin).protocol);
}

const key = fc.constantFrom('name', 'prefix', 'upstream', 'credential', 'inject', 'allow', 'max_body', 'timeouts', 'hosts', 'preset', '__proto__', 'constructor', '<<', 'extra', 'rate', 'upstream_rate');
const scalar = fc.oneof(fc.string({ maxLength: 20 }), fc.integer(), fc.boolean(), fc.constant(null), fc.constantFrom('/plaid', '/..', '/a/%2e', 'https://x.example', 'http://127.0.0.1:1', '{secret}', '{', '20/s', '20/constructor', 'POST', 'post', '/**', '/a/**/b'));
const value: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
  v: fc.oneof({ depthSize: 'small' }, scalar, fc.array(tie('v'), { maxLength: 3 }), fc.dictionary(key, tie('v'), { maxKeys: 4 })),
})).v;

describe('route-file loader under fuzzing', () => {
  it('arbitrary text never throws and is either a valid route or positioned problems', async () => {
    await fc.assert(fc.asyncProperty(fc.string({ maxLength: 300 }), async (text) => check(await parseRouteText(text, '/x/plaid.yaml', noCa))), { numRuns: runs(300) });
  });

  it('structured YAML with hostile keys and values never throws and never pollutes', async () => {
    const doc = fc.record({
      name: fc.constantFrom('plaid', 'x', 'Plaid', ''),
      prefix: scalar,
      upstream: scalar,
      credential: scalar,
      inject: value,
      allow: value,
    }, { requiredKeys: [] }).chain((base) => fc.dictionary(key, value, { maxKeys: 3 }).map((extra) => ({ ...base, ...extra })));
    await fc.assert(fc.asyncProperty(doc, async (d) => {
      const text = stringify(d);
      check(await parseRouteText(text, '/x/plaid.yaml', noCa));
      // Merge keys and anchors written by hand, around the same document.
      check(await parseRouteText(`base: &b {polluted: yes}\n<<: *b\n${text}`, '/x/plaid.yaml', noCa));
    }), { numRuns: runs(200) });
  });
});
