import { errorCode } from '../errors.ts';
import type { Logger } from '../observe/log.ts';
import { CallerIndex } from './callers.ts';
import type { CredentialRecord } from './records.ts';
import type { StoreBackend, StoreSnapshot } from './types.ts';

/**
 * The proxy's in-memory view of the store: ciphertext records only, refreshed whenever the backend
 * reports a change. Decryption happens per request, at the edge, and nothing decrypted is kept.
 */
export class StoreView {
  readonly backend: StoreBackend;
  readonly #log: Logger;
  #snapshot: StoreSnapshot | undefined;
  #callers = new CallerIndex([]);
  #lastError: string | undefined;
  #loadedAt: Date | undefined;
  #unwatch: (() => void) | undefined;
  #refreshing: Promise<void> | undefined;
  #again = false;

  constructor(backend: StoreBackend, log: Logger) {
    this.backend = backend;
    this.#log = log;
  }

  async start(): Promise<void> {
    await this.refresh();
    this.#unwatch = this.backend.watch(() => void this.refresh());
  }

  /** Re-read the store; concurrent calls coalesce, and a change seen mid-read triggers one more read. */
  refresh(): Promise<void> {
    if (this.#refreshing) {
      this.#again = true;
      return this.#refreshing;
    }
    this.#refreshing = (async () => {
      do {
        this.#again = false;
        try {
          const snapshot = await this.backend.load();
          this.#snapshot = snapshot;
          this.#callers = new CallerIndex(snapshot.callers.values());
          this.#loadedAt = new Date();
          if (this.#lastError) this.#log.info({ store: this.backend.description }, 'store reachable again');
          this.#lastError = undefined;
          for (const [key, why] of snapshot.damaged) this.#log.error({ record: key, reason: why }, 'store record is damaged; it fails closed');
        } catch (err) {
          const reason = err instanceof Error && err.name === 'UserError' ? err.message : (errorCode(err) ?? 'read failed');
          if (reason !== this.#lastError) this.#log.error({ store: this.backend.description, reason }, 'store unreachable; serving the last records read');
          this.#lastError = reason;
        }
      } while (this.#again);
    })().finally(() => {
      this.#refreshing = undefined;
    });
    return this.#refreshing;
  }

  credential(id: string): CredentialRecord | undefined {
    return this.#snapshot?.credentials.get(id);
  }

  isDamaged(kind: 'credential' | 'caller', key: string): boolean {
    return this.#snapshot?.damaged.has(`${kind}:${key}`) ?? false;
  }

  identifyCaller(token: string): string | undefined {
    return this.#callers.identify(token);
  }

  status(): { reachable: boolean; loaded: boolean; loaded_at?: string; error?: string } {
    return {
      reachable: this.#lastError === undefined && this.#snapshot !== undefined,
      loaded: this.#snapshot !== undefined,
      ...(this.#loadedAt ? { loaded_at: this.#loadedAt.toISOString() } : {}),
      ...(this.#lastError ? { error: this.#lastError } : {}),
    };
  }

  async close(): Promise<void> {
    this.#unwatch?.();
    await this.backend.close();
  }
}
