import type { OutboundRequest } from '../injectors/types.ts';
import type { RequestContext } from './context.ts';
import { outboundHeaders } from './headers.ts';
import { hasBody, readBody } from './body.ts';

/**
 * Build the outbound request from a copy of the inbound one: strip first (hop-by-hop, proxy
 * headers, and everything the injectors claim), then let each injector attach its part.
 */
export function inject(ctx: RequestContext): void | Promise<void> {
  const route = ctx.route!;
  const relative = ctx.relativeSegments!.join('/');
  const outbound: OutboundRequest = {
    method: ctx.req.method!,
    path: `${route.basePath}/${relative}`,
    query: removeParams(ctx.target!.query, route.claims.query),
    headers: outboundHeaders(ctx.req.rawHeaders, route.claims.headers),
    body: undefined,
  };
  ctx.outbound = outbound;
  if (route.needsBody && hasBody(ctx.req)) {
    return readBody(ctx.req, route.maxBody).then((body) => {
      outbound.body = body;
      attach(ctx, outbound);
    });
  }
  attach(ctx, outbound);
}

function attach(ctx: RequestContext, outbound: OutboundRequest): void {
  const redact = (value: string) => void ctx.redactions.push(value);
  for (const { injector, options } of ctx.route!.injections) {
    injector.inject({ request: outbound, credential: ctx.credential!, options, redact });
  }
}

/** Drop the caller's copies of parameters the proxy owns; everything else stays byte for byte. */
export function removeParams(query: string, claimed: ReadonlySet<string>): string {
  if (!query || claimed.size === 0) return query;
  return query
    .split('&')
    .filter((pair) => {
      const rawName = pair.split('=', 1)[0]!;
      let name: string;
      try {
        name = decodeURIComponent(rawName.replace(/\+/g, ' '));
      } catch {
        name = rawName;
      }
      return !claimed.has(name);
    })
    .join('&');
}
