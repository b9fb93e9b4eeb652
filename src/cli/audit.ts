import { readdir, readFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { UserError } from '../errors.ts';
import { verifyAudit } from '../observe/audit.ts';
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

/** `egress audit verify [FILE…]`: check the audit log's hash chain; exit 1 at the first bad line. */
export async function audit(args: readonly string[]): Promise<Outcome> {
  const [sub, ...rest] = args;
  const p = parse(rest, { partial: { type: 'boolean' } });
  if (sub !== 'verify') throw new UserError('usage: egress audit verify [--partial] [FILE…]', EXIT.usage);
  const files = p.positionals.length > 0 ? p.positionals.map((f) => resolve(f)) : await withRotated(p.settings().auditLog);
  const result = await verifyAudit(files, async (file) => {
    try {
      return await readFile(file, 'utf8');
    } catch (err) {
      throw new UserError(`cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
    }
  }, { partial: p.values.partial === true });
  if (result.ok) return ok(`audit chain intact: ${result.lines} line${result.lines === 1 ? '' : 's'}`, result);
  const bad = result.firstBad!;
  return fail(`audit chain broken at ${bad.file}:${bad.line}: ${bad.reason}`, result);
}
