import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compilePattern, hasSegmentPrefix, matchPattern, splitPath } from '../../src/config/path-pattern.ts';
import { ProxyError } from '../../src/errors.ts';
import { outboundHeaders } from '../../src/pipeline/headers.ts';
import { parseTarget } from '../../src/pipeline/target.ts';
import { runs } from './runs.ts';

/** The target parser, the matcher and the header filter, at fuzzing scale (FUZZ_RUNS). */
const targetChars = fc.constantFrom('/', '.', '%', '2', 'e', 'E', 'f', 'F', '5', 'c', 'C', '0', 'a', 'b', '?', '#', '&', '=', ';', '\\', ' ', '*', '~', '-', '_', 'é', '\u0000');
const target = fc.array(targetChars, { maxLength: 40 }).map((cs) => cs.join(''));

describe('request path under fuzzing', () => {
  it('parseTarget: refused with bad_request, or canonical, idempotent, and free of anything that could mean two paths', () => {
    fc.assert(fc.property(fc.oneof(target, target.map((t) => `/${t}`), fc.string({ maxLength: 60 })), (raw) => {
      let parsed;
      try {
        parsed = parseTarget(raw);
      } catch (err) {
        expect(err).toBeInstanceOf(ProxyError);
        expect((err as ProxyError).code).toBe('bad_request');
        return;
      }
      expect(parsed.path.startsWith('/')).toBe(true);
      expect(parsed.path).not.toMatch(/%2f|%5c|%00|\\|#|\?/i);
      expect(parsed.segments.slice(0, -1).every((s) => s !== '')).toBe(true);
      expect(parsed.segments.every((s) => s !== '.' && s !== '..')).toBe(true);
      expect(parseTarget(parsed.path).path).toBe(parsed.path);
    }), { numRuns: runs(1000) });
  });

  it('a path a pattern matches stays under the route prefix and matches again after re-parsing', () => {
    const seg = fc.constantFrom('a', 'b', 'accounts', 'get', '*', '**', 'x.y', '%41');
    fc.assert(fc.property(fc.array(seg, { minLength: 1, maxLength: 4 }), target, (patternSegs, raw) => {
      const source = `/${patternSegs.filter((s, i, all) => s !== '**' || i === all.length - 1).join('/')}`;
      const pattern = compilePattern(source);
      let parsed;
      try {
        parsed = parseTarget(`/plaid/${raw}`);
      } catch {
        return;
      }
      if (!hasSegmentPrefix(parsed.segments, ['plaid'])) return;
      const rest = parsed.segments.slice(1);
      const relative = rest.length === 0 ? [''] : rest;
      if (!matchPattern(pattern, relative)) return;
      const sent = `/${relative.join('/')}`;
      expect(matchPattern(pattern, splitPath(parseTarget(sent).path))).toBe(true);
    }), { numRuns: runs(1000) });
  });

  it('outboundHeaders never lets through a claimed, hop-by-hop, Connection-listed or caller-token header', () => {
    const name = fc.constantFrom('Authorization', 'AUTHORIZATION', 'X-Egress-Token', 'x-egress-token', 'Connection', 'Keep-Alive', 'X-Api-Key', 'x-custom', 'Proxy-Authorization', 'TE', 'Upgrade', '__proto__', 'constructor', 'Forwarded', 'X-Forwarded-For');
    const header = fc.tuple(name, fc.oneof(fc.constantFrom('close', 'x-custom', 'X-Api-Key, keep-alive', 'secret'), fc.string({ maxLength: 10 })));
    fc.assert(fc.property(fc.array(header, { maxLength: 12 }), (pairs) => {
      const raw = pairs.flat();
      const out = outboundHeaders(raw, new Set(['authorization', 'x-api-key']));
      const listed = new Set(pairs.filter(([n]) => n.toLowerCase() === 'connection').flatMap(([, v]) => v.split(',').map((t) => t.trim().toLowerCase())));
      for (const n of out.keys()) {
        expect(['authorization', 'x-api-key', 'x-egress-token', 'connection', 'keep-alive', 'proxy-authorization', 'te', 'upgrade', 'forwarded', 'x-forwarded-for']).not.toContain(n);
        expect(listed.has(n)).toBe(false);
      }
    }), { numRuns: runs(1000) });
  });
});
