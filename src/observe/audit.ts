import { createHash } from 'node:crypto';
import { createWriteStream, type WriteStream } from 'node:fs';
import { mkdir, open, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
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

export function lineHash(line: string): string {
  return createHash('sha256').update(line, 'utf8').digest('hex');
}

export class AuditLog {
  readonly path: string;
  readonly #log: Logger;
  #prev = GENESIS;
  #stream: WriteStream | NodeJS.WritableStream | undefined;
  #failed = false;

  constructor(path: string, log: Logger) {
    this.path = path;
    this.#log = log;
  }

  async open(): Promise<void> {
    if (this.path === '-') {
      this.#stream = process.stdout;
      return;
    }
    await mkdir(dirname(this.path), { recursive: true, mode: 0o700 });
    this.#prev = await lastLineHash(this.path);
    this.#openStream();
  }

  #openStream(): void {
    const stream = createWriteStream(this.path, { flags: 'a', mode: 0o600 });
    stream.on('error', (err: NodeJS.ErrnoException) => {
      // A full disk or a removed folder is reported, never crashed on; the next line tries again.
      if (!this.#failed) this.#log.error({ audit_log: this.path, code: err.code }, 'audit log write failed');
      this.#failed = true;
      this.#stream = undefined;
    });
    this.#stream = stream;
  }

  request(entry: RequestAudit): void {
    this.#append({
      [AUDIT.time]: new Date().toISOString(),
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
      [AUDIT.time]: new Date().toISOString(),
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
    this.#prev = lineHash(line);
    if (!this.#stream && this.path !== '-') this.#openStream();
    this.#stream?.write(`${line}\n`);
  }

  async close(): Promise<void> {
    const stream = this.#stream;
    this.#stream = undefined;
    if (stream && stream !== process.stdout && 'close' in stream) {
      await new Promise<void>((resolveClose) => (stream as WriteStream).end(() => resolveClose()));
    }
  }
}

/** Hash of the last complete line of an existing audit file, so the chain continues across restarts. */
async function lastLineHash(path: string): Promise<string> {
  let size: number;
  try {
    size = (await stat(path)).size;
  } catch {
    return GENESIS;
  }
  if (size === 0) return GENESIS;
  const handle = await open(path, 'r');
  try {
    const chunk = Math.min(size, 1024 * 1024);
    const buf = Buffer.alloc(chunk);
    await handle.read(buf, 0, chunk, size - chunk);
    const lines = buf.toString('utf8').split('\n').filter((l) => l.length > 0);
    const last = lines.at(-1);
    return last ? lineHash(last) : GENESIS;
  } finally {
    await handle.close();
  }
}

export interface VerifyResult {
  readonly ok: boolean;
  readonly lines: number;
  readonly firstBad?: { readonly file: string; readonly line: number; readonly reason: string };
}

/**
 * Check the hash chain of one or more files, in order (a rotated file continues the chain). The
 * chain must start at the genesis hash, so removing the first line is caught too; `partial` checks
 * a later segment whose first line follows lines not given here.
 */
export async function verifyAudit(files: readonly string[], read: (file: string) => Promise<string>, options: { partial?: boolean } = {}): Promise<VerifyResult> {
  let prev: string | undefined = options.partial ? undefined : GENESIS;
  let count = 0;
  for (const file of files) {
    const lines = (await read(file)).split('\n');
    if (lines.at(-1) === '') lines.pop();
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i]!;
      let parsed: { prev?: unknown };
      try {
        parsed = JSON.parse(line) as { prev?: unknown };
      } catch {
        return { ok: false, lines: count, firstBad: { file, line: i + 1, reason: 'not a JSON line' } };
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
  return { ok: true, lines: count };
}
