import { hash } from 'node:crypto';
import { createWriteStream, existsSync, fstat, renameSync, unlinkSync, type WriteStream } from 'node:fs';
import { appendFile, mkdir, open, stat } from 'node:fs/promises';
import { readTail, type Tail } from './audit-read.ts';
import { dirname } from 'node:path';
import { promisify } from 'node:util';
import { UserError } from '../errors.ts';
import type { Facts } from './alerts.ts';
import type { Logger } from './log.ts';

/**
 * The audit log: one JSON line per proxied request and per admin action, each carrying the SHA-256
 * of the line before it, so an edited, removed or reordered line breaks the chain.
 */

/** Field names, in the order they are written. */
export const AUDIT = {
  time: 'time',
  requestId: 'request_id',
  kind: 'kind',
  actor: 'actor',
  caller: 'caller',
  route: 'route',
  method: 'method',
  path: 'path',
  decision: 'decision',
  reason: 'reason',
  upstreamStatus: 'upstream_status',
  durationMs: 'duration_ms',
  credential: 'credential',
  credentialVersion: 'credential_version',
  action: 'action',
  target: 'target',
  /** On a recovery line: lines that never reached the file (a write refused, or dropped while the disk did not keep up). */
  lostLines: 'lost_lines',
  /** On a recovery line: the SHA-256 and length of the torn line(s) just before it. */
  tornSha256: 'torn_sha256',
  tornBytes: 'torn_bytes',
  prev: 'prev',
} as const;

/** `aborted`: the caller went away before its response was complete; nobody failed it. */
export type Decision = 'allow' | 'deny' | 'error' | 'aborted';

export interface RequestAudit {
  readonly requestId: string;
  readonly caller: string | null;
  readonly route: string | null;
  readonly method: string;
  /** Path only: never a query value or a body. */
  readonly path: string;
  readonly decision: Decision;
  readonly reason: string;
  readonly upstreamStatus: number | null;
  readonly durationMs: number;
  readonly credential: string | null;
  readonly credentialVersion: number | null;
}

export interface AdminAudit {
  /** The X-Request-Id of the admin listener's answer the line is about; none for a change read from a record's history. */
  readonly requestId?: string;
  readonly actor: string;
  readonly action: string;
  readonly target: string;
  readonly decision: Decision;
  readonly reason: string;
}

export const GENESIS = '0'.repeat(64);

/**
 * Where the chain stands, for a record kept outside the file (GET /v1/audit/head): a file cut
 * after that line, or rewritten from before it, no longer holds a line with `hash`, and
 * `egress audit verify --head` says so. Only hashes of lines and counts: nothing secret.
 */
export interface AuditHead {
  /** EGRESS_AUDIT_LOG (`-`: stdout); the head line is in it or, after a rotation, in a rotated file. */
  readonly file: string;
  /**
   * SHA-256 of the last line known to be in the file: its write has completed (it is in the file
   * for any reader; it may not be on the disk yet after a power cut). GENESIS before any line. The
   * next line chains to it once the `pending` lines have landed.
   */
  readonly hash: string;
  /** Lines this process has put in the file since it opened it, recovery lines included. */
  readonly lines_written: number;
  /** Lines taken but not yet known to be in the file (waiting for their batch, in flight, or held while writes are refused): not in the head yet. */
  readonly pending: number;
  /** When this head was read. */
  readonly time: string;
}

let isoMs = Number.NaN;
let isoText = '';

/** `new Date().toISOString()`, formatted once per millisecond: every request's line asks for it. */
function isoNow(): string {
  const now = Date.now();
  if (now !== isoMs) {
    isoMs = now;
    isoText = new Date(now).toISOString();
  }
  return isoText;
}

export function lineHash(line: string): string {
  return hash('sha256', line, 'hex');
}

export interface AuditOptions {
  /** Past this size the file is rotated: audit.log -> audit.log.1 -> … (the chain continues). */
  readonly maxBytes: number;
  /** Rotated files kept; older ones are removed. */
  readonly keep: number;
  /** Also write each line to stdout, for log shippers. */
  readonly alsoStdout: boolean;
  /**
   * How a write failure is reported (audit_write_failed): through the alerts, so that it reaches
   * the webhook and the alerts metric too. Without it, the operational log only.
   */
  readonly onFailure?: (message: string, facts: Facts) => void;
}

/**
 * Lines are handed to the file in batches: every write is a trip through libuv's thread pool, and
 * one per request cost more than the rest of the audit. A batch leaves after FLUSH_MS or at
 * FLUSH_BYTES, whichever comes first, and on close (SIGTERM drains into it); a process killed
 * outright loses at most the last FLUSH_MS of lines, as it would lose the stream's own queue.
 */
const FLUSH_MS = 10;
const FLUSH_BYTES = 64 * 1024;

/** Buffered lines beyond this are a sign the disk stopped taking writes: drop and report, never grow without bound. */
const MAX_BUFFERED_BYTES = 64 * 1024 * 1024;

/**
 * How often the file at EGRESS_AUDIT_LOG is compared with the one being written. A file renamed
 * away (logrotate without copytruncate) or deleted would otherwise take every later line with it:
 * into the rotated file (which logrotate then compresses) or into a file no name leads to.
 */
const MOVED_CHECK_MS = 1_000;

/** After a refused write, how long until the file is tried again (lines wait in memory meanwhile). */
const RETRY_MS = 1_000;

/** `,"prev":"<64 hex>"` and the newline: what a line's JSON grows by when it is chained. */
const CHAIN_BYTES = 75;

const fstatAsync = promisify(fstat);

export class AuditLog {
  readonly path: string;
  readonly #log: Logger;
  readonly #options: AuditOptions;
  #prev = GENESIS;
  /** Hash of the last line known to be in the file: where the chain resumes if the file has none, and the head reported. */
  #written = GENESIS;
  /** Lines this process has put in the file (confirmed written). */
  #linesWritten = 0;
  #stream: WriteStream | NodeJS.WritableStream | undefined;
  /** A write was refused: nothing goes to the file until #recover has found where it ends. */
  #failed = false;
  /** The file's size with the queued lines: where rotation counts from. */
  #bytes = 0;
  /** Lines dropped, never chained, while the file took nothing: counted in the next recovery line. */
  #dropped = 0;
  /**
   * Lines not yet handed to the file, as JSON without their `prev`: chained when they are written
   * together, at most FLUSH_MS after the first (one write for many requests), so a recovery line can
   * still go before them.
   */
  #pending: string[] = [];
  #pendingBytes = 0;
  /** Hashes of the lines of each write not yet confirmed, oldest first: after a refused write, the file says which landed. */
  #unconfirmed: string[][] = [];
  #flushTimer: NodeJS.Timeout | undefined;
  #movedTimer: NodeJS.Timeout | undefined;
  #checkingMoved = false;
  #retryTimer: NodeJS.Timeout | undefined;
  #recovering: Promise<void> | undefined;

  constructor(path: string, log: Logger, options: AuditOptions = { maxBytes: 100 * 1024 * 1024, keep: 10, alsoStdout: false }) {
    this.path = path;
    this.#log = log;
    this.#options = options;
  }

  async open(): Promise<void> {
    if (this.path === '-') {
      this.#stream = process.stdout;
      return;
    }
    try {
      await mkdir(dirname(this.path), { recursive: true, mode: 0o700 });
      // Opened for append once here to prove it can be written; its size is where rotation counts from.
      const handle = await open(this.path, 'a', 0o600);
      try {
        this.#bytes = (await handle.stat()).size;
      } finally {
        await handle.close();
      }
    } catch (err) {
      // Later write failures (a full disk) are alerted on while requests go on; a log that cannot be
      // written at all from the start is a configuration error: no request would ever be audited.
      throw new UserError(`EGRESS_AUDIT_LOG ${this.path} cannot be written (${(err as NodeJS.ErrnoException).code ?? 'error'}): every request is audited, so the proxy does not start without it`);
    }
    // A process killed in the middle of a write leaves its last line cut short. The next line must
    // not be glued onto it: the fragment is ended where it is and kept, and a recovery line records
    // its hash (so verify can step over it, and still notices if it is changed), chained to the last
    // whole line before it.
    const tail = await readTail(this.path);
    const last = tail.last ?? (await readTail(`${this.path}.1`)).last;
    this.#prev = last === undefined ? GENESIS : lineHash(last);
    this.#written = this.#prev;
    this.#bytes = tail.size;
    if (tail.torn !== undefined) {
      await this.#writeRecovery(tail, { [AUDIT.reason]: 'torn_line' });
      this.#log.warn({ audit_log: this.path, torn_bytes: Buffer.byteLength(tail.torn) }, 'the audit log ended in a line cut short (the process stopped while writing it); it is kept, and a recovery line after it continues the chain');
    }
    this.#openStream();
    this.#movedTimer = setInterval(() => void this.#reopenIfMoved(), MOVED_CHECK_MS);
    this.#movedTimer.unref();
  }

  #alert(message: string, facts: Facts): void {
    if (this.#options.onFailure) this.#options.onFailure(message, facts);
    else this.#log.error({ alert: 'audit_write_failed', ...facts }, message);
  }

  #openStream(): void {
    const stream = createWriteStream(this.path, { flags: 'a', mode: 0o600 });
    stream.on('error', (err: NodeJS.ErrnoException) => {
      // A full disk or a removed folder is reported, never crashed on. Requests go on; their lines
      // wait in memory until the file takes writes again (#recover).
      if (!this.#failed) this.#alert('audit log write failed; lines are kept in memory and written when the file takes them again', { audit_log: this.path, code: err.code ?? null });
      if (this.#stream !== stream) return;
      this.#failed = true;
      this.#stream = undefined;
      this.#scheduleRetry();
    });
    this.#stream = stream;
  }

  #scheduleRetry(): void {
    if (this.#retryTimer || this.#recovering) return;
    this.#retryTimer = setTimeout(() => void this.#recover(), RETRY_MS);
    this.#retryTimer.unref();
  }

  /**
   * After a refused write: find the last whole line the file holds, count the lines that did not
   * reach it (and those dropped meanwhile), and write a recovery line chained to that last line,
   * naming the loss and any torn line; then the waiting lines follow. Without it the first line
   * after the failure would point at a line that is not there, and verify would report tampering
   * and check nothing after it.
   */
  #recover(): Promise<void> {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#recovering ??= (async () => {
      try {
        const tail = await readTail(this.path);
        const onDisk = tail.last === undefined ? undefined : lineHash(tail.last);
        const unconfirmed = this.#unconfirmed.flat();
        const landed = onDisk === undefined ? -1 : unconfirmed.lastIndexOf(onDisk);
        const lost = unconfirmed.length - (landed + 1) + this.#dropped;
        this.#linesWritten += landed + 1;
        this.#prev = onDisk ?? this.#written;
        this.#bytes = tail.size + this.#pendingBytes;
        // A folder removed under the proxy (a cleanup, a volume remounted) is made again, as at start.
        if (tail.size === 0) await mkdir(dirname(this.path), { recursive: true, mode: 0o700 });
        await this.#writeRecovery(tail, { [AUDIT.reason]: 'write_failed', [AUDIT.lostLines]: lost });
        this.#unconfirmed = [];
        this.#dropped = 0;
        this.#failed = false;
        this.#log.info({ audit_log: this.path, lost_lines: lost }, 'audit log writable again');
        this.#openStream();
        this.#flush();
      } catch {
        // Still refused: the lines keep waiting (up to MAX_BUFFERED_BYTES), and the file is tried again.
      } finally {
        this.#recovering = undefined;
      }
      if (this.#failed) this.#scheduleRetry();
    })();
    return this.#recovering;
  }

  /** One write: the end of a torn line, if any, and a recovery line chained to the last whole line (this.#prev). */
  async #writeRecovery(tail: Tail, fields: Record<string, unknown>): Promise<void> {
    const torn = tail.torn === undefined ? {} : { [AUDIT.tornSha256]: lineHash(tail.torn), [AUDIT.tornBytes]: Buffer.byteLength(tail.torn) };
    const line = JSON.stringify({ [AUDIT.time]: isoNow(), [AUDIT.kind]: 'recovery', ...fields, ...torn, [AUDIT.prev]: this.#prev });
    const text = `${tail.torn !== undefined && !tail.tornEnded ? '\n' : ''}${line}\n`;
    await appendFile(this.path, text, { mode: 0o600 });
    this.#prev = lineHash(line);
    this.#written = this.#prev;
    this.#linesWritten++;
    this.#bytes += Buffer.byteLength(text);
  }

  /**
   * When the file at the path is no longer the one being written (renamed away, deleted, replaced),
   * the lines already queued go to the old file, in order, and the next ones to a new file at the
   * path, continuing the chain: audit.log.1 and audit.log verify as one.
   */
  async #reopenIfMoved(): Promise<void> {
    const stream = this.#stream as WriteStream | undefined;
    // The descriptor is set once the stream has opened its file (not in @types/node's WriteStream).
    const fd = (stream as { fd?: unknown } | undefined)?.fd;
    if (this.#checkingMoved || !stream || typeof fd !== 'number') return;
    this.#checkingMoved = true;
    try {
      const [writing, atPath] = await Promise.all([fstatAsync(fd), stat(this.path).catch(() => undefined)]);
      if (this.#stream !== stream || (atPath && atPath.ino === writing.ino && atPath.dev === writing.dev)) return;
      this.#log.warn({ audit_log: this.path }, atPath ? 'the audit log was moved away (rotated); new lines go to the new file at its path' : 'the audit log was removed; new lines go to a new file at its path');
      this.#flush();
      this.#stream = undefined;
      stream.end();
      this.#bytes = atPath?.size ?? 0;
      this.#openStream();
    } catch {
      // The stream closed under the check (rotation, shutdown): nothing to compare.
    } finally {
      this.#checkingMoved = false;
    }
  }

  /** audit.log -> audit.log.1, .1 -> .2, …; the oldest beyond `keep` is removed. Lines already queued land in the renamed file, in order. */
  #rotate(): void {
    // A stream not yet open (just made by open() or the last rotation) creates its file when it
    // opens: after a rename, a new file at the path, which it would share with the next stream, and
    // the lines queued to it would miss the renamed file. The next line past the size tries again.
    if ((this.#stream as WriteStream | undefined)?.pending) return;
    this.#flush();
    // Every rotation shifts the rotated files and removes the oldest before the file at the path
    // takes the place of audit.log.1. With no file there (removed and not yet made again by
    // #reopenIfMoved, or not yet created by the stream the last rotation opened), each line would
    // have shifted them once more, down to nothing: the rotation waits for a file to rotate.
    if (!existsSync(this.path)) return;
    try {
      const oldest = `${this.path}.${this.#options.keep}`;
      if (existsSync(oldest)) unlinkSync(oldest);
      for (let i = this.#options.keep - 1; i >= 1; i--) if (existsSync(`${this.path}.${i}`)) renameSync(`${this.path}.${i}`, `${this.path}.${i + 1}`);
      renameSync(this.path, `${this.path}.1`);
    } catch (err) {
      // Tried again after another maxBytes, not at the next line: each try shifts the rotated files again.
      this.#bytes = 0;
      this.#log.error({ code: (err as NodeJS.ErrnoException).code, audit_log: this.path }, 'audit log rotation failed; continuing in the same file');
      return;
    }
    const old = this.#stream as WriteStream | undefined;
    this.#stream = undefined;
    old?.end();
    this.#bytes = 0;
    this.#openStream();
  }

  request(entry: RequestAudit): void {
    this.#append({
      [AUDIT.time]: isoNow(),
      [AUDIT.requestId]: entry.requestId,
      [AUDIT.kind]: 'request',
      [AUDIT.caller]: entry.caller,
      [AUDIT.route]: entry.route,
      [AUDIT.method]: entry.method,
      [AUDIT.path]: entry.path,
      [AUDIT.decision]: entry.decision,
      [AUDIT.reason]: entry.reason,
      [AUDIT.upstreamStatus]: entry.upstreamStatus,
      [AUDIT.durationMs]: entry.durationMs,
      [AUDIT.credential]: entry.credential,
      [AUDIT.credentialVersion]: entry.credentialVersion,
    });
  }

  admin(entry: AdminAudit): void {
    this.#append({
      [AUDIT.time]: isoNow(),
      ...(entry.requestId !== undefined ? { [AUDIT.requestId]: entry.requestId } : {}),
      [AUDIT.kind]: 'admin',
      [AUDIT.actor]: entry.actor,
      [AUDIT.action]: entry.action,
      [AUDIT.target]: entry.target,
      [AUDIT.decision]: entry.decision,
      [AUDIT.reason]: entry.reason,
    });
  }

  #append(fields: Record<string, unknown>): void {
    const body = JSON.stringify(fields);
    const bytes = Buffer.byteLength(body) + CHAIN_BYTES;
    if (this.path !== '-') {
      const buffered = ((this.#stream as WriteStream | undefined)?.writableLength ?? 0) + this.#pendingBytes;
      if (buffered > MAX_BUFFERED_BYTES) {
        // The disk is not keeping up (or is full): report and drop rather than block requests or
        // exhaust memory. Dropped lines are never chained; the next recovery line counts them.
        if (this.#dropped++ % 1000 === 0) this.#alert('audit log is not accepting writes; lines are being dropped', { audit_log: this.path, dropped: this.#dropped });
        return;
      }
      if (!this.#failed && this.#bytes > 0 && this.#bytes + bytes > this.#options.maxBytes) this.#rotate();
      this.#bytes += bytes;
    }
    this.#pending.push(body);
    this.#pendingBytes += bytes;
    if (this.#pendingBytes >= FLUSH_BYTES) this.#flush();
    else this.#flushTimer ??= setTimeout(() => this.#flush(), FLUSH_MS);
  }

  /** Chain the queued lines and write them, in order, as one write. */
  #flush(): void {
    clearTimeout(this.#flushTimer);
    this.#flushTimer = undefined;
    if (this.path !== '-' && (this.#failed || !this.#stream)) return this.#scheduleRetry();
    if (this.#dropped > 0) {
      // Dropped while the disk was slow, though no write was refused: said where they would have been.
      this.#pending.unshift(JSON.stringify({ [AUDIT.time]: isoNow(), [AUDIT.kind]: 'recovery', [AUDIT.reason]: 'lines_dropped', [AUDIT.lostLines]: this.#dropped }));
      this.#dropped = 0;
    }
    if (this.#pending.length === 0) return;
    const hashes: string[] = [];
    let text = '';
    for (const body of this.#pending) {
      // The same bytes as JSON.stringify with `prev` as the last field: the hash is hex, nothing to escape.
      const line = `${body.slice(0, -1)},"${AUDIT.prev}":"${this.#prev}"}`;
      this.#prev = lineHash(line);
      hashes.push(this.#prev);
      text += `${line}\n`;
    }
    this.#pending = [];
    this.#pendingBytes = 0;
    if (this.#options.alsoStdout && this.path !== '-') process.stdout.write(text);
    if (this.path === '-') {
      // Stdout is written synchronously for files and pipes (Node's process I/O): the lines are out.
      this.#stream?.write(text);
      this.#written = this.#prev;
      this.#linesWritten += hashes.length;
      return;
    }
    this.#unconfirmed.push(hashes);
    this.#stream!.write(text, (err) => {
      const i = err ? -1 : this.#unconfirmed.indexOf(hashes);
      if (i < 0) return;
      this.#linesWritten += this.#unconfirmed.splice(0, i + 1).reduce((n, written) => n + written.length, 0);
      this.#written = hashes.at(-1)!;
    });
  }

  /** The chain's head as far as the file is known to hold it (see AuditHead). */
  head(): AuditHead {
    let unconfirmed = 0;
    for (const written of this.#unconfirmed) unconfirmed += written.length;
    return { file: this.path, hash: this.#written, lines_written: this.#linesWritten, pending: this.#pending.length + unconfirmed, time: new Date().toISOString() };
  }

  async close(): Promise<void> {
    clearInterval(this.#movedTimer);
    // Lines waiting for a file that refused them get one last try.
    if (this.#failed) await this.#recover();
    clearTimeout(this.#retryTimer);
    this.#flush();
    clearTimeout(this.#retryTimer);
    if (this.#failed && this.#pending.length > 0) this.#alert('audit lines could not be written before exit', { audit_log: this.path, lines: this.#pending.length });
    const stream = this.#stream;
    this.#stream = undefined;
    if (stream && stream !== process.stdout && 'close' in stream) {
      await new Promise<void>((resolveClose) => (stream as WriteStream).end(() => resolveClose()));
    }
  }
}
