import { readdir, readFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { text } from 'node:stream/consumers';
import { UserError } from '../errors.ts';
import { verifyAudit } from '../observe/audit-read.ts';
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

/** `egress audit verify [FILE…]`: check the audit log's hash chain; exit 1 at the first bad line. `-` is standard input. */
export async function audit(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest, { partial: { type: 'boolean' } });
  if (sub !== 'verify') throw new UserError('usage: egress audit verify [--partial] [FILE…]', EXIT.usage);
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
  }, { partial: p.values.partial === true });
  if (result.ok) {
    // Torn lines and lines that never reached the file are part of an intact chain: the recovery
    // line after them accounts for them. They are named, so nobody takes the file for complete.
    const notes: string[] = [];
    if (result.torn?.length) notes.push(`${result.torn.map((t) => `${t.file}:${t.line}`).join(', ')}: cut short (a crash or a refused write), kept and accounted for by the recovery line after it`);
    for (const l of result.lost ?? []) notes.push(`${l.file}:${l.line}: records ${l.lines} line${l.lines === 1 ? '' : 's'} that never reached the file (a refused write)`);
    return ok(`audit chain intact: ${result.lines} line${result.lines === 1 ? '' : 's'}${notes.map((n) => `\n  ${n}`).join('')}`, result);
  }
  const bad = result.firstBad!;
  return fail(`audit chain broken at ${bad.file}:${bad.line}: ${bad.reason}`, result);
}
