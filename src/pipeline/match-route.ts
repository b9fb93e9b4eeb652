import { findRoute, findRouteByHost, forwardSegments } from '../config/compile-routes.ts';
import { ProxyError } from '../errors.ts';
import type { RequestContext } from './context.ts';

/** Find the route whose prefix owns the path, on whole segments: /plaid owns /plaid/x, not /plaidx. */
export function matchRoute(ctx: RequestContext): void {
  const segments = ctx.target!.segments;
  if (ctx.forward) {
    // Forward mode: the tunnel's host picks the route, and the path after the upstream's base path is the route-relative path.
    const route = findRouteByHost(ctx.config, ctx.forward.host);
    if (!route) throw new ProxyError('route_forbidden', 'No route intercepts this host.');
    ctx.route = route;
    const relative = forwardSegments(route, segments);
    if (!relative) throw new ProxyError('route_forbidden', "The path is outside the route's upstream base path.");
    ctx.relativeSegments = relative;
    return;
  }
  const route = findRoute(ctx.config, segments);
  if (!route) throw new ProxyError('route_not_found');
  ctx.route = route;
  const rest = segments.slice(route.prefixSegments.length);
  ctx.relativeSegments = rest.length === 0 ? [''] : rest;
}
