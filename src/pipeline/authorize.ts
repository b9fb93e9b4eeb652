import type { CompiledRoute, CompiledRule } from '../config/compile-routes.ts';
import { matchPattern } from '../config/path-pattern.ts';
import { ProxyError } from '../errors.ts';
import type { RequestContext } from './context.ts';

/** Deny by default: the caller needs a rule on this route naming the method and a matching path. */
export function authorize(ctx: RequestContext): void {
  const route = ctx.route!;
  if (route.requireClientCert && !ctx.viaCertificate) throw new ProxyError('route_forbidden', 'This route requires a client certificate.');
  const caller = ctx.caller!;
  const method = ctx.req.method ?? '';
  const segments = ctx.relativeSegments!;
  const rule = allowingRule(route, caller, method, segments);
  if (!rule) throw new ProxyError('route_forbidden', undefined, { cause: decide(route, caller, method, segments).reason });
  ctx.rule = rule;
}

/** The first of the caller's rules on `route` that names `method` and has a pattern matching `segments`. */
export function allowingRule(route: CompiledRoute, caller: string, method: string, segments: readonly string[]): CompiledRule | undefined {
  const rules = route.rulesByCaller.get(caller);
  if (!rules) return undefined;
  for (const rule of rules) {
    if (!rule.methods.has(method)) continue;
    for (const pattern of rule.paths) if (matchPattern(pattern, segments)) return rule;
  }
  return undefined;
}

export interface AuthorizeDecision {
  readonly rule: CompiledRule | undefined;
  readonly reason: string;
}

/**
 * The decision with its reason, for `egress routes explain` and for a refusal's log line. The rule
 * is allowingRule's, the one the request path uses, so the explanation is the real decision.
 */
export function decide(route: CompiledRoute, caller: string, method: string, segments: readonly string[]): AuthorizeDecision {
  const rule = allowingRule(route, caller, method, segments);
  if (rule) {
    const pattern = rule.paths.find((p) => matchPattern(p, segments))!;
    return { rule, reason: `allow[${rule.index}] permits ${method} ${pattern.source} for caller "${caller}"` };
  }
  const rules = route.rulesByCaller.get(caller);
  if (!rules || rules.length === 0) return { rule: undefined, reason: `no allow entry on route "${route.name}" names caller "${caller}"` };
  const methodSeen = rules.some((r) => r.methods.has(method));
  const path = `/${segments.join('/')}`;
  return {
    rule: undefined,
    reason: methodSeen
      ? `no path pattern for caller "${caller}" on route "${route.name}" matches ${path}`
      : `method ${method} is not allowed for caller "${caller}" on route "${route.name}"`,
  };
}
