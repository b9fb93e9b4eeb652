/**
 * A/B: `npm run bench:ab` — is this working tree cheaper per request than another revision?
 *
 * A change worth a few percent of CPU is lost in the machine's noise when two `npm run bench` runs are
 * compared (their rounds move by 15–20% on 2 shared cores). Here both proxies run at once, against
 * one upstream, from one load generator: A is egress-proxy at BENCH_AB_BASE (a git revision, HEAD by
 * default, checked out into a temporary worktree that uses this tree's node_modules), B is this
 * working tree, uncommitted changes included. Each round loads A and B in turn (the order swaps every
 * round), GET then a JSON POST, at saturation, and reads each proxy's CPU time per response from
 * /proc. The rounds are shared by BENCH_AB_PAIRS (2) pairs of processes started afresh, so that what
 * one process happens to be (its JIT's choices, where its memory landed) is not taken for A or B.
 * The verdict is per round: the median of B/A over the rounds, how many rounds B was the
 * cheaper, and a two-sided sign test on that count (p < 0.05: B differs from A beyond the noise).
 *
 * Settings (environment): BENCH_AB_BASE (HEAD), BENCH_ROUNDS (10), BENCH_AB_PAIRS (2), BENCH_DURATION (5 s a run),
 * BENCH_WARMUP (3 s a method a proxy), BENCH_CONNECTIONS (10), BENCH_BODY_BYTES (2048), BENCH_LOAD
 * (wrk or autocannon; wrk when on PATH). Writes bench/results/ab-<timestamp>.json; exits 1 on any load
 * error, non-2xx answer or request that reached the upstream without the injected secret.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { diffStats, jsonBody, median, numberSetting, readSettings, TOKEN_HEADER, type LoadJob, type LoadResult } from './common.ts';
import { loadProblems, settledStats, upstreamProblems } from './checks.ts';
import { BenchRun, clockTicksPerSecond, cpuTicks, forkChild, runCommand, runLoad, saturationGenerator, stopProcesses, waitReady } from './proc.ts';
import { BENCH_DIR, REPO_ROOT, startEgress, startUpstream, type EgressTarget } from './targets.ts';

const say = (line = '') => process.stdout.write(`${line}\n`);
const run = new BenchRun('A/B bench');

interface Side {
  readonly name: 'A' | 'B';
  readonly egress: EgressTarget;
}

interface Sample {
  readonly round: number;
  /** Which pair of processes ran it (1-based). */
  readonly pair: number;
  readonly method: 'GET' | 'POST';
  readonly side: 'A' | 'B';
  readonly rps: number;
  readonly cpuUsPerReq: number;
}

async function git(args: readonly string[]): Promise<string> {
  const result = await runCommand('git', args, { cwd: REPO_ROOT, timeoutMs: 60_000 });
  if (result.code !== 0) throw new Error(`git ${args.join(' ')} failed (exit ${result.code}): ${(result.stderr || result.stdout).trim()}`);
  return result.stdout.trim();
}

async function main(): Promise<number> {
  const settings = readSettings({ BENCH_ROUNDS: '10', ...process.env });
  const baseRev = process.env.BENCH_AB_BASE || 'HEAD';
  const baseSha = await git(['rev-parse', '--verify', `${baseRev}^{commit}`]).catch((err: Error) => {
    throw new Error(`BENCH_AB_BASE=${baseRev} is not a commit of this repository (${err.message})`);
  });
  const head = await git(['rev-parse', '--short', 'HEAD']);
  const dirty = (await git(['status', '--porcelain', '--untracked-files=no'])) !== '';
  const generator = saturationGenerator(settings.load);
  const ticksPerSecond = await clockTicksPerSecond();
  // BENCH_AB_PAIRS: how many fresh pairs of processes share the rounds.
  const pairs = Math.min(settings.rounds, Math.round(numberSetting(process.env, 'BENCH_AB_PAIRS', 2, 1, 100)));
  const budget = run.budget(300 + pairs * (60 + 4 * settings.warmupSec) + settings.rounds * 4 * (settings.durationSec + 10));

  const tmp = await run.makeTmp('egress-ab-');
  const worktree = join(tmp, 'base');
  await git(['worktree', 'add', '--detach', worktree, baseSha]);
  try {
    const lockChanged = (await git(['diff', '--name-only', baseSha, '--', 'package-lock.json'])) !== '';
    await runCommand('ln', ['-s', join(REPO_ROOT, 'node_modules'), join(worktree, 'node_modules')], { timeoutMs: 5000 });
    // The base's own bench code starts its proxy, so it runs exactly as that revision's `npm start` did.
    const baseTargets = (await import(join(worktree, 'bench', 'targets.ts'))) as typeof import('./targets.ts');
    const baseProc = (await import(join(worktree, 'bench', 'proc.ts'))) as typeof import('./proc.ts');
    if (typeof baseTargets.startEgress !== 'function' || typeof baseProc.stopAll !== 'function') {
      throw new Error(`${baseRev} (${baseSha.slice(0, 7)}) predates bench/targets.ts's startEgress: pick a later base`);
    }
    // Its children are in its own module's registry: stop them with ours.
    process.on('exit', () => baseProc.killAllSync());

    say('egress-proxy A/B');
    say(`A:        ${baseRev} (${baseSha.slice(0, 7)}), in a temporary worktree`);
    say(`B:        this working tree (${head}${dirty ? ', with uncommitted changes' : ''})`);
    if (lockChanged) say('note:     package-lock.json differs between A and B; both run with this tree\'s node_modules');
    say(`load:     ${settings.rounds} rounds; each: GET and ${settings.bodyBytes} B JSON POST, ${settings.durationSec} s per proxy, at saturation over ${settings.connections} keep-alive connections (${generator}); A and B in turn, the order swapped every round; ${pairs} pair(s) of processes, started afresh, share the rounds`);

    const load = forkChild('load generator', join(BENCH_DIR, 'load.ts'));
    await waitReady(load, 20_000);
    const upstream = await startUpstream(settings);
    /** A fresh pair of proxies (A and B), each in its own folder, with its own store and audit log. */
    const startPair = async (pair: number): Promise<Side[]> => {
      await mkdir(join(tmp, `a${pair}`));
      await mkdir(join(tmp, `b${pair}`));
      const pairSides: Side[] = [
        { name: 'A', egress: await baseTargets.startEgress(upstream, join(tmp, `a${pair}`)) as EgressTarget },
        { name: 'B', egress: await startEgress(upstream, join(tmp, `b${pair}`)) },
      ];
      say(`pair ${pair}: A pid ${pairSides[0]!.egress.process.pid}, B pid ${pairSides[1]!.egress.process.pid}`);
      return pairSides;
    };

    const body = jsonBody(settings.bodyBytes);
    const job = (side: Side, method: 'GET' | 'POST', durationSec: number): LoadJob => ({
      url: side.egress.url,
      method,
      headers: { [TOKEN_HEADER]: side.egress.token, ...(method === 'POST' ? { 'content-type': 'application/json' } : {}) },
      ...(method === 'POST' ? { body } : {}),
      connections: settings.connections,
      durationSec,
      timeoutSec: 10,
      generator,
    });
    const methods = ['GET', 'POST'] as const;
    const problems = (side: Side, method: string, result: LoadResult) => run.failures.push(...loadProblems(`${side.name} ${method}`, result));

    const upstreamBefore = await upstream.stats();
    const samples: Sample[] = [];
    let sides: Side[] = [];
    let pair = 0;
    for (let round = 1; round <= settings.rounds; round++) {
      // Each pair of processes takes an equal share of the rounds: what one process happens to be
      // (its JIT's choices, where its memory landed, the core it settles on) is not taken for A or B.
      const wanted = Math.floor(((round - 1) * pairs) / settings.rounds) + 1;
      if (wanted !== pair) {
        await stopProcesses(sides.flatMap((side) => side.egress.processes), 8000);
        pair = wanted;
        sides = await startPair(pair);
        if (settings.warmupSec > 0) {
          for (const side of sides) for (const method of methods) problems(side, `${method} warm-up`, await runLoad(load, job(side, method, settings.warmupSec)));
        }
      }
      const line: string[] = [];
      for (const method of methods) {
        const order = round % 2 === 1 ? sides : [...sides].reverse();
        const cpu: Record<string, number> = {};
        for (const side of order) {
          const pid = side.egress.process.pid;
          const ticks = cpuTicks(pid);
          const result = await runLoad(load, job(side, method, settings.durationSec));
          problems(side, method, result);
          const us = result.responses > 0 ? ((cpuTicks(pid) - ticks) / ticksPerSecond / result.responses) * 1e6 : Number.NaN;
          cpu[side.name] = us;
          samples.push({ round, pair, method, side: side.name, rps: result.responses / settings.durationSec, cpuUsPerReq: us });
        }
        line.push(`${method} A ${cpu.A!.toFixed(1)} B ${cpu.B!.toFixed(1)} µs/req (B/A ${(cpu.B! / cpu.A!).toFixed(3)})`);
      }
      say(`  round ${String(round).padStart(2)}: ${line.join('   ')}`);
    }
    await stopProcesses(sides.flatMap((side) => side.egress.processes), 8000);
    run.failures.push(...upstreamProblems('A and B', diffStats(await settledStats(upstream), upstreamBefore), true));

    say();
    say('method  A µs/req  B µs/req  B/A (median of rounds)  B cheaper  sign test p  A req/s  B req/s');
    const summary = methods.map((method) => {
      const of = (side: 'A' | 'B') => samples.filter((s) => s.method === method && s.side === side);
      const a = of('A');
      const b = of('B');
      const ratios = a.map((s, i) => b[i]!.cpuUsPerReq / s.cpuUsPerReq);
      const cheaper = ratios.filter((r) => r < 1).length;
      const p = signTest(cheaper, ratios.length);
      const row = {
        method,
        aCpuUsPerReq: median(a.map((s) => s.cpuUsPerReq)),
        bCpuUsPerReq: median(b.map((s) => s.cpuUsPerReq)),
        ratio: median(ratios),
        bCheaperRounds: cheaper,
        rounds: ratios.length,
        signTestP: p,
        aRps: median(a.map((s) => s.rps)),
        bRps: median(b.map((s) => s.rps)),
      };
      say(`${method.padEnd(6)}  ${row.aCpuUsPerReq.toFixed(1).padStart(8)}  ${row.bCpuUsPerReq.toFixed(1).padStart(8)}  ${row.ratio.toFixed(3).padStart(22)}  ${`${cheaper}/${ratios.length}`.padStart(9)}  ${p.toFixed(3).padStart(11)}  ${Math.round(row.aRps).toString().padStart(7)}  ${Math.round(row.bRps).toString().padStart(7)}`);
      return row;
    });
    say('B/A below 1: this tree spends less CPU per request than the base. With p >= 0.05 the rounds do not tell the two apart.');

    const resultsDir = join(BENCH_DIR, 'results');
    await mkdir(resultsDir, { recursive: true });
    const file = join(resultsDir, `ab-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
    await writeFile(file, `${JSON.stringify({ base: { revision: baseRev, sha: baseSha }, tree: { head, dirty }, settings, generator, summary, samples }, null, 2)}\n`);
    say(`results written to ${file}`);

    await run.shutdown();
    await baseProc.stopAll(8000);
  } finally {
    await runCommand('git', ['worktree', 'remove', '--force', worktree], { cwd: REPO_ROOT, timeoutMs: 60_000 }).catch(() => undefined);
    await runCommand('git', ['worktree', 'prune'], { cwd: REPO_ROOT, timeoutMs: 60_000 }).catch(() => undefined);
  }
  clearTimeout(budget);
  await run.removeTmp();
  for (const f of run.failures) say(`FAIL: ${f}`);
  return run.failures.length > 0 ? 1 : 0;
}

/** Two-sided sign test: the chance of a split at least this uneven in `n` fair coin tosses. */
export function signTest(successes: number, n: number): number {
  if (n === 0) return 1;
  const k = Math.min(successes, n - successes);
  let tail = 0;
  let c = 1;
  for (let i = 0; i <= k; i++) {
    tail += c;
    c = (c * (n - i)) / (i + 1);
  }
  return Math.min(1, (2 * tail) / 2 ** n);
}

await run.exit(main);
