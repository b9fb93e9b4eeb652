import { readdir, readFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { text } from 'node:stream/consumers';
import { UserError } from '../errors.ts';
import { parseHead, verifyAudit } from '../observe/audit-read.ts';
import { EXIT, fail, ok, parse, type Outcome } from './io.ts';

/** The audit log and its rotated files (audit.log.N … audit.log.1, audit.log), oldest first. */
async function withRotated(path: string): Promise<string[]> {
  const dir = dirname(path);
  const base = basename(path);
  const rotated = (await readdir(dir).catch(() => [] as string[]))
    .map((name) => ({ name, n: name.startsWith(`${base}.`) ? Number(name.slice(base.length + 1)) : Number.NaN }))
    .filter((f) => Number.isSafeInteger(f.n) && f.n > 0)
    .sort((a, b) => b.n - a.n)
    .map((f) => join(dir, f.name));
  return [...rotated, path];
}

const USAGE = 'usage: egress audit verify [--partial] [--head HASH] [FILE…]';

/**
 * `egress audit verify [--head HASH] [FILE…]`: check the audit log's hash chain; exit 1 at the
 * first bad line, or when the lines do not reach the head recorded from GET /v1/audit/head (lines
 * were cut from the end). `-` is standard input.
 */
export async function audit(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest, { partial: { type: 'boolean' }, head: { type: 'string' } });
  if (sub !== 'verify') throw new UserError(USAGE, EXIT.usage);
  const given = p.values.head;
  const head = typeof given === 'string' ? parseHead(given) : undefined;
  // Not repeated in the message: whatever was pasted there in its place is not shown again.
  if (typeof given === 'string' && head === undefined) throw new UserError(`--head takes the "hash" of GET /v1/audit/head: 64 hex digits (${USAGE})`, EXIT.usage);
  let files: string[];
  if (p.positionals.length > 0) {
    files = p.positionals.map((f) => (f === '-' ? '-' : resolve(f)));
  } else {
    const auditLog = p.settings().auditLog;
    // EGRESS_AUDIT_LOG=- sends the log to stdout: there is no file here to check.
    if (auditLog === '-') throw new UserError('EGRESS_AUDIT_LOG is "-" (stdout), so there is no file to verify: give the FILE, or "-" to read the lines from standard input', EXIT.usage);
    files = await withRotated(auditLog);
  }
  const result = await verifyAudit(files, async (file) => {
    try {
      return file === '-' ? await text(process.stdin) : await readFile(file, 'utf8');
    } catch (err) {
      throw new UserError(`cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
    }
  }, { partial: p.values.partial === true, ...(head !== undefined ? { head } : {}) });
  if (result.ok) {
    // Torn lines and lines that never reached the file are part of an intact chain: the recovery
    // line after them accounts for them. They are named, so nobody takes the file for complete.
    const notes: string[] = [];
    if (result.torn?.length) notes.push(`${result.torn.map((t) => `${t.file}:${t.line}`).join(', ')}: cut short (a crash or a refused write), kept and accounted for by the recovery line after it`);
    for (const l of result.lost ?? []) notes.push(`${l.file}:${l.line}: records ${l.lines} line${l.lines === 1 ? '' : 's'} that never reached the file (a refused write)`);
    const reached = result.head;
    if (reached && !reached.found) {
      // An intact chain that stops short of the head: what was after it is gone, and nothing in the file can show that.
      return fail(`audit log does not reach the recorded head ${reached.hash}: the chain is intact for ${result.lines} line${result.lines === 1 ? '' : 's'}, but none of them is that line (the file ends before it: lines were cut from the end), or its line is in a file not given here`, { ...result, ok: false });
    }
    if (reached) notes.push(reached.file === undefined ? 'the recorded head is where these lines begin' : `${reached.file}:${reached.line}: the recorded head`);
    return ok(`audit chain intact: ${result.lines} line${result.lines === 1 ? '' : 's'}${notes.map((n) => `\n  ${n}`).join('')}`, result);
  }
  const bad = result.firstBad!;
  return fail(`audit chain broken at ${bad.file}:${bad.line}: ${bad.reason}`, result);
}
