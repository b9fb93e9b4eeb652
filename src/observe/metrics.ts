import { Counter, Gauge, Histogram, Registry } from 'prom-client';

/**
 * Prometheus metrics. Label values are bounded: route and caller names come from configuration
 * (unknown ones become "none"/"unknown"), never from a raw path or a presented token.
 */
export class Metrics {
  readonly registry = new Registry();

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

  readonly routesLoaded = new Gauge({
    name: 'egress_routes_loaded',
    help: 'Routes in the live configuration.',
    registers: [this.registry],
  });
}

export function statusClass(status: number): string {
  return status >= 100 && status < 600 ? `${Math.floor(status / 100)}xx` : 'none';
}
