import { ProxyError } from '../errors.ts';
import type { RequestContext } from './context.ts';
import { burstOf, type Bucket, type RateCheck } from './rate-limiter.ts';

/**
 * The caller's rule limit (caller x route x rule) and the route's upstream quota (all callers),
 * taken together: a request one bucket refuses spends nothing from the other. A route paused
 * after an upstream 429 refuses everyone until the upstream's Retry-After.
 */
export function rateLimit(ctx: RequestContext): void | Promise<void> {
  const { route, rule, caller } = ctx;
  const buckets: Bucket[] = [];
  if (rule?.rate) buckets.push({ key: ['rule', rule.index, caller!], limit: rule.rate, policy: 'caller' });
  if (route!.upstreamRate) buckets.push({ key: ['upstream'], limit: route!.upstreamRate, policy: 'upstream' });
  const result = ctx.services.limiter.check(route!.name, buckets);
  if (result instanceof Promise) return result.then(enforce);
  enforce(result);
}

function enforce(check: RateCheck): void {
  if (check.allowed) return;
  const retryAfter = String(Math.max(1, Math.ceil(check.retryAfterMs / 1000)));
  const bucket = check.bucket;
  if (!bucket) {
    throw new ProxyError('rate_limited', 'The upstream asked for a pause on this route.', { headers: { 'retry-after': retryAfter } });
  }
  throw new ProxyError('rate_limited', bucket.policy === 'caller' ? 'The caller limit for this route is reached.' : 'The upstream quota for this route is reached.', {
    headers: {
      'retry-after': retryAfter,
      // draft-ietf-httpapi-ratelimit-headers: the policy, and the state of the bucket that refused.
      'ratelimit-policy': `"${bucket.policy}";q=${burstOf(bucket.limit)};w=${Math.ceil(bucket.limit.rate.periodMs / 1000)}`,
      ratelimit: `"${bucket.policy}";r=0;t=${Math.max(1, Math.ceil(check.resetMs / 1000))}`,
    },
  });
}
