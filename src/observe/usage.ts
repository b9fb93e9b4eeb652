import type { Logger } from './log.ts';
import type { StoreBackend, UsageEntry } from '../store/types.ts';

const FLUSH_MS = 30_000;
/** Bound on distinct (credential, version, caller) keys held between flushes. */
const MAX_PENDING = 10_000;

/**
 * Who last used which credential version, for `keys show`: noted in memory per request (a Map
 * write), written to the store every 30 seconds and at shutdown, keeping the latest time per key.
 */
export class UsageTracker {
  readonly #store: StoreBackend;
  readonly #log: Logger;
  /** Keyed by credential, version and caller; the time is kept as epoch ms and written out at flush. */
  #pending = new Map<string, PendingUse>();
  #timer: NodeJS.Timeout | undefined;

  constructor(store: StoreBackend, log: Logger) {
    this.#store = store;
    this.#log = log;
  }

  start(): void {
    this.#timer = setInterval(() => void this.flush(), FLUSH_MS);
    this.#timer.unref();
  }

  /** Called for every forwarded request: a string key and a Map write, nothing else. */
  note(credential: string, version: number, caller: string): void {
    // Credential ids and caller names are [a-z0-9._-] (route-schema NAME, CALLER_NAME): the key is unambiguous.
    const key = `${credential}\n${version}\n${caller}`;
    const now = Date.now();
    const pending = this.#pending.get(key);
    if (pending) {
      pending.at = now;
      return;
    }
    if (this.#pending.size >= MAX_PENDING) return;
    this.#pending.set(key, { credential, version, caller, at: now });
  }

  async flush(): Promise<void> {
    if (this.#pending.size === 0) return;
    const batch = this.#pending;
    this.#pending = new Map();
    try {
      await this.#store.recordUsage([...batch.values()].map((use) => ({ ...use, at: new Date(use.at).toISOString() })));
    } catch (err) {
      // Keep what was not written (newer notes win) and try again at the next flush.
      for (const [key, entry] of batch) if (!this.#pending.has(key)) this.#pending.set(key, entry);
      this.#log.warn({ reason: (err as Error).message.slice(0, 200) }, 'could not record credential usage; will retry');
    }
  }

  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.flush();
  }
}

interface PendingUse {
  readonly credential: string;
  readonly version: number;
  readonly caller: string;
  /** Epoch ms of the latest use. */
  at: number;
}

/** Last use per version, newest first per caller, for display. */
export function lastUseByVersion(entries: readonly UsageEntry[]): Map<number, { caller: string; at: string }[]> {
  const out = new Map<number, { caller: string; at: string }[]>();
  for (const e of entries) out.set(e.version, [...(out.get(e.version) ?? []), { caller: e.caller, at: e.at }]);
  for (const list of out.values()) list.sort((a, b) => (a.at < b.at ? 1 : -1));
  return out;
}
