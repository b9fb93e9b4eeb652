import type { Logger } from './log.ts';
import type { Metrics } from './metrics.ts';
import type { WebhookSink } from './webhook.ts';

export type Severity = 'info' | 'warning' | 'critical';

/** Facts about an alert: names and numbers only, never a secret. */
export type Facts = Readonly<Record<string, string | number | boolean | null>>;

export interface RaisedAlert {
  readonly id: string;
  readonly severity: Severity;
  readonly subject: string;
  readonly message: string;
  readonly at: string;
  readonly facts: Facts;
  readonly repeats_suppressed: number;
}

const RECENT = 50;

/**
 * Raises alerts: always to the operational log (an `alert` field with a stable id), and to the
 * webhook when one is set. Repeats of one alert for one subject within the cool-down are counted,
 * not sent again: an incident is one alert, not a storm.
 */
export class Alerts {
  readonly #log: Logger;
  readonly #metrics: Metrics;
  readonly #cooldownMs: number;
  readonly #webhook: WebhookSink | undefined;
  readonly #last = new Map<string, { at: number; suppressed: number }>();
  readonly #recent: RaisedAlert[] = [];

  constructor(log: Logger, metrics: Metrics, cooldownMs = 5 * 60_000, webhook?: WebhookSink) {
    this.#log = log;
    this.#metrics = metrics;
    this.#cooldownMs = cooldownMs;
    this.#webhook = webhook;
  }

  raise(id: string, severity: Severity, subject: string, message: string, facts: Facts = {}): void {
    const key = JSON.stringify([id, subject]);
    const now = performance.now();
    const last = this.#last.get(key);
    if (last && now - last.at < this.#cooldownMs) {
      last.suppressed++;
      return;
    }
    this.#last.set(key, { at: now, suppressed: 0 });
    this.#metrics.alerts.inc({ alert: id, severity });
    const alert: RaisedAlert = { id, severity, subject, message, at: new Date().toISOString(), facts, repeats_suppressed: last?.suppressed ?? 0 };
    this.#recent.push(alert);
    if (this.#recent.length > RECENT) this.#recent.shift();
    const line = { alert: id, severity, subject, ...facts, repeats_suppressed: alert.repeats_suppressed };
    if (severity === 'critical') this.#log.error(line, message);
    else this.#log.warn(line, message);
    this.#webhook?.send({ ...alert, service: 'egress-proxy' });
  }

  recent(): readonly RaisedAlert[] {
    return this.#recent;
  }

  async close(): Promise<void> {
    await this.#webhook?.close();
  }
}

/** Counts events in a sliding window: "N fallbacks within a minute" style thresholds. */
export class WindowCounter {
  readonly #windowMs: number;
  readonly #events = new Map<string, number[]>();

  constructor(windowMs: number) {
    this.#windowMs = windowMs;
  }

  /** Record one event for `key`; returns how many fall inside the window, this one included. */
  hit(key: string, now = performance.now()): number {
    const kept = (this.#events.get(key) ?? []).filter((t) => now - t < this.#windowMs);
    kept.push(now);
    this.#events.set(key, kept);
    if (this.#events.size > 10_000) this.#events.clear();
    return kept.length;
  }
}
