import { ProxyError } from '../errors.ts';
import type { CompiledRoute, CompiledRule } from '../config/compile-routes.ts';
import type { RateLimitOptions } from '../config/route-schema.ts';
import type { RequestContext } from './context.ts';
import { burstOf, type Bucket, type RateCheck } from './rate-limiter.ts';

/**
 * The caller's rule limit (caller x route x rule) and the route's upstream quota (all callers),
 * taken together: a request one bucket refuses spends nothing from the other. A route paused
 * after an upstream 429 refuses everyone until the upstream's Retry-After.
 */
export function rateLimit(ctx: RequestContext): void | Promise<void> {
  const route = ctx.route!;
  // The slot first: a request refused for it must not spend the route's quota, which the other
  // callers share, for a request that never goes upstream. A slot taken by a request the buckets
  // then refuse is given back when the request is recorded.
  takeSlot(ctx);
  const result = ctx.services.limiter.check(route.name, bucketsFor(route, ctx.rule, ctx.caller!));
  if (result instanceof Promise) return result.then(enforce);
  enforce(result);
}

/** One of the caller's in-flight slots, held until the request is recorded (see CallerSlots). */
function takeSlot(ctx: RequestContext): void {
  if (!ctx.services.slots.take(ctx.caller!)) {
    throw new ProxyError('rate_limited', 'Too many requests of this caller are in flight.', { headers: { 'retry-after': '1' } });
  }
  ctx.holdsSlot = true;
}

/**
 * The buckets a (route, rule, caller) draws from, made once and reused by every request: a limiter
 * can then remember what it derives from a bucket. Held per compiled route, so a reload starts afresh.
 */
const bucketCache = new WeakMap<CompiledRoute, Map<string, readonly Bucket[]>>();

function bucketsFor(route: CompiledRoute, rule: CompiledRule | undefined, caller: string): readonly Bucket[] {
  let byRule = bucketCache.get(route);
  if (!byRule) {
    byRule = new Map();
    bucketCache.set(route, byRule);
  }
  // Caller names are [a-z0-9._-]: a newline cannot be part of one.
  const id = `${rule?.index ?? '-'}\n${caller}`;
  let buckets = byRule.get(id);
  if (!buckets) {
    const made: Bucket[] = [];
    if (rule?.rate) made.push({ key: ['rule', rule.index, caller], limit: rule.rate, policy: 'caller' });
    if (route.upstreamRate) made.push({ key: ['upstream'], limit: route.upstreamRate, policy: 'upstream' });
    buckets = Object.freeze(made);
    byRule.set(id, buckets);
  }
  return buckets;
}

function enforce(check: RateCheck): void {
  if (check.allowed) return;
  const retryAfter = String(Math.max(1, Math.ceil(check.retryAfterMs / 1000)));
  const bucket = check.bucket;
  if (!bucket) {
    // The provider's quota is spent until its Retry-After: no policy of ours to state, but its state.
    throw new ProxyError('rate_limited', 'The upstream asked for a pause on this route.', { headers: { 'retry-after': retryAfter, ratelimit: `"upstream";r=0;t=${retryAfter}` } });
  }
  throw new ProxyError('rate_limited', bucket.policy === 'caller' ? 'The caller limit for this route is reached.' : 'The upstream quota for this route is reached.', {
    headers: {
      'retry-after': retryAfter,
      // draft-ietf-httpapi-ratelimit-headers: the policy, and the state of the bucket that refused.
      // Its t is the seconds until more quota is available (draft -10 on): the next request, as
      // Retry-After says, not the whole burst refilled, which would keep a client waiting longer.
      'ratelimit-policy': `"${bucket.policy}";${policyOf(bucket.limit)}`,
      ratelimit: `"${bucket.policy}";r=0;t=${retryAfter}`,
    },
  });
}

/**
 * The bucket as a quota over a window (q units in w whole seconds) whose ratio is its rate: the
 * burst over the time it takes to refill, when that is whole seconds (60/min with a burst of 5 is
 * q=5;w=5), else the rate as written (7/s with a burst of 1 is q=7;w=1). The burst over the rate's
 * period misstated the rate by burst/count: q=5;w=60 told a client 5 a minute where 60 are allowed.
 */
function policyOf(limit: RateLimitOptions): string {
  const { count, periodMs } = limit.rate;
  const burst = burstOf(limit);
  const refillMs = burst * periodMs;
  if (refillMs % (count * 1000) === 0) return `q=${burst};w=${refillMs / (count * 1000)}`;
  return `q=${count};w=${periodMs / 1000}`;
}
