import { currentVersion } from '../store/credentials.ts';
import type { StoreSnapshot } from '../store/types.ts';
import { maxAgeMs, type AlertSettings } from './alert-settings.ts';
import type { Alerts } from './alerts.ts';
import { WindowCounter } from './alerts.ts';

/** What a finished request tells the rules: no secrets, no paths, no query values. */
export interface RequestFacts {
  readonly caller: string | null;
  readonly remote: string;
  readonly route: string | null;
  readonly decision: string;
  readonly reason: string;
  readonly credential: string | null;
  /** No credentials were presented at all (no token, no Proxy-Authorization): a client waiting for a challenge, not a guess. */
  readonly anonymous?: boolean;
}

/** The subject of the unknown_token alert counted over every address. */
export const ALL_ADDRESSES = 'all addresses';

interface Usage {
  bucketStart: number;
  count: number;
  baseline: number;
  firstSeen: number;
}

/**
 * The default alert rules. Each alert has a stable id; thresholds come from EGRESS_ALERTS.
 *  - current_key_rejected: repeated fallbacks to the previous version (the new key does not work)
 *  - upstream_rejected_credential: the upstream rejects a key and there is nothing to fall back to
 *  - denied_spike: one caller's refused requests spike
 *  - unknown_token: unknown tokens from one address, an IPv6 /64 counting as one (brute force,
 *    or a service on an old token), or from all addresses together (guessing spread over many
 *    addresses, each under the per-address count; subject ALL_ADDRESSES)
 *  - retired_credential_used: an expired or revoked caller token is still presented
 *  - credential_max_age: a current credential version is older than its maximum age
 *  - unusual_usage: a caller uses a credential far above its own weighted baseline
 *  - store_unreachable, store_record_damaged, store_rollback, store_new_incarnation, store_evicts, reload_rejected
 *    (routes, revocations, keyring), ratelimit_degraded: raised where seen
 *  - route_credential_missing: a route its credential cannot serve (route-credentials.ts), on
 *    route and store changes
 */
export class AlertRules {
  readonly #alerts: Alerts;
  readonly #settings: AlertSettings;
  readonly #fallbacks: WindowCounter;
  readonly #denied: WindowCounter;
  readonly #unknown: WindowCounter;
  readonly #unknownAll: WindowCounter;
  readonly #usage = new Map<string, Usage>();
  readonly #alpha: number;

  constructor(alerts: Alerts, settings: AlertSettings) {
    this.#alerts = alerts;
    this.#settings = settings;
    this.#fallbacks = new WindowCounter(settings.fallback.window);
    this.#denied = new WindowCounter(settings.denied_spike.window);
    this.#unknown = new WindowCounter(settings.unknown_token.window);
    this.#unknownAll = new WindowCounter(settings.unknown_token.window);
    // Per-bucket smoothing factor for an exponentially weighted mean with the configured half-life.
    this.#alpha = 1 - 2 ** (-settings.unusual_usage.bucket / settings.unusual_usage.half_life);
  }

  get alerts(): Alerts {
    return this.#alerts;
  }

  onFallback(credential: string, currentVersion: number, previousVersion: number, route: string): void {
    if (this.#fallbacks.hit(credential) >= this.#settings.fallback.count) {
      this.#alerts.raise('current_key_rejected', 'critical', credential, 'current key rejected by upstream; requests are falling back to the previous version', { credential, current_version: currentVersion, previous_version: previousVersion, route });
    }
  }

  /**
   * The upstream rejected the credential and the request was not re-sent: `previousVersion` is the
   * version in grace it was not re-sent with (the request was not replay-safe, or that version was
   * revoked or retired meanwhile), undefined when there was none.
   */
  onAuthFailure(credential: string, version: number, route: string, status: number, previousVersion?: number): void {
    const why = previousVersion === undefined
      ? 'and no previous version is in grace'
      : 'and the request was not re-sent with the previous version (it is not replay-safe, or that version was revoked or retired while it was out)';
    this.#alerts.raise('upstream_rejected_credential', 'critical', credential, `upstream rejected the credential ${why}`, { credential, version, route, status, ...(previousVersion !== undefined ? { previous_version: previousVersion } : {}) });
  }

  /** An admin token that expired or was revoked, presented to the admin listener: a leaked one, or a forgotten script. */
  onRetiredAdminToken(name: string, remote: string): void {
    this.#alerts.raise('retired_credential_used', 'warning', `admin:${name}`, 'an expired or revoked admin token was presented', { admin_token: name, remote });
  }

  /** A token presented to the admin listener (API or status page) that is no live admin token. */
  onUnknownAdminToken(remote: string, now = performance.now()): void {
    this.#unknownToken(remote, 'admin', now);
  }

  /** Caller and admin tokens count together: guessing either from one address is the same alarm. */
  #unknownToken(address: string, kind: 'caller' | 'admin', now: number): void {
    const remote = addressGroup(address);
    const rule = this.#settings.unknown_token;
    const where: Record<string, string> = kind === 'admin' ? { listener: 'admin' } : {};
    const n = this.#unknown.hit(remote, now);
    if (n >= rule.count) {
      this.#alerts.raise('unknown_token', 'warning', remote, `unknown ${kind} tokens from one address`, { remote, attempts: n, window_ms: rule.window, ...where });
      return;
    }
    // Only attempts under their address's own count add up here (one loud address has its own
    // alert), in a counter of their own: the per-address one starts afresh past its key bound.
    const all = this.#unknownAll.hit(ALL_ADDRESSES, now);
    if (all >= rule.total) {
      this.#alerts.raise('unknown_token', 'warning', ALL_ADDRESSES, `unknown ${kind} tokens from many addresses, each under its own count`, { attempts: all, window_ms: rule.window, ...where });
    }
  }

  onRetiredToken(caller: string, remote: string): void {
    this.#alerts.raise('retired_credential_used', 'warning', caller, 'an expired or revoked caller token was presented', { caller, remote });
  }

  onRequest(facts: RequestFacts, now = performance.now()): void {
    if (facts.reason === 'caller_unauthenticated') {
      // Clients that send proxy credentials only when challenged (Java, .NET) start every
      // connection with a request that has none: counted, each would be an unknown token.
      if (!facts.anonymous) this.#unknownToken(facts.remote, 'caller', now);
      return;
    }
    if (facts.decision === 'deny' && facts.caller) {
      const n = this.#denied.hit(facts.caller, now);
      if (n >= this.#settings.denied_spike.count) {
        this.#alerts.raise('denied_spike', 'warning', facts.caller, "a caller's refused requests are spiking", { caller: facts.caller, denied: n, window_ms: this.#settings.denied_spike.window, last_reason: facts.reason, route: facts.route });
      }
      return;
    }
    if (facts.decision === 'allow' && facts.caller && facts.credential) this.#usage_(facts.caller, facts.credential, now);
  }

  #usage_(caller: string, credential: string, now: number): void {
    const s = this.#settings.unusual_usage;
    // Caller names and credential ids are [a-z0-9._-] (route-schema): a newline cannot be part of either.
    const key = `${caller}\n${credential}`;
    let u = this.#usage.get(key);
    if (!u) {
      u = { bucketStart: now, count: 0, baseline: 0, firstSeen: now };
      this.#usage.set(key, u);
    }
    if (now - u.bucketStart >= s.bucket) {
      // Close the finished bucket, then any empty ones after it (bounded), into the baseline.
      const elapsed = Math.min(Math.floor((now - u.bucketStart) / s.bucket), 1_000);
      u.baseline += this.#alpha * (u.count - u.baseline);
      for (let i = 1; i < elapsed; i++) u.baseline += this.#alpha * (0 - u.baseline);
      u.bucketStart += elapsed * s.bucket;
      u.count = 0;
    }
    u.count++;
    const warmedUp = now - u.firstSeen >= s.warmup;
    if (warmedUp && u.count >= s.min_count && u.count > s.factor * u.baseline) {
      this.#alerts.raise('unusual_usage', 'warning', `${caller}:${credential}`, 'a caller is using a credential far above its usual rate', { caller, credential, count: u.count, bucket_ms: s.bucket, baseline: Math.round(u.baseline * 10) / 10, factor: s.factor });
    }
  }

  /** Periodic: current versions older than their maximum age. */
  checkCredentials(snapshot: StoreSnapshot | undefined, now = Date.now()): void {
    for (const record of snapshot?.credentials.values() ?? []) {
      const current = currentVersion(record);
      const since = current?.activated_at ?? current?.created_at;
      if (!current || !since) continue;
      const age = now - Date.parse(since);
      const max = maxAgeMs(this.#settings, record.id);
      if (age > max) {
        this.#alerts.raise('credential_max_age', 'warning', record.id, 'a credential is older than its maximum age; rotate it', { credential: record.id, version: current.version, age_days: Math.floor(age / 86_400_000), max_age_days: Math.floor(max / 86_400_000) });
      }
    }
  }
}

/**
 * The address unknown tokens are counted against. An IPv6 host is usually given a whole /64 and
 * can send each guess from another address in it, so IPv6 is counted by its /64
 * ("2001:db8:1:2::/64"); IPv4, also written IPv4-mapped, by the address.
 */
export function addressGroup(remote: string): string {
  if (!remote.includes(':')) return remote;
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(remote);
  if (mapped) return mapped[1]!;
  const address = remote.split('%', 1)[0]!.toLowerCase();
  const [head, tail] = address.split('::') as [string, string | undefined];
  const before = head ? head.split(':') : [];
  const after = tail ? tail.split(':') : [];
  const groups = tail === undefined ? before : [...before, ...Array<string>(8 - before.length - after.length).fill('0'), ...after];
  if (groups.length !== 8 || !groups.every((g) => /^[0-9a-f]{1,4}$/.test(g))) return remote;
  return `${groups.slice(0, 4).map((g) => g.replace(/^0+(?=.)/, '')).join(':')}::/64`;
}
