import type { Logger } from './log.ts';
import type { Metrics } from './metrics.ts';
import type { WebhookSink } from './webhook.ts';

export type Severity = 'info' | 'warning' | 'critical';

/** Facts about an alert: names and numbers only, never a secret. */
export type Facts = Readonly<Record<string, string | number | boolean | null | readonly string[]>>;

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
/** Alert subjects in their cool-down kept at most (unknown_token's subject is a remote address). */
const MAX_COOLING = 10_000;

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
    // Alerts always reach the operational log (SPEC): an EGRESS_LOG_LEVEL of error or fatal quiets
    // the other warnings, not a warning alert, which may have no webhook to go to. Silent is silent.
    this.#log = log.isLevelEnabled('warn') || log.level === 'silent' ? log : log.child({}, { level: 'warn' });
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
    if (!last && this.#last.size >= MAX_COOLING) this.#forgetCooled(now);
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

  /**
   * The condition behind an alert has ended (a route's credential can serve it again): the next
   * one for this subject is a new incident, raised at once, not a repeat counted in the cool-down.
   */
  clear(id: string, subject: string): void {
    this.#last.delete(JSON.stringify([id, subject]));
  }

  /** Drop cool-downs that are over; if subjects (remote addresses) still fill the map, start afresh. */
  #forgetCooled(now: number): void {
    for (const [key, { at }] of this.#last) if (now - at >= this.#cooldownMs) this.#last.delete(key);
    if (this.#last.size >= MAX_COOLING) this.#last.clear();
  }

  recent(): readonly RaisedAlert[] {
    return this.#recent;
  }

  async close(): Promise<void> {
    await this.#webhook?.close();
  }
}

/** Sub-windows a WindowCounter keeps per key (see there). */
const WINDOW_SLOTS = 60;
/** Keys a WindowCounter holds before it starts afresh (remote addresses are unbounded). */
const MAX_KEYS = 10_000;

interface Slots {
  /** Slot numbers (floor(now / slotMs)), oldest first, at most WINDOW_SLOTS of them. */
  readonly slots: number[];
  readonly counts: number[];
  total: number;
}

/**
 * Counts events in a sliding window: "N fallbacks within a minute" style thresholds. Events are
 * counted per slot (a sixtieth of the window), so a key costs at most 60 numbers and a hit a few
 * operations whatever the rate: the unknown-token counter runs hottest exactly when one address
 * floods the proxy. (Keeping every event's time cost a copy of all of them on each hit: under a
 * flood of unknown tokens throughput fell to a fifth and RSS grew by 40 MB.) The count covers
 * the current slot and the 59 before it: the window, give or take one slot.
 */
export class WindowCounter {
  readonly #slotMs: number;
  readonly #events = new Map<string, Slots>();

  constructor(windowMs: number) {
    this.#slotMs = windowMs / WINDOW_SLOTS;
  }

  /** Record one event for `key`; returns how many fall inside the window, this one included. */
  hit(key: string, now = performance.now()): number {
    const slot = Math.floor(now / this.#slotMs);
    let entry = this.#events.get(key);
    if (!entry) {
      if (this.#events.size >= MAX_KEYS) this.#events.clear();
      entry = { slots: [], counts: [], total: 0 };
      this.#events.set(key, entry);
    }
    const { slots, counts } = entry;
    while (slots.length > 0 && slots[0]! <= slot - WINDOW_SLOTS) {
      entry.total -= counts[0]!;
      slots.shift();
      counts.shift();
    }
    if (slots.at(-1) === slot) counts[counts.length - 1]!++;
    else {
      slots.push(slot);
      counts.push(1);
    }
    return ++entry.total;
  }
}
