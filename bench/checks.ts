/**
 * Checks shared by the bench (bench/run.ts) and the soak (bench/soak.ts): what the upstream saw,
 * what the load generator got, and what each egress-proxy wrote to its audit log(s). Each returns
 * the problems it found; the caller decides they fail the run.
 */
import { createReadStream } from 'node:fs';
import { readdir, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { CLIENT_ID, sleep, type LoadResult, type UpstreamStats } from './common.ts';
import { httpRequest } from './http.ts';
import { runCommand } from './proc.ts';
import { REPO_ROOT, type EgressTarget, type Upstream } from './targets.ts';

/**
 * The upstream's counters once the requests still in flight through a target have landed (the load
 * generator stops with requests outstanding), so each request is counted for the target that sent it.
 */
export async function settledStats(upstream: Upstream): Promise<UpstreamStats> {
  let last = await upstream.stats();
  const deadline = Date.now() + 3000;
  for (;;) {
    await sleep(100);
    const now = await upstream.stats();
    if (now.requests === last.requests || Date.now() > deadline) return now;
    last = now;
  }
}

/** What the upstream must never see: a request without the injected credential, a leaked caller token, a damaged request. */
export function upstreamProblems(where: string, seen: UpstreamStats, egress: boolean): string[] {
  const out: string[] = [];
  if (seen.missingSecret > 0) out.push(`${where}: ${seen.missingSecret} request(s) reached the upstream WITHOUT the injected PLAID-SECRET (answered 401)`);
  if (seen.badClientId > 0) out.push(`${where}: ${seen.badClientId} request(s) reached the upstream without PLAID-CLIENT-ID: ${CLIENT_ID}`);
  if (egress && seen.tokenSeen > 0) out.push(`${where}: ${seen.tokenSeen} request(s) reached the upstream still carrying X-Egress-Token (the caller token leaked)`);
  if (seen.badBody > 0) out.push(`${where}: ${seen.badBody} POST body(ies) reached the upstream with the wrong size`);
  if (seen.wrongPath > 0) out.push(`${where}: ${seen.wrongPath} request(s) reached the upstream on the wrong path`);
  return out;
}

/** Errors, timeouts and non-2xx answers the load generator got; a run with no response at all. */
export function loadProblems(where: string, result: LoadResult): string[] {
  const out: string[] = [];
  if (result.errors > 0 || result.non2xx > 0) {
    const codes = Object.entries(result.statusCodes).filter(([c]) => !c.startsWith('2')).map(([c, n]) => `${n} x ${c}`).join(', ');
    out.push(`${where}: ${result.errors} error(s) (${result.timeouts} timeouts), ${result.non2xx} non-2xx response(s)${codes ? ` [${codes}]` : ''}`);
  }
  if (result.responses === 0) out.push(`${where}: no responses at all`);
  return out;
}

export interface AuditFileCheck {
  /** The audit log as configured; `files` are it and its rotated files, oldest first. */
  readonly auditLog: string;
  readonly files: readonly string[];
  readonly bytes: number;
  readonly lines: number;
  /** Lines for the bench route. */
  readonly bench: number;
  readonly verify: string;
}

export interface AuditCheck {
  /** Totals over every instance's audit log. */
  readonly lines: number;
  readonly bench: number;
  readonly byOutcome: Record<string, number>;
  /** One per instance (egress-x2 has two audit logs, one per process). */
  readonly instances: readonly AuditFileCheck[];
  readonly verify: string;
  readonly summary: string;
}

/**
 * Every request egress-proxy forwarded must have its audit line, and each audit log's hash chain
 * must verify. With several instances (egress-x2), each writes its own log: the lines are counted
 * across all of them, and each chain is verified on its own. Rotated files (audit.log.1, …) are
 * counted and verified with the current one. (A request whose caller went away mid-flight, as
 * autocannon's connections do when a run ends, also reached the upstream: its line is not an
 * 'allow'. Those are counted by reason.)
 */
export async function checkAudit(egress: EgressTarget, forwarded: UpstreamStats): Promise<{ check: AuditCheck; problems: string[] }> {
  const problems: string[] = [];
  const byOutcome: Record<string, number> = {};
  const instances: AuditFileCheck[] = [];
  for (const instance of egress.instances) {
    const files = await withRotated(instance.auditLog);
    let lines = 0;
    let bench = 0;
    let bytes = 0;
    for (const file of files) {
      try {
        bytes += (await stat(file)).size;
        for await (const line of createInterface({ input: createReadStream(file, { encoding: 'utf8' }), crlfDelay: Infinity })) {
          if (!line) continue;
          lines++;
          let key = 'unparsable';
          try {
            const entry = JSON.parse(line) as { decision?: string; reason?: string; route?: string | null; upstream_status?: number | null };
            if (entry.route === 'bench') bench++;
            key = `${entry.route ?? 'no route'} ${entry.decision}/${entry.reason}${entry.decision === 'allow' ? '' : ` (upstream status ${entry.upstream_status ?? 'none'})`}`;
          } catch {
            // counted as unparsable
          }
          byOutcome[key] = (byOutcome[key] ?? 0) + 1;
        }
      } catch (err) {
        problems.push(`${egress.label} audit log ${file}: cannot read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
      }
    }
    // `audit verify` reads whole files: allow it time in proportion to their size.
    const timeoutMs = 120_000 + Math.ceil(bytes / 100e6) * 60_000;
    const verify = await runCommand(process.execPath, ['bin/egress.js', 'audit', 'verify', ...files], { env: egress.env, cwd: REPO_ROOT, timeoutMs })
      .then((r) => {
        if (r.code !== 0) problems.push(`${egress.label}: egress audit verify ${instance.auditLog} exited ${r.code}: ${(r.stdout + r.stderr).trim()}`);
        return (r.stdout + r.stderr).trim();
      }, (err: Error) => {
        problems.push(`${egress.label}: egress audit verify ${instance.auditLog}: ${err.message}`);
        return err.message;
      });
    instances.push({ auditLog: instance.auditLog, files, bytes, lines, bench, verify });
  }
  const lines = instances.reduce((n, i) => n + i.lines, 0);
  const bench = instances.reduce((n, i) => n + i.bench, 0);
  if (bench < forwarded.requests) problems.push(`${egress.label} audit log${instances.length > 1 ? 's' : ''}: ${bench} lines for route bench, but the upstream received ${forwarded.requests} requests through ${egress.label}`);
  const outcomes = Object.entries(byOutcome).sort((a, b) => b[1] - a[1]).map(([k, n]) => `${n} ${k}`).join(', ');
  const verify = instances.map((i) => i.verify).join('; ');
  const split = instances.length > 1 ? ` (${instances.map((i, n) => `instance ${n + 1}: ${i.lines} lines in ${basename(i.auditLog)}`).join(', ')})` : '';
  const rotated = instances.some((i) => i.files.length > 1) ? `, ${instances.reduce((n, i) => n + i.files.length, 0)} files with the rotated ones` : '';
  return {
    check: { lines, bench, byOutcome, instances, verify, summary: `${lines} lines${split}${rotated} for ${forwarded.requests} requests the upstream received through ${egress.label}: ${outcomes}; \`egress audit verify\`: ${verify}` },
    problems,
  };
}

/** The audit log and its rotated files (audit.log.N … audit.log.1, audit.log), oldest first, as `egress audit verify` reads them. */
async function withRotated(path: string): Promise<string[]> {
  const base = basename(path);
  const rotated = (await readdir(dirname(path)).catch(() => [] as string[]))
    .map((name) => ({ name, n: name.startsWith(`${base}.`) ? Number(name.slice(base.length + 1)) : Number.NaN }))
    .filter((f) => Number.isSafeInteger(f.n) && f.n > 0)
    .sort((a, b) => b.n - a.n)
    .map((f) => join(dirname(path), f.name));
  return [...rotated, path];
}

/** One admin listener's /metrics, as series name (with labels) -> value. */
export async function scrapeMetrics(adminPort: number, timeoutMs = 5000): Promise<Map<string, number>> {
  const res = await httpRequest(`http://127.0.0.1:${adminPort}/metrics`, { timeoutMs });
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
  const out = new Map<string, number>();
  for (const line of res.body.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const space = line.lastIndexOf(' ');
    const value = Number(line.slice(space + 1));
    if (space > 0 && Number.isFinite(value)) out.set(line.slice(0, space), value);
  }
  return out;
}

/** A few series from each instance's /metrics, before shutdown, as one line. */
export async function egressMetrics(egress: EgressTarget): Promise<string | undefined> {
  const parts: string[] = [];
  for (const [n, instance] of egress.instances.entries()) {
    const prefix = egress.instances.length > 1 ? `instance ${n + 1}: ` : '';
    try {
      const res = await httpRequest(`http://127.0.0.1:${instance.adminPort}/metrics`, { timeoutMs: 5000 });
      const wanted = res.body.split('\n').filter((l) => /^(egress_requests_total|process_resident_memory_bytes|nodejs_eventloop_lag_p99_seconds|nodejs_heap_size_used_bytes)\b/.test(l));
      parts.push(prefix + (wanted.length ? wanted.join('; ') : `status ${res.status}, no matching series`));
    } catch (err) {
      parts.push(`${prefix}unavailable (${(err as Error).message})`);
    }
  }
  return parts.join(' | ');
}
