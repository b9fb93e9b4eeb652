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
  #pending = new Map<string, UsageEntry>();
  #timer: NodeJS.Timeout | undefined;

  constructor(store: StoreBackend, log: Logger) {
    this.#store = store;
    this.#log = log;
  }

  start(): void {
    this.#timer = setInterval(() => void this.flush(), FLUSH_MS);
    this.#timer.unref();
  }

  note(credential: string, version: number, caller: string): void {
    const key = JSON.stringify([credential, version, caller]);
    if (this.#pending.size >= MAX_PENDING && !this.#pending.has(key)) return;
    this.#pending.set(key, { credential, version, caller, at: new Date().toISOString() });
  }

  async flush(): Promise<void> {
    if (this.#pending.size === 0) return;
    const batch = this.#pending;
    this.#pending = new Map();
    try {
      await this.#store.recordUsage([...batch.values()]);
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

/** Last use per version, newest first per caller, for display. */
export function lastUseByVersion(entries: readonly UsageEntry[]): Map<number, { caller: string; at: string }[]> {
  const out = new Map<number, { caller: string; at: string }[]>();
  for (const e of entries) out.set(e.version, [...(out.get(e.version) ?? []), { caller: e.caller, at: e.at }]);
  for (const list of out.values()) list.sort((a, b) => (a.at < b.at ? 1 : -1));
  return out;
}
