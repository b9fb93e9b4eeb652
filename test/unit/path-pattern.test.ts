import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { CompiledRoute } from '../../src/config/compile-routes.ts';
import { compileRoute } from '../../src/config/compile-routes.ts';
import { compilePattern, hasSegmentPrefix, matchPattern, splitPath } from '../../src/config/path-pattern.ts';
import { routeFileSchema } from '../../src/config/route-schema.ts';
import { ProxyError } from '../../src/errors.ts';
import { authorize, decide } from '../../src/pipeline/authorize.ts';
import type { RequestContext } from '../../src/pipeline/context.ts';
import { inject } from '../../src/pipeline/inject.ts';
import { matchRoute } from '../../src/pipeline/match-route.ts';
import type { Target } from '../../src/pipeline/target.ts';
import { parseTarget } from '../../src/pipeline/target.ts';
import { Secret } from '../../src/secret.ts';

function matches(pattern: string, path: string): boolean {
  return matchPattern(compilePattern(pattern), splitPath(path));
}

describe('splitPath', () => {
  it('splits after the leading "/", keeping a trailing empty segment', () => {
    expect(splitPath('/')).toEqual(['']);
    expect(splitPath('/a')).toEqual(['a']);
    expect(splitPath('/a/b/')).toEqual(['a', 'b', '']);
  });
});

describe('matchPattern', () => {
  it('a literal pattern matches exactly that path', () => {
    expect(matches('/accounts/get', '/accounts/get')).toBe(true);
    expect(matches('/accounts/get', '/accounts')).toBe(false);
    expect(matches('/accounts/get', '/accounts/get/x')).toBe(false);
    expect(matches('/accounts/get', '/accounts/gets')).toBe(false);
    expect(matches('/accounts/get', '/accounts/ge')).toBe(false);
    expect(matches('/accounts/get', '/x/accounts/get')).toBe(false);
  });

  it('is case-sensitive', () => {
    expect(matches('/accounts/get', '/Accounts/get')).toBe(false);
    expect(matches('/accounts/get', '/accounts/GET')).toBe(false);
    expect(matches('/Accounts/Get', '/Accounts/Get')).toBe(true);
  });

  it('a trailing slash is significant both ways', () => {
    expect(matches('/accounts/get', '/accounts/get/')).toBe(false);
    expect(matches('/accounts/get/', '/accounts/get')).toBe(false);
    expect(matches('/accounts/get/', '/accounts/get/')).toBe(true);
  });

  it('"/" matches only the root', () => {
    expect(matches('/', '/')).toBe(true);
    expect(matches('/', '/a')).toBe(false);
    expect(matches('/a', '/')).toBe(false);
  });

  it('"*" is exactly one non-empty segment', () => {
    expect(matches('/item/*', '/item/abc')).toBe(true);
    expect(matches('/item/*', '/item/*')).toBe(true);
    expect(matches('/item/*', '/item/')).toBe(false);
    expect(matches('/item/*', '/item')).toBe(false);
    expect(matches('/item/*', '/item/a/b')).toBe(false);
    expect(matches('/item/*', '/item/a/')).toBe(false);
    expect(matches('/*/get', '/accounts/get')).toBe(true);
    expect(matches('/*/get', '/accounts/x/get')).toBe(false);
  });

  it('"*" is a whole segment only; "a*" inside a segment is literal', () => {
    expect(matches('/item*', '/item*')).toBe(true);
    expect(matches('/item*', '/itemx')).toBe(false);
  });

  it('a final "**" is one or more further segments', () => {
    expect(matches('/item/**', '/item/a')).toBe(true);
    expect(matches('/item/**', '/item/a/b/c')).toBe(true);
    expect(matches('/item/**', '/item/a/b/')).toBe(true);
    expect(matches('/item/**', '/item')).toBe(false);
    expect(matches('/item/**', '/item/')).toBe(false);
    expect(matches('/item/**', '/itemx/a')).toBe(false);
    expect(matches('/**', '/anything/at/all')).toBe(true);
  });

  it('"**" never lets an empty interior segment through', () => {
    expect(matchPattern(compilePattern('/item/**'), ['item', 'a', '', 'b'])).toBe(false);
    expect(matchPattern(compilePattern('/item/**'), ['item', '', 'b'])).toBe(false);
  });
});

describe('hasSegmentPrefix', () => {
  it('matches on whole segments', () => {
    expect(hasSegmentPrefix(['plaid', 'x'], ['plaid'])).toBe(true);
    expect(hasSegmentPrefix(['plaid'], ['plaid'])).toBe(true);
    expect(hasSegmentPrefix(['plaid', ''], ['plaid'])).toBe(true);
    expect(hasSegmentPrefix(['plaidx', 'x'], ['plaid'])).toBe(false);
    expect(hasSegmentPrefix(['plaid-admin', 'x'], ['plaid'])).toBe(false);
    expect(hasSegmentPrefix(['pla'], ['plaid'])).toBe(false);
    expect(hasSegmentPrefix(['PLAID', 'x'], ['plaid'])).toBe(false);
    expect(hasSegmentPrefix(['plaid', 'v2', 'x'], ['plaid', 'v2'])).toBe(true);
    expect(hasSegmentPrefix(['plaid', 'v3'], ['plaid', 'v2'])).toBe(false);
  });

  it('an encoded prefix is the prefix once canonicalised (ROUTE-15)', () => {
    expect(hasSegmentPrefix(parseTarget('/pl%61id/x').segments, ['plaid'])).toBe(true);
  });
});

// --- The safety claim: what is authorised is exactly what is sent, inside the upstream's base path.

const segmentChars = fc.constantFrom('.', '%', '2', 'e', 'E', 'f', 'F', '5', 'c', '0', '*', 'a', 'p');
const literalSegment = fc.constantFrom('a', 'e', 'p', 'ae', 'e.', '.e', '2f', '...', 'a.e');

const patternSource = fc
  .tuple(fc.array(fc.oneof(literalSegment, fc.constant('*')), { maxLength: 3 }), fc.constantFrom('', '/', '/**'))
  .map(([segs, tail]) => {
    const body = segs.length > 0 ? `/${segs.join('/')}` : '';
    if (body === '') return tail === '/**' ? '/**' : '/';
    return body + tail;
  });

const routeArb = fc.record({
  prefix: fc.array(literalSegment, { minLength: 1, maxLength: 2 }).map((s) => `/${s.join('/')}`),
  basePath: fc.constantFrom('', '/v1', '/api/v2', '/v1/'),
  rules: fc.array(fc.record({ methods: fc.subarray(['GET', 'POST'] as const, { minLength: 1 }), paths: fc.array(patternSource, { minLength: 1, maxLength: 3 }) }), { minLength: 1, maxLength: 3 }),
});

function buildRoute(spec: { prefix: string; basePath: string; rules: { methods: ('GET' | 'POST')[]; paths: string[] }[] }): CompiledRoute | undefined {
  const parsed = routeFileSchema.safeParse({
    name: 'r',
    prefix: spec.prefix,
    upstream: `https://up.example${spec.basePath}`,
    credential: 'c',
    inject: { scheme: 'bearer' },
    allow: spec.rules.map((r) => ({ caller: 'svc', methods: r.methods, paths: r.paths })),
  });
  return parsed.success ? compileRoute(parsed.data, '/x/r.yaml', undefined) : undefined;
}

/** A request context with just what match-route, authorize and inject read. */
function contextFor(route: CompiledRoute, target: Target, method: string): RequestContext {
  return {
    config: { routes: [route], files: [route.file], namedFiles: [], loadedAt: new Date(0) },
    target,
    caller: 'svc',
    req: { method, rawHeaders: ['Authorization', 'Bearer attacker'], headers: {} },
    credential: { id: 'c', version: 1, fields: new Map([['token', new Secret('tok_CANARY')]]) },
    redactions: [],
  } as unknown as RequestContext;
}

describe('matchRoute + inject: the path sent upstream', () => {
  const route = buildRoute({ prefix: '/plaid', basePath: '/v1', rules: [{ methods: ['POST'], paths: ['/accounts/get'] }] })!;

  it.each([
    ['/plaid/accounts/get', ['accounts', 'get'], '/v1/accounts/get'],
    ['/plaid', [''], '/v1/'],
    ['/plaid/', [''], '/v1/'],
    ['/plaid/a/', ['a', ''], '/v1/a/'],
    ['/pl%61id/accounts/get', ['accounts', 'get'], '/v1/accounts/get'],
  ])('%s -> relative %j, sent as %s', (raw, relative, sent) => {
    const ctx = contextFor(route, parseTarget(raw), 'POST');
    matchRoute(ctx);
    expect(ctx.relativeSegments).toEqual(relative);
    void inject(ctx);
    expect(ctx.outbound!.path).toBe(sent);
  });

  it.each(['/plaidx/accounts/get', '/plaid-admin/x', '/PLAID/accounts/get', '/'])('%s is owned by no route', (raw) => {
    const err = (() => {
      try {
        matchRoute(contextFor(route, parseTarget(raw), 'POST'));
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(ProxyError);
    expect((err as ProxyError).code).toBe('route_not_found');
  });
});

describe('route prefix + allowlist: authorise exactly the bytes sent (property)', () => {
  it('a target that parses and has the route prefix is sent inside the base path, and an allowed path still matches its rule when the sent path is re-parsed', () => {
    let allowedSeen = 0;
    fc.assert(
      fc.property(routeArb, fc.boolean(), fc.string({ unit: fc.oneof(segmentChars, fc.constant('/')), maxLength: 16 }), fc.constantFrom('GET', 'POST'), (spec, withPrefix, tail, method) => {
        const route = buildRoute(spec);
        if (!route) return;
        const raw = (withPrefix ? spec.prefix : '') + `/${tail}`;
        let target: Target;
        try {
          target = parseTarget(raw);
        } catch {
          return;
        }
        const owned = hasSegmentPrefix(target.segments, route.prefixSegments);
        const ctx = contextFor(route, target, method);
        if (!owned) {
          expect(() => matchRoute(ctx)).toThrow(ProxyError);
          return;
        }

        // The real pipeline steps: match-route, then inject builds the outbound request.
        matchRoute(ctx);
        expect(ctx.route).toBe(route);
        const relative = ctx.relativeSegments!;
        const rest = target.segments.slice(route.prefixSegments.length);
        expect(relative).toEqual(rest.length === 0 ? [''] : rest);
        void inject(ctx);
        const sent = ctx.outbound!.path;
        expect(sent).toBe(`${route.basePath}/${relative.join('/')}`);
        expect(ctx.outbound!.headers.get('authorization')).toEqual(['Bearer tok_CANARY']);

        // Inside the base path, and a URL parser sees no dot segment to collapse.
        expect(sent.startsWith(`${route.basePath}/`)).toBe(true);
        expect(new URL(sent, 'https://up.example').pathname).toBe(sent);
        const resent = parseTarget(sent);
        const baseSegments = route.basePath === '' ? [] : splitPath(route.basePath);
        expect(hasSegmentPrefix(resent.segments, baseSegments)).toBe(true);
        const resentRest = resent.segments.slice(baseSegments.length);
        expect(resentRest.length === 0 ? [''] : resentRest).toEqual(relative);

        const decision = decide(route, 'svc', method, relative);
        let authorized = true;
        try {
          authorize(ctx);
        } catch (err) {
          expect((err as ProxyError).code).toBe('route_forbidden');
          authorized = false;
        }
        expect(authorized).toBe(decision.rule !== undefined);
        if (decision.rule) {
          allowedSeen++;
          expect(ctx.rule).toBe(decision.rule);
          expect(decision.rule.methods.has(method)).toBe(true);
          const reparsed = parseTarget(`/${relative.join('/')}`).segments;
          expect(decision.rule.paths.some((p) => matchPattern(p, reparsed))).toBe(true);
          expect(decision.rule.paths.some((p) => matchPattern(p, resentRest.length === 0 ? [''] : resentRest))).toBe(true);
        }
      }),
      { numRuns: 4000 },
    );
    // The generators must actually reach the interesting case.
    expect(allowedSeen).toBeGreaterThan(50);
  });

  it('no other caller and no unlisted method is ever allowed', () => {
    fc.assert(
      fc.property(routeArb, fc.string({ unit: fc.oneof(segmentChars, fc.constant('/')), maxLength: 12 }), (spec, tail) => {
        const route = buildRoute(spec);
        if (!route) return;
        let target;
        try {
          target = parseTarget(`/${tail}`);
        } catch {
          return;
        }
        expect(decide(route, 'other', 'GET', target.segments).rule).toBeUndefined();
        expect(decide(route, 'svc', 'DELETE', target.segments).rule).toBeUndefined();
        expect(decide(route, 'svc', 'get', target.segments).rule).toBeUndefined();
      }),
      { numRuns: 500 },
    );
  });
});
