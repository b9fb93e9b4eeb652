/** Plain-text tables of the bench results. */
import { median, type LoadResult, type UpstreamStats } from './common.ts';
import type { Memory } from './proc.ts';
import type { TargetName } from './targets.ts';

export interface Scenario {
  readonly id: string;
  readonly label: string;
  readonly method: 'GET' | 'POST';
  /** Fixed offered load (req/s); saturation when absent. */
  readonly rate?: number;
}

export interface RunRecord {
  readonly round: number;
  readonly target: TargetName;
  readonly label: string;
  readonly scenario: string;
  readonly load: LoadResult;
  /** What the upstream saw during this run. */
  readonly upstream: UpstreamStats;
  /** The target's process tree right after the run. */
  readonly memory: Memory | undefined;
  readonly cpu: CpuUse;
  /** egress-redis only: redis-server's CPU during the run (not part of `cpu`). */
  readonly storeCpu?: { readonly usPerRequest: number; readonly pct: number };
}

export interface CpuUse {
  /** Wall time of the run as the orchestrator saw it, s. */
  readonly elapsedSec: number;
  /** CPU time of the target's process tree per response, microseconds (for direct: the upstream's). */
  readonly targetUsPerRequest: number;
  /** CPU time of the target's process tree during the run, as % of one CPU. */
  readonly targetPct: number;
  /** CPU used by processes outside the bench during the run (other work on the machine, steal), as % of one CPU. */
  readonly otherPct: number;
}

/**
 * One record per target x scenario: with several rounds, the median of req/s, latencies and CPU per
 * request, the sum of errors, the mean of the other load, the memory after the last round.
 */
export function combineRounds(runs: readonly RunRecord[]): RunRecord[] {
  const groups = new Map<string, RunRecord[]>();
  for (const run of runs) {
    const key = `${run.target}\u0000${run.scenario}`;
    const group = groups.get(key);
    if (group) group.push(run);
    else groups.set(key, [run]);
  }
  return [...groups.values()].map((group) => {
    if (group.length === 1) return group[0]!;
    const last = group[group.length - 1]!;
    const m = (pick: (r: RunRecord) => number) => median(group.map(pick));
    const sum = (pick: (r: RunRecord) => number) => group.reduce((acc, r) => acc + pick(r), 0);
    return {
      ...last,
      round: 0,
      load: {
        ...last.load,
        rps: m((r) => r.load.rps),
        responses: sum((r) => r.load.responses),
        latencyMs: { ...last.load.latencyMs, p50: m((r) => r.load.latencyMs.p50), p90: m((r) => r.load.latencyMs.p90), p99: m((r) => r.load.latencyMs.p99), p999: m((r) => r.load.latencyMs.p999) },
        errors: sum((r) => r.load.errors),
        timeouts: sum((r) => r.load.timeouts),
        non2xx: sum((r) => r.load.non2xx),
      },
      cpu: {
        elapsedSec: sum((r) => r.cpu.elapsedSec),
        targetUsPerRequest: m((r) => r.cpu.targetUsPerRequest),
        targetPct: m((r) => r.cpu.targetPct),
        otherPct: sum((r) => r.cpu.otherPct) / group.length,
      },
      ...(last.storeCpu ? { storeCpu: { usPerRequest: m((r) => r.storeCpu?.usPerRequest ?? Number.NaN), pct: m((r) => r.storeCpu?.pct ?? Number.NaN) } } : {}),
    };
  });
}

export function table(header: readonly string[], rows: readonly (readonly string[])[], rightAligned: ReadonlySet<number>): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]) => cells.map((c, i) => (rightAligned.has(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd();
  const rule = widths.map((w) => '-'.repeat(w)).join('  ');
  return [line(header), rule, ...rows.map(line)].join('\n');
}

export function ms(value: number): string {
  if (!Number.isFinite(value)) return '-';
  if (value < 10) return value.toFixed(3);
  if (value < 100) return value.toFixed(2);
  return value.toFixed(1);
}

export function rps(value: number): string {
  return Number.isFinite(value) ? Math.round(value).toString() : '-';
}

export function ratio(a: number, b: number | undefined): string {
  if (b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0) return '-';
  return `${(a / b).toFixed(2)}x`;
}

function find(runs: readonly RunRecord[], target: TargetName, scenario: string): RunRecord | undefined {
  return runs.find((r) => r.target === target && r.scenario === scenario);
}

/** One row per target x scenario, with ratios to the direct call. */
export function resultsTable(runs: readonly RunRecord[], scenarios: readonly Scenario[], targets: readonly TargetName[]): string {
  const header = ['scenario', 'target', 'req/s', 'p50 ms', 'p99 ms', 'errors', 'non-2xx', 'RSS MiB', 'CPU us/req', 'req/s:direct', 'p50:direct', 'p99:direct', 'other CPU'];
  const rows: string[][] = [];
  for (const scenario of scenarios) {
    const direct = find(runs, 'direct', scenario.id);
    for (const target of targets) {
      const run = find(runs, target, scenario.id);
      if (!run) continue;
      const l = run.load;
      rows.push([
        scenario.label,
        run.label,
        rps(l.rps),
        ms(l.latencyMs.p50),
        ms(l.latencyMs.p99),
        String(l.errors),
        String(l.non2xx),
        run.memory ? (run.memory.rssKb / 1024).toFixed(1) : '-',
        Number.isFinite(run.cpu.targetUsPerRequest) ? Math.round(run.cpu.targetUsPerRequest).toString() : '-',
        target === 'direct' ? '' : ratio(l.rps, direct?.load.rps),
        target === 'direct' ? '' : ratio(l.latencyMs.p50, direct?.load.latencyMs.p50),
        target === 'direct' ? '' : ratio(l.latencyMs.p99, direct?.load.latencyMs.p99),
        `${Math.round(run.cpu.otherPct)}%`,
      ]);
    }
  }
  return table(header, rows, new Set([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]));
}

/**
 * egress-proxy against each other target, scenario by scenario (egress value / other value); then
 * egress-redis and egress-x2 against egress-proxy with the file store (their value / file-store value).
 */
export function egressTable(runs: readonly RunRecord[], scenarios: readonly Scenario[], targets: readonly TargetName[]): string {
  const header = ['scenario', 'compared', 'req/s', 'p50', 'p99', 'CPU/req', 'added p50 ms', 'added p99 ms'];
  const rows: string[][] = [];
  const row = (scenario: Scenario, first: RunRecord, other: RunRecord, cpu: boolean) => rows.push([
    scenario.label,
    `${first.label} vs ${other.target === 'egress' ? 'egress-proxy (file)' : other.label}`,
    ratio(first.load.rps, other.load.rps),
    ratio(first.load.latencyMs.p50, other.load.latencyMs.p50),
    ratio(first.load.latencyMs.p99, other.load.latencyMs.p99),
    cpu ? ratio(first.cpu.targetUsPerRequest, other.cpu.targetUsPerRequest) : '',
    signed(first.load.latencyMs.p50 - other.load.latencyMs.p50),
    signed(first.load.latencyMs.p99 - other.load.latencyMs.p99),
  ]);
  for (const scenario of scenarios) {
    const egress = find(runs, 'egress', scenario.id);
    if (egress) {
      for (const target of targets) {
        if (target === 'egress' || target === 'egress-redis' || target === 'egress-x2') continue;
        const other = find(runs, target, scenario.id);
        if (other) row(scenario, egress, other, target !== 'direct');
      }
    }
    const viaRedis = find(runs, 'egress-redis', scenario.id);
    if (viaRedis && egress) row(scenario, viaRedis, egress, true);
    const two = find(runs, 'egress-x2', scenario.id);
    if (two && egress) row(scenario, two, egress, true);
  }
  return table(header, rows, new Set([2, 3, 4, 5, 6, 7]));
}

/** redis-server's CPU during each egress-redis run. */
export function storeCpuTable(runs: readonly RunRecord[], scenarios: readonly Scenario[]): string {
  const rows: string[][] = [];
  for (const scenario of scenarios) {
    const run = find(runs, 'egress-redis', scenario.id);
    if (!run?.storeCpu) continue;
    const total = run.cpu.targetUsPerRequest + run.storeCpu.usPerRequest;
    const file = find(runs, 'egress', scenario.id);
    rows.push([
      scenario.label,
      Number.isFinite(run.storeCpu.usPerRequest) ? Math.round(run.storeCpu.usPerRequest).toString() : '-',
      `${Math.round(run.storeCpu.pct)}%`,
      Number.isFinite(total) ? Math.round(total).toString() : '-',
      file ? ratio(total, file.cpu.targetUsPerRequest) : '-',
    ]);
  }
  return table(['scenario', 'redis-server us/req', 'redis-server % of a CPU', 'proxy + redis us/req', 'proxy + redis : egress-proxy (file)'], rows, new Set([1, 2, 3, 4]));
}

function signed(value: number): string {
  if (!Number.isFinite(value)) return '-';
  return `${value >= 0 ? '+' : '-'}${ms(Math.abs(value))}`;
}
