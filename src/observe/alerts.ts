import type { Logger } from './log.ts';
import type { Metrics } from './metrics.ts';

export type Severity = 'info' | 'warning' | 'critical';

/** Facts about an alert: names and numbers only, never a secret. */
export type Facts = Readonly<Record<string, string | number | boolean | null>>;

/**
 * Raises alerts to the operational log (an `alert` field with a stable id). Repeats of one alert
 * for one subject within the cool-down are counted, not logged again: an incident is one line.
 */
export class Alerts {
  readonly #log: Logger;
  readonly #metrics: Metrics;
  readonly #cooldownMs: number;
  readonly #last = new Map<string, { at: number; suppressed: number }>();

  constructor(log: Logger, metrics: Metrics, cooldownMs = 5 * 60_000) {
    this.#log = log;
    this.#metrics = metrics;
    this.#cooldownMs = cooldownMs;
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
    const line = { alert: id, severity, subject, ...facts, repeats_suppressed: last?.suppressed ?? 0 };
    if (severity === 'critical') this.#log.error(line, message);
    else this.#log.warn(line, message);
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
    return kept.length;
  }
}
