import { open, stat } from 'node:fs/promises';
import { AUDIT, GENESIS, lineHash } from './audit.ts';

/**
 * Reading an audit file back: its tail, where a restarted writer continues the chain, and the
 * chain check behind `egress audit verify`.
 */

export interface Tail {
  readonly size: number;
  /** The last whole line (a JSON object), where the chain continues. */
  readonly last?: string;
  /**
   * What follows it when that is not whole lines: a line cut short (a crash, a refused write), or
   * several, such as one already ended by a recovery attempt that was refused in turn; without the
   * final newline. verify sees these as the non-JSON lines before a recovery line.
   */
  readonly torn?: string;
  /** The torn part already ends in a newline. */
  readonly tornEnded?: boolean;
}

/** The end of an existing audit file: its last whole line (so the chain continues across restarts) and any torn line after it. */
export async function readTail(path: string): Promise<Tail> {
  let size: number;
  try {
    size = (await stat(path)).size;
  } catch {
    return { size: 0 };
  }
  if (size === 0) return { size };
  const handle = await open(path, 'r');
  try {
    const chunk = Math.min(size, 1024 * 1024);
    const buf = Buffer.alloc(chunk);
    await handle.read(buf, 0, chunk, size - chunk);
    const lines = buf.toString('utf8').split('\n');
    // The last element is what follows the last newline: "" when the file ends in one.
    let end = lines.length - 1;
    let last: string | undefined;
    for (let i = lines.length - 2; i >= 0; i--) {
      if (isChainedLine(lines[i]!)) {
        last = lines[i];
        end = i;
        break;
      }
    }
    const rest = lines.slice(end + 1).join('\n');
    const found = last !== undefined ? { last } : {};
    if (rest === '') return { size, ...found };
    const tornEnded = rest.endsWith('\n');
    return { size, ...found, torn: tornEnded ? rest.slice(0, -1) : rest, tornEnded };
  } finally {
    await handle.close();
  }
}

function isChainedLine(line: string): boolean {
  if (!line.startsWith('{')) return false;
  try {
    return typeof (JSON.parse(line) as { prev?: unknown }).prev === 'string';
  } catch {
    return false;
  }
}

export interface VerifyResult {
  readonly ok: boolean;
  readonly lines: number;
  readonly firstBad?: { readonly file: string; readonly line: number; readonly reason: string };
  /** Lines cut short (a crash, a refused write), each accounted for by the recovery line after it. */
  readonly torn?: readonly { readonly file: string; readonly line: number }[];
  /** Recovery lines that record lines which never reached the file, and how many. */
  readonly lost?: readonly { readonly file: string; readonly line: number; readonly lines: number }[];
  /** With a recorded head: whether the lines reach it, and the line that has its hash. */
  readonly head?: HeadCheck;
}

export interface HeadCheck {
  readonly hash: string;
  /**
   * A line has the head's hash, or a line follows it (the first line of a `partial` segment, or the
   * first line of the chain for GENESIS, the head before any line was written): the lines reach it.
   */
  readonly found: boolean;
  /** Where the line with the head's hash is, when it is among the lines checked. */
  readonly file?: string;
  readonly line?: number;
}

/** A head as GET /v1/audit/head gives it: 64 hex digits, compared in lower case; undefined for anything else. */
export function parseHead(text: string): string | undefined {
  return /^[0-9a-fA-F]{64}$/.test(text) ? text.toLowerCase() : undefined;
}

/**
 * Check the hash chain of one or more files, in order (a rotated file continues the chain). The
 * chain must start at the genesis hash, so removing the first line is caught too; `partial` checks
 * a later segment whose first line follows lines not given here. Lines that are not JSON are
 * allowed only as torn lines: directly followed by a recovery line that carries their hash.
 * `head` (a hash from parseHead) is a head recorded outside the file: the result says whether the
 * lines reach it, which is what shows lines cut from the end.
 */
export async function verifyAudit(files: readonly string[], read: (file: string) => Promise<string>, options: { partial?: boolean; head?: string } = {}): Promise<VerifyResult> {
  let prev: string | undefined = options.partial ? undefined : GENESIS;
  const wanted = options.head;
  let head: HeadCheck | undefined = wanted === undefined ? undefined : { hash: wanted, found: prev === wanted };
  let count = 0;
  /** Consecutive lines that are not JSON, waiting for the recovery line that accounts for them. */
  let run: { file: string; line: number; text: string[] } | undefined;
  const torn: { file: string; line: number }[] = [];
  const lost: { file: string; line: number; lines: number }[] = [];
  const bad = (file: string, line: number, reason: string): VerifyResult => ({ ok: false, lines: count, firstBad: { file, line, reason }, ...(head ? { head } : {}) });
  for (const file of files) {
    const lines = (await read(file)).split('\n');
    if (lines.at(-1) === '') lines.pop();
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i]!;
      let parsed: Record<string, unknown>;
      try {
        parsed = JSON.parse(line) as Record<string, unknown>;
      } catch {
        if (run) run.text.push(line);
        else run = { file, line: i + 1, text: [line] };
        continue;
      }
      const recovery = parsed[AUDIT.kind] === 'recovery';
      if (run) {
        if (!recovery || parsed[AUDIT.tornSha256] !== lineHash(run.text.join('\n'))) return bad(run.file, run.line, 'not a JSON line');
        torn.push({ file: run.file, line: run.line });
        run = undefined;
      } else if (recovery && parsed[AUDIT.tornSha256] !== undefined) {
        return bad(file, i + 1, 'the torn line this recovery line accounts for is missing (removed)');
      }
      if (typeof parsed[AUDIT.prev] !== 'string') return bad(file, i + 1, 'no prev hash');
      if (prev !== undefined && parsed[AUDIT.prev] !== prev) {
        return bad(file, i + 1, count === 0 ? 'the chain does not start at the genesis hash (lines were removed from the start; use --partial for a later segment)' : 'prev hash does not match the line before (a line was edited, removed or reordered)');
      }
      const lostLines = parsed[AUDIT.lostLines];
      if (recovery && typeof lostLines === 'number' && lostLines > 0) lost.push({ file, line: i + 1, lines: lostLines });
      prev = lineHash(line);
      count++;
      if (head && !head.found) {
        if (prev === head.hash) head = { ...head, found: true, file, line: i + 1 };
        else if (parsed[AUDIT.prev] === head.hash) head = { ...head, found: true };
      }
    }
  }
  if (run) return bad(run.file, run.line, 'the last line is incomplete (not a whole JSON line: the writer stopped in the middle of it, or the file was cut short)');
  return { ok: true, lines: count, ...(torn.length > 0 ? { torn } : {}), ...(lost.length > 0 ? { lost } : {}), ...(head ? { head } : {}) };
}
