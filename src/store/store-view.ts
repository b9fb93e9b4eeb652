import { CALLER_CERT_BACKDATE_MS } from '../certs/ca.ts';
import { errorCode } from '../errors.ts';
import type { Logger } from '../observe/log.ts';
import type { Alerts } from '../observe/alerts.ts';
import { ADMIN_TOKEN_PREFIX, CallerIndex, type Identified, type PresentedToken } from './callers.ts';
import { compareCopies, laterIncarnation, type AdminRecord, type CallerRecord, type CredentialRecord } from './records.ts';
import type { StoreBackend, StoreSnapshot } from './types.ts';

/**
 * After a failed read, how soon the view reads again by itself. Backends report changes, and a
 * read can fail while nothing changes (a reply past the command timeout, a damaged index): the
 * view would otherwise serve stale records until the bound and then refuse everyone, with the
 * store long readable again, until the next write.
 */
const RETRY_MS = 1_000;

export interface StoreViewOptions {
  /** How long cached records keep serving while the store cannot be read. */
  readonly maxStaleMs: number;
  readonly alerts?: Alerts;
  /** Called on every failed read. */
  readonly onError?: () => void;
}

/**
 * The proxy's in-memory view of the store: ciphertext records only, refreshed whenever the backend
 * reports a change. Decryption happens per request, at the edge, and nothing decrypted is kept.
 *
 * Two protections sit here, for every backend: a record never goes back to a lower revision than
 * one this instance has seen, nor to an earlier incarnation (a restored old copy or a replayed
 * write cannot resurrect a revoked token or an old key), and when the store cannot be read, cached
 * records serve for a bounded time only.
 */
export class StoreView {
  readonly backend: StoreBackend;
  readonly #log: Logger;
  readonly #maxStaleMs: number;
  readonly #alerts: Alerts | undefined;
  readonly #onError: (() => void) | undefined;
  #snapshot: StoreSnapshot | undefined;
  #callers = new CallerIndex([]);
  #admins = new CallerIndex([]);
  #lastError: string | undefined;
  #lastOkAt: number | undefined;
  #unwatch: (() => void) | undefined;
  #refreshing: Promise<void> | undefined;
  #again = false;
  #retry: NodeJS.Timeout | undefined;
  #closed = false;
  readonly #rollbacksReported = new Set<string>();
  /**
   * The newest copy seen of every record (compareCopies), by kind and key, kept across reads: also
   * while a record is damaged or gone, so that restoring an older copy afterwards is still a rollback.
   */
  readonly #newest = { credential: new Map<string, CredentialRecord>(), caller: new Map<string, CallerRecord>(), admin: new Map<string, AdminRecord>() };
  readonly #listeners: ((previous: StoreSnapshot | undefined, next: StoreSnapshot) => void)[] = [];

  constructor(backend: StoreBackend, log: Logger, options: StoreViewOptions) {
    this.backend = backend;
    this.#log = log;
    this.#maxStaleMs = options.maxStaleMs;
    this.#alerts = options.alerts;
    this.#onError = options.onError;
  }

  async start(): Promise<void> {
    // Watch first: a change written between a first read and a later watch was the watch's starting
    // point and never read (a caller revoked then stayed accepted until the next change). A change
    // seen while the read is out is read again (refresh coalesces).
    this.#unwatch = this.backend.watch(() => void this.refresh());
    await this.refresh();
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
          this.#apply(await this.backend.load());
          this.#lastOkAt = performance.now();
          if (this.#lastError) this.#log.info({ store: this.backend.description }, 'store reachable again');
          this.#lastError = undefined;
        } catch (err) {
          const reason = err instanceof Error && err.name === 'UserError' ? err.message : (errorCode(err) ?? (err instanceof Error ? err.message.slice(0, 200) : 'read failed'));
          if (reason !== this.#lastError) this.#log.error({ store: this.backend.description, reason }, 'store unreachable; serving cached records for a bounded time');
          this.#onError?.();
          this.#alerts?.raise('store_unreachable', 'critical', this.backend.description, 'the credential store cannot be read', { store: this.backend.description, max_stale_ms: this.#maxStaleMs });
          this.#lastError = reason;
        }
      } while (this.#again);
      if (this.#lastError !== undefined && !this.#closed && this.#retry === undefined) {
        this.#retry = setTimeout(() => {
          this.#retry = undefined;
          void this.refresh();
        }, RETRY_MS);
        this.#retry.unref();
      }
    })().finally(() => {
      this.#refreshing = undefined;
    });
    return this.#refreshing;
  }

  #apply(next: StoreSnapshot): void {
    const prev = this.#snapshot;
    const credentials = new Map(next.credentials);
    const callers = new Map(next.callers);
    const admins = new Map(next.admins);
    this.#keepNewer('credential', this.#newest.credential, credentials, next.damaged);
    this.#keepNewer('caller', this.#newest.caller, callers, next.damaged);
    this.#keepNewer('admin', this.#newest.admin, admins, next.damaged);
    for (const [key, why] of next.damaged) {
      if (!prev?.damaged.has(key)) {
        this.#log.error({ record: key, reason: why }, 'store record is damaged; it fails closed');
        this.#alerts?.raise('store_record_damaged', 'critical', key, 'a store record is damaged and fails closed', { record: key, reason: why });
      }
    }
    const snapshot = { credentials, callers, admins, damaged: next.damaged };
    this.#snapshot = snapshot;
    for (const listener of this.#listeners) listener(prev, snapshot);
    this.#callers = new CallerIndex(callers.values());
    this.#admins = new CallerIndex(admins.values(), ADMIN_TOKEN_PREFIX);
  }

  /**
   * Rollback protection: a record that went back, or vanished, keeps the newest copy seen (a
   * damaged one fails closed meanwhile). Copies are ordered by incarnation (created_at), then
   * revision (compareCopies): a record made afresh after the store lost its data starts again at
   * revision 1 and must still replace the copy kept here, or a caller added again and revoked
   * would never be revoked on a running instance. `newest` is updated with what is kept.
   */
  #keepNewer<R extends CredentialRecord | CallerRecord>(kind: string, newest: Map<string, R>, next: Map<string, R>, damaged: ReadonlyMap<string, string>): void {
    for (const [key, now] of next) {
      const kept = newest.get(key);
      if (kept !== undefined && compareCopies(now, kept) < 0) continue;
      // Only what revisions alone would have refused is news: `callers add` of a revoked name makes a
      // new incarnation too, at a higher revision, and is an ordinary change.
      if (kept !== undefined && now.revision <= kept.revision && laterIncarnation(now, kept)) this.#newIncarnation(`${kind}:${key}`, kept, now);
      newest.set(key, now);
    }
    for (const [key, old] of newest) {
      if (damaged.has(`${kind}:${key}`)) continue;
      const now = next.get(key);
      if (now === old) continue;
      next.set(key, old);
      const id = JSON.stringify([kind, key, old.created_at, now ? [now.created_at, now.revision] : 'gone']);
      if (!this.#rollbacksReported.has(id)) {
        this.#rollbacksReported.add(id);
        const facts = { record: `${kind}:${key}`, seen_revision: old.revision, store_revision: now?.revision ?? null, seen_created_at: old.created_at, store_created_at: now?.created_at ?? null };
        this.#log.error(facts, 'store went back to an older revision of a record; keeping the newest one seen');
        this.#alerts?.raise('store_rollback', 'critical', `${kind}:${key}`, 'the store went back to an older revision of a record', facts);
      }
    }
  }

  /**
   * A record created again (after the store lost it, most likely) replaces the copy kept here
   * although its revision is not higher. Said loudly: it is also what a writer that forged a
   * later created_at would look like.
   */
  #newIncarnation(record: string, kept: CredentialRecord | CallerRecord, now: CredentialRecord | CallerRecord): void {
    const facts = { record, seen_revision: kept.revision, store_revision: now.revision, seen_created_at: kept.created_at, store_created_at: now.created_at };
    this.#log.warn(facts, 'store holds a record created again (a new incarnation, its revisions start over); it replaces the one seen');
    this.#alerts?.raise('store_new_incarnation', 'warning', record, 'a store record was created again and replaces the one seen', facts);
  }

  /** Called after every read of the store with the view before and after it. */
  onChange(listener: (previous: StoreSnapshot | undefined, next: StoreSnapshot) => void): void {
    this.#listeners.push(listener);
  }

  /** Cached records are usable: read at least once, and not stale past the bound while the store is down. */
  usable(): boolean {
    if (this.#lastOkAt === undefined) return false;
    return this.#lastError === undefined || performance.now() - this.#lastOkAt <= this.#maxStaleMs;
  }

  credential(id: string): CredentialRecord | undefined {
    return this.#snapshot?.credentials.get(id);
  }

  isDamaged(kind: 'credential' | 'caller', key: string): boolean {
    return this.#snapshot?.damaged.has(`${kind}:${key}`) ?? false;
  }

  /** See callerActive below. */
  callerActive(name: string, certificateNotBefore?: number): boolean {
    return this.#snapshot !== undefined && callerActive(this.#snapshot, name, certificateNotBefore);
  }

  identifyCaller(token: string, memo?: PresentedToken): Identified {
    return this.#callers.lookup(token, Date.now(), memo);
  }

  identifyAdmin(token: string): string | undefined {
    return this.#admins.identify(token);
  }

  /**
   * Whether the admin token `name` (as identifyAdmin gave it) may only read. Read from the same
   * snapshot the token index was built from; a record without the field is a full token.
   */
  adminReadOnly(name: string): boolean {
    return this.#snapshot?.admins.get(name)?.read_only === true;
  }

  /** As identifyAdmin, and also tells when the token is one that expired or was revoked. */
  lookupAdmin(token: string): Identified {
    return this.#admins.lookup(token);
  }

  snapshot(): StoreSnapshot | undefined {
    return this.#snapshot;
  }

  status(): { reachable: boolean; loaded: boolean; usable: boolean; loaded_at?: string; stale_ms?: number; error?: string } {
    const stale = this.#lastError !== undefined && this.#lastOkAt !== undefined ? Math.round(performance.now() - this.#lastOkAt) : undefined;
    return {
      reachable: this.#lastError === undefined && this.#snapshot !== undefined,
      loaded: this.#snapshot !== undefined,
      usable: this.usable(),
      ...(this.#lastOkAt !== undefined ? { loaded_at: new Date(Date.now() - (performance.now() - this.#lastOkAt)).toISOString() } : {}),
      ...(stale !== undefined ? { stale_ms: stale } : {}),
      ...(this.#lastError ? { error: this.#lastError } : {}),
    };
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#retry);
    this.#unwatch?.();
    await this.backend.close();
  }
}

/**
 * A caller in the store, readable and not revoked: what a client certificate's name must be to
 * identify anyone. With the certificate's notBefore, the certificate must also have been issued
 * after the caller was (last) added: a revoked name can be added again (`callers add`), and that
 * must not bring back the certificates `callers revoke` ended. issue-caller back-dates notBefore by
 * CALLER_CERT_BACKDATE_MS and X.509 times have whole seconds, so created_at is compared on whole
 * seconds.
 */
export function callerActive(snapshot: StoreSnapshot, name: string, certificateNotBefore?: number): boolean {
  const record = snapshot.callers.get(name);
  if (record === undefined || record.revoked_at !== undefined || snapshot.damaged.has(`caller:${name}`)) return false;
  if (certificateNotBefore === undefined) return true;
  const added = Math.floor(Date.parse(record.created_at) / 1000) * 1000;
  return Number.isFinite(added) && certificateNotBefore + CALLER_CERT_BACKDATE_MS >= added;
}
