import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { StoreView } from '../store/store-view.ts';
import { currentVersion } from '../store/credentials.ts';

/**
 * Prometheus metrics. Label values are bounded: route and caller names come from configuration
 * (unknown ones become "none"/"unknown"), never from a raw path or a presented token.
 */
export class Metrics {
  readonly registry = new Registry();

  constructor() {
    // Process and runtime series (RSS, heap spaces, GC pauses, event-loop lag): what an operator
    // needs to see memory stay flat and the event loop keep up. Read at scrape time.
    collectDefaultMetrics({ register: this.registry });
  }

  readonly requests = new Counter({
    name: 'egress_requests_total',
    help: 'Requests handled, by route, caller, decision and status class.',
    labelNames: ['route', 'caller', 'decision', 'status_class'] as const,
    registers: [this.registry],
  });

  readonly proxyAdded = new Histogram({
    name: 'egress_proxy_added_seconds',
    help: 'Time the proxy itself added to a request (total minus upstream time).',
    labelNames: ['route'] as const,
    buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5],
    registers: [this.registry],
  });

  readonly upstream = new Histogram({
    name: 'egress_upstream_seconds',
    help: 'Time from sending a request upstream to its response headers.',
    labelNames: ['route'] as const,
    buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });

  readonly reloads = new Counter({
    name: 'egress_config_reloads_total',
    help: 'Route folder reloads, by result.',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });

  readonly storeReachable = new Gauge({
    name: 'egress_store_reachable',
    help: '1 when the last read of the credential store succeeded.',
    registers: [this.registry],
  });

  readonly fallbacks = new Counter({
    name: 'egress_rotation_fallbacks_total',
    help: 'Requests re-sent with the previous credential version after the upstream rejected the current one.',
    labelNames: ['credential', 'version'] as const,
    registers: [this.registry],
  });

  readonly authFailures = new Counter({
    name: 'egress_upstream_auth_failures_total',
    help: "Upstream answers matching the route's auth_failure, by credential and version used.",
    labelNames: ['credential', 'version'] as const,
    registers: [this.registry],
  });

  readonly connectionsOverCap = new Counter({
    name: 'egress_connections_over_cap_total',
    help: 'Caller connections past EGRESS_MAX_CONNECTIONS, by listener: answered 503 too_many_connections, or closed as accepted (past twice the cap).',
    labelNames: ['listener', 'outcome'] as const,
    registers: [this.registry],
  });

  readonly alerts = new Counter({
    name: 'egress_alerts_total',
    help: 'Alerts raised, by alert id and severity (repeats inside the cool-down are not counted).',
    labelNames: ['alert', 'severity'] as const,
    registers: [this.registry],
  });

  readonly retirements = new Counter({
    name: 'egress_grace_retirements_total',
    help: 'Previous credential versions retired by this instance when their grace window ended.',
    registers: [this.registry],
  });

  readonly rateLimited = new Counter({
    name: 'egress_rate_limited_total',
    help: "Requests and CONNECTs refused with 429: a caller limit, a route quota, an upstream pause, or a caller's tunnels (too many open, or opened too fast).",
    labelNames: ['route'] as const,
    registers: [this.registry],
  });

  readonly credentialAge = new Gauge({
    name: 'egress_credential_age_seconds',
    help: 'Age of the current version of each credential.',
    labelNames: ['credential'] as const,
    registers: [this.registry],
  });

  readonly credentialVersion = new Gauge({
    name: 'egress_credential_current_version',
    help: 'The version number in use (current) for each credential.',
    labelNames: ['credential'] as const,
    registers: [this.registry],
  });

  readonly storeCacheAge = new Gauge({
    name: 'egress_store_cache_age_seconds',
    help: 'Seconds since the store was last read successfully.',
    registers: [this.registry],
  });

  readonly storeErrors = new Counter({
    name: 'egress_store_errors_total',
    help: 'Failed reads of the credential store.',
    registers: [this.registry],
  });

  /** Gauges read from the store view at scrape time. Credential ids come from the store: bounded by it. */
  bindStore(store: StoreView): void {
    const update = () => {
      const snapshot = store.snapshot();
      this.credentialAge.reset();
      this.credentialVersion.reset();
      const now = Date.now();
      for (const record of snapshot?.credentials.values() ?? []) {
        const current = currentVersion(record);
        if (!current) continue;
        this.credentialAge.set({ credential: record.id }, Math.round((now - Date.parse(current.activated_at ?? current.created_at)) / 1000));
        this.credentialVersion.set({ credential: record.id }, current.version);
      }
      const status = store.status();
      this.storeCacheAge.set(status.loaded_at ? Math.max(0, (now - Date.parse(status.loaded_at)) / 1000) : -1);
      this.storeReachable.set(status.reachable ? 1 : 0);
    };
    this.#collectors.push(update);
  }

  readonly #collectors: (() => void)[] = [];

  readonly requestsInFlight = new Gauge({
    name: 'egress_requests_in_flight',
    help: 'Requests being handled: started, their audit line not yet written. One that stays above zero with no traffic is a request that never ended.',
    registers: [this.registry],
  });

  /** The count of requests being handled, read at scrape time (nothing per request here). */
  bindInFlight(count: () => number): void {
    this.#collectors.push(() => this.requestsInFlight.set(count()));
  }

  async text(): Promise<string> {
    for (const c of this.#collectors) c();
    return this.registry.metrics();
  }

  readonly routesLoaded = new Gauge({
    name: 'egress_routes_loaded',
    help: 'Routes in the live configuration.',
    registers: [this.registry],
  });
}

export function statusClass(status: number): string {
  return status >= 100 && status < 600 ? `${Math.floor(status / 100)}xx` : 'none';
}
