import { hash } from 'node:crypto';
import { createWriteStream, existsSync, fstat, renameSync, unlinkSync, type WriteStream } from 'node:fs';
import { appendFile, mkdir, open, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { promisify } from 'node:util';
import { UserError } from '../errors.ts';
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
  /** On a recovery line: the SHA-256 and length of the torn line just before it. */
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
  readonly actor: string;
  readonly action: string;
  readonly target: string;
  readonly decision: Decision;
  readonly reason: string;
}

export const GENESIS = '0'.repeat(64);

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

const fstatAsync = promisify(fstat);

export class AuditLog {
  readonly path: string;
  readonly #log: Logger;
  readonly #options: AuditOptions;
  #prev = GENESIS;
  #stream: WriteStream | NodeJS.WritableStream | undefined;
  #failed = false;
  #bytes = 0;
  #dropped = 0;
  /** Lines not yet handed to the file: written together, at most FLUSH_MS after the first (one write for many requests). */
  #pending: string[] = [];
  #pendingBytes = 0;
  #flushTimer: NodeJS.Timeout | undefined;
  #movedTimer: NodeJS.Timeout | undefined;
  #checkingMoved = false;

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
    // whole line before it. Both go in one write, so a second crash cannot part them.
    const tail = await readTail(this.path);
    const last = tail.last ?? (await readTail(`${this.path}.1`)).last;
    this.#prev = last === undefined ? GENESIS : lineHash(last);
    if (tail.torn !== undefined) {
      const tornBytes = Buffer.byteLength(tail.torn);
      const line = JSON.stringify({ [AUDIT.time]: isoNow(), [AUDIT.kind]: 'recovery', [AUDIT.reason]: 'torn_line', [AUDIT.tornSha256]: lineHash(tail.torn), [AUDIT.tornBytes]: tornBytes, [AUDIT.prev]: this.#prev });
      await appendFile(this.path, `\n${line}\n`);
      this.#bytes += Buffer.byteLength(line) + 2;
      this.#prev = lineHash(line);
      this.#log.warn({ audit_log: this.path, torn_bytes: tornBytes }, 'the audit log ended in a line cut short (the process stopped while writing it); it is kept, and a recovery line after it continues the chain');
    }
    this.#openStream();
    this.#movedTimer = setInterval(() => void this.#reopenIfMoved(), MOVED_CHECK_MS);
    this.#movedTimer.unref();
  }

  #openStream(): void {
    const stream = createWriteStream(this.path, { flags: 'a', mode: 0o600 });
    stream.on('error', (err: NodeJS.ErrnoException) => {
      // A full disk or a removed folder is reported, never crashed on; the next line tries again.
      if (!this.#failed) this.#log.error({ alert: 'audit_write_failed', audit_log: this.path, code: err.code }, 'audit log write failed');
      this.#failed = true;
      if (this.#stream === stream) this.#stream = undefined;
    });
    stream.on('open', () => {
      if (this.#failed) this.#log.info({ audit_log: this.path }, 'audit log writable again');
      this.#failed = false;
    });
    this.#stream = stream;
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
    this.#flush();
    try {
      const oldest = `${this.path}.${this.#options.keep}`;
      if (existsSync(oldest)) unlinkSync(oldest);
      for (let i = this.#options.keep - 1; i >= 1; i--) if (existsSync(`${this.path}.${i}`)) renameSync(`${this.path}.${i}`, `${this.path}.${i + 1}`);
      renameSync(this.path, `${this.path}.1`);
    } catch (err) {
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
      [AUDIT.kind]: 'admin',
      [AUDIT.actor]: entry.actor,
      [AUDIT.action]: entry.action,
      [AUDIT.target]: entry.target,
      [AUDIT.decision]: entry.decision,
      [AUDIT.reason]: entry.reason,
    });
  }

  #append(fields: Record<string, unknown>): void {
    fields[AUDIT.prev] = this.#prev;
    const line = JSON.stringify(fields);
    const text = `${line}\n`;
    const bytes = Buffer.byteLength(text);
    if (this.path !== '-') {
      if (!this.#stream) this.#openStream();
      const buffered = ((this.#stream as WriteStream | undefined)?.writableLength ?? 0) + this.#pendingBytes;
      if (buffered > MAX_BUFFERED_BYTES) {
        // The disk is not keeping up (or is full): report and drop rather than block requests or exhaust memory.
        if (this.#dropped++ % 1000 === 0) this.#log.error({ alert: 'audit_write_failed', dropped: this.#dropped }, 'audit log is not accepting writes; lines are being dropped');
        return;
      }
      if (this.#bytes > 0 && this.#bytes + bytes > this.#options.maxBytes) this.#rotate();
      this.#bytes += bytes;
    }
    this.#prev = lineHash(line);
    this.#pending.push(text);
    this.#pendingBytes += bytes;
    if (this.#pendingBytes >= FLUSH_BYTES) this.#flush();
    else this.#flushTimer ??= setTimeout(() => this.#flush(), FLUSH_MS);
  }

  /** Write the queued lines, in order, as one write. */
  #flush(): void {
    clearTimeout(this.#flushTimer);
    this.#flushTimer = undefined;
    if (this.#pending.length === 0) return;
    const text = this.#pending.length === 1 ? this.#pending[0]! : this.#pending.join('');
    this.#pending = [];
    this.#pendingBytes = 0;
    if (this.#options.alsoStdout && this.path !== '-') process.stdout.write(text);
    if (this.path !== '-' && !this.#stream) this.#openStream();
    this.#stream?.write(text);
  }

  async close(): Promise<void> {
    clearInterval(this.#movedTimer);
    this.#flush();
    const stream = this.#stream;
    this.#stream = undefined;
    if (stream && stream !== process.stdout && 'close' in stream) {
      await new Promise<void>((resolveClose) => (stream as WriteStream).end(() => resolveClose()));
    }
  }
}

/**
 * The end of an existing audit file: its last complete line (so the chain continues across
 * restarts), and the bytes after it when the file does not end in a newline (a line torn by a crash).
 */
async function readTail(path: string): Promise<{ last?: string; torn?: string }> {
  let size: number;
  try {
    size = (await stat(path)).size;
  } catch {
    return {};
  }
  if (size === 0) return {};
  const handle = await open(path, 'r');
  try {
    const chunk = Math.min(size, 1024 * 1024);
    const buf = Buffer.alloc(chunk);
    await handle.read(buf, 0, chunk, size - chunk);
    const lines = buf.toString('utf8').split('\n');
    const end = lines.pop()!;
    return { last: lines.filter((l) => l.length > 0).at(-1), ...(end.length > 0 ? { torn: end } : {}) };
  } finally {
    await handle.close();
  }
}

export interface VerifyResult {
  readonly ok: boolean;
  readonly lines: number;
  readonly firstBad?: { readonly file: string; readonly line: number; readonly reason: string };
  /** Lines cut short by a crash, each followed by the recovery line the restarted proxy wrote. */
  readonly torn?: readonly { readonly file: string; readonly line: number }[];
}

/**
 * Check the hash chain of one or more files, in order (a rotated file continues the chain). The
 * chain must start at the genesis hash, so removing the first line is caught too; `partial` checks
 * a later segment whose first line follows lines not given here. A line that is not JSON is allowed
 * only as a line torn by a crash: directly followed by a recovery line that carries its hash.
 */
export async function verifyAudit(files: readonly string[], read: (file: string) => Promise<string>, options: { partial?: boolean } = {}): Promise<VerifyResult> {
  let prev: string | undefined = options.partial ? undefined : GENESIS;
  let count = 0;
  let pendingTorn: { file: string; line: number; hash: string } | undefined;
  const torn: { file: string; line: number }[] = [];
  const notJson = (at: { file: string; line: number }) => ({ ok: false, lines: count, firstBad: { file: at.file, line: at.line, reason: 'not a JSON line' } });
  for (const file of files) {
    const lines = (await read(file)).split('\n');
    if (lines.at(-1) === '') lines.pop();
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i]!;
      let parsed: { prev?: unknown; kind?: unknown; [AUDIT.tornSha256]?: unknown };
      try {
        parsed = JSON.parse(line) as typeof parsed;
      } catch {
        if (pendingTorn) return notJson(pendingTorn);
        pendingTorn = { file, line: i + 1, hash: lineHash(line) };
        continue;
      }
      if (pendingTorn) {
        if (parsed.kind !== 'recovery' || parsed[AUDIT.tornSha256] !== pendingTorn.hash) return notJson(pendingTorn);
        torn.push({ file: pendingTorn.file, line: pendingTorn.line });
        pendingTorn = undefined;
      }
      if (typeof parsed.prev !== 'string') return { ok: false, lines: count, firstBad: { file, line: i + 1, reason: 'no prev hash' } };
      if (prev !== undefined && parsed.prev !== prev) {
        const reason = count === 0 ? 'the chain does not start at the genesis hash (lines were removed from the start; use --partial for a later segment)' : 'prev hash does not match the line before (a line was edited, removed or reordered)';
        return { ok: false, lines: count, firstBad: { file, line: i + 1, reason } };
      }
      prev = lineHash(line);
      count++;
    }
  }
  if (pendingTorn) return { ok: false, lines: count, firstBad: { file: pendingTorn.file, line: pendingTorn.line, reason: 'the last line is incomplete (not a whole JSON line: the writer stopped in the middle of it, or the file was cut short)' } };
  return torn.length > 0 ? { ok: true, lines: count, torn } : { ok: true, lines: count };
}
