import type { CompiledRoute, CompiledRule } from '../config/compile-routes.ts';
import { matchPattern } from '../config/path-pattern.ts';
import { ProxyError } from '../errors.ts';
import type { RequestContext } from './context.ts';

/** Deny by default: the caller needs a rule on this route naming the method and a matching path. */
export function authorize(ctx: RequestContext): void {
  if (ctx.route!.requireClientCert && !ctx.viaCertificate) throw new ProxyError('route_forbidden', 'This route requires a client certificate.');
  const decision = decide(ctx.route!, ctx.caller!, ctx.req.method ?? '', ctx.relativeSegments!);
  if (!decision.rule) throw new ProxyError('route_forbidden', undefined, { cause: decision.reason });
  ctx.rule = decision.rule;
}

export interface AuthorizeDecision {
  readonly rule: CompiledRule | undefined;
  readonly reason: string;
}

/** Shared by the request path and `egress routes explain`, so the explanation is the real decision. */
export function decide(route: CompiledRoute, caller: string, method: string, segments: readonly string[]): AuthorizeDecision {
  const rules = route.rulesByCaller.get(caller);
  if (!rules || rules.length === 0) return { rule: undefined, reason: `no allow entry on route "${route.name}" names caller "${caller}"` };
  let methodSeen = false;
  for (const rule of rules) {
    if (!rule.methods.has(method)) continue;
    methodSeen = true;
    const pattern = rule.paths.find((p) => matchPattern(p, segments));
    if (pattern) return { rule, reason: `allow[${rule.index}] permits ${method} ${pattern.source} for caller "${caller}"` };
  }
  const path = `/${segments.join('/')}`;
  return {
    rule: undefined,
    reason: methodSeen
      ? `no path pattern for caller "${caller}" on route "${route.name}" matches ${path}`
      : `method ${method} is not allowed for caller "${caller}" on route "${route.name}"`,
  };
}
