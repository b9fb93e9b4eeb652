import type { OutboundRequest, ResolvedCredential } from '../injectors/types.ts';
import type { RequestContext } from './context.ts';
import { outboundHeaders } from './headers.ts';
import { hasBody, readBody } from './body.ts';

/**
 * Build the outbound request from a copy of the inbound one: strip first (hop-by-hop, proxy
 * headers, and everything the injectors claim), then let each injector attach its part. The body
 * is buffered (bounded by max_body) when an injector needs it, or when the request may have to be
 * sent again with the previous key; otherwise it streams.
 */
export function inject(ctx: RequestContext): void | Promise<void> {
  const route = ctx.route!;
  if ((route.needsBody || ctx.replayable) && hasBody(ctx.req)) {
    return readBody(ctx.req, route.maxBody).then((body) => {
      ctx.body = body;
      ctx.outbound = buildOutbound(ctx, ctx.credential!);
    });
  }
  ctx.outbound = buildOutbound(ctx, ctx.credential!);
}

/** The request to send upstream with `credential` attached; called again for a fallback to the previous version. */
export function buildOutbound(ctx: RequestContext, credential: ResolvedCredential): OutboundRequest {
  const route = ctx.route!;
  const outbound: OutboundRequest = {
    method: ctx.req.method!,
    path: `${route.basePath}/${ctx.relativeSegments!.join('/')}`,
    query: removeParams(ctx.target!.query, route.claims.query),
    headers: outboundHeaders(ctx.req.rawHeaders, route.claims.headers),
    body: ctx.body,
  };
  const redact = (value: string) => void ctx.redactions.push(value);
  for (const { injector, options } of route.injections) injector.inject({ request: outbound, credential, options, redact });
  return outbound;
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
