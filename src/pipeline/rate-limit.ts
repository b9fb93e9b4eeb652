import type { RateLimitOptions } from '../config/route-schema.ts';
import { ProxyError } from '../errors.ts';
import type { RequestContext } from './context.ts';
import type { RateDecision } from './rate-limiter.ts';

/**
 * The caller's rule limit (caller x route x rule), then the route's upstream quota (all callers).
 * The caller's own bucket is checked first, so one noisy caller cannot spend the shared quota on
 * requests that its own limit refuses.
 */
export function rateLimit(ctx: RequestContext): void {
  const { route, rule, caller } = ctx;
  const limiter = ctx.services.limiter;
  if (rule?.rate) check(limiter.take(['rule', route!.name, rule.index, caller!], rule.rate), rule.rate, 'caller');
  if (route?.upstreamRate) check(limiter.take(['route', route.name], route.upstreamRate), route.upstreamRate, 'upstream');
}

function check(decision: RateDecision, limit: RateLimitOptions, policy: string): void {
  if (decision.allowed) return;
  const windowSeconds = Math.ceil(limit.rate.periodMs / 1000);
  const quota = limit.burst ?? limit.rate.count;
  throw new ProxyError('rate_limited', policy === 'caller' ? 'The caller limit for this route is reached.' : 'The upstream quota for this route is reached.', {
    headers: {
      'retry-after': String(Math.max(1, Math.ceil(decision.retryAfterMs / 1000))),
      // draft-ietf-httpapi-ratelimit-headers: the policy, and the state of the bucket that refused.
      'ratelimit-policy': `"${policy}";q=${quota};w=${windowSeconds}`,
      ratelimit: `"${policy}";r=${decision.remaining};t=${Math.max(1, Math.ceil(decision.resetMs / 1000))}`,
    },
  });
}
