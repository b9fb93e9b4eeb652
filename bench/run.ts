/**
 * egress-proxy benchmark: `npm run bench`.
 *
 * One run measures, against the same upstream and with the same load generator:
 *   direct (the limit), egress-proxy with a file store, egress-proxy with a Redis store (egress-redis,
 *   on a private redis-server the bench starts and stops), a bare undici proxy (the floor),
 *   http-proxy-3 and nginx,
 * each with a GET and a JSON POST, at saturation and at a fixed low rate. Prints a table with the
 * ratios, writes the numbers to bench/results/<timestamp>.json, exits 1 if a check failed.
 *
 * Settings (environment): BENCH_DURATION (s per scenario, default 5), BENCH_QUICK=1 (1 s runs),
 * BENCH_WARMUP (s per method per target, default 3), BENCH_CONNECTIONS (10), BENCH_RATE (fixed rate, 2000 req/s),
 * BENCH_BODY_BYTES (2048), BENCH_ROUNDS (1; more rounds, median shown), BENCH_LOAD (the load
 * generator, saturation and fixed rate: wrk or autocannon; default wrk when it is on PATH, else autocannon), BENCH_TARGETS (comma list of direct,egress,egress-redis,bare,hp3,nginx,
 * and the opt-in egress-x2: two egress-proxy processes on one port with EGRESS_REUSE_PORT=1, CPU and RSS summed,
 * and min: node:http + undici dispatch and nothing else, the least a Node proxy on this stack costs),
 * BENCH_KEEP_TMP=1 (keep the temp folder: route file, store, audit log, nginx config),
 * BENCH_EGRESS_NODE_ARGS (extra Node flags for every egress-proxy target, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof").
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import {
  CLIENT_ID, SECRET, TOKEN_HEADER, diffStats, emptyStats, jsonBody, readSettings,
  type BenchSettings, type LoadJob, type LoadResult, type UpstreamStats,
} from './common.ts';
import { environment, type Environment } from './environment.ts';
import { checkAudit, egressMetrics, loadProblems, settledStats, upstreamProblems, type AuditCheck } from './checks.ts';
import { httpRequest } from './http.ts';
import { BenchRun, benchTicks, clockTicksPerSecond, cpuTicks, forkChild, indent, machineBusyTicks, memoryOf, portClosed, runCommand, runLoad, saturationGenerator, waitReady } from './proc.ts';
import { combineRounds, egressTable, resultsTable, storeCpuTable, type CpuUse, type RunRecord, type Scenario } from './report.ts';
import {
  BENCH_DIR, DEFAULT_TARGETS, LABELS, TARGET_NAMES, directTarget, startEgress, startNginx, startNodeProxy, startRedis, startUpstream,
  type EgressTarget, type RedisServer, type Target, type TargetName,
} from './targets.ts';

const say = (line = '') => process.stdout.write(`${line}\n`);

/** Problems that make the run fail (exit 1), and notes that do not. */
const run = new BenchRun('bench');
const { failures } = run;
const notes: string[] = [];

interface Client {
  readonly target: Target;
  readonly headers: Record<string, string>;
}

async function main(): Promise<number> {
  const settings = readSettings(process.env);
  const started = new Date();
  const targetNames = TARGET_NAMES.filter((n) => (settings.targets ? settings.targets.includes(n) : DEFAULT_TARGETS.includes(n)));
  if (settings.targets) {
    const unknown = settings.targets.filter((n) => !(TARGET_NAMES as readonly string[]).includes(n));
    if (unknown.length) throw new Error(`BENCH_TARGETS: unknown target(s) ${unknown.join(', ')}; known: ${TARGET_NAMES.join(', ')}`);
  }
  const scenarios: Scenario[] = [
    { id: 'get-max', label: 'GET max', method: 'GET' },
    { id: 'post-max', label: `POST ${kb(settings.bodyBytes)} max`, method: 'POST' },
    { id: 'get-rate', label: `GET @${settings.rate}/s`, method: 'GET', rate: settings.rate },
    { id: 'post-rate', label: `POST ${kb(settings.bodyBytes)} @${settings.rate}/s`, method: 'POST', rate: settings.rate },
  ];

  // Everything is bounded: startup, each run, shutdown; and the whole bench.
  const perTargetSec = 2 * settings.warmupSec + settings.rounds * scenarios.length * (settings.durationSec + 6) + 5;
  const budgetSec = 180 + 2 * targetNames.length * perTargetSec;
  const budget = run.budget(budgetSec);

  const env = await environment();
  // wrk when it is there (both saturation and fixed rate); else autocannon, paced at fixed rate.
  const generator = saturationGenerator(settings.load);
  const wrkVersion = generator === 'wrk' ? await runCommand('wrk', ['-v'], { timeoutMs: 5000 }).then((r) => /wrk (\S+)/.exec(r.stdout + r.stderr)?.[1] ?? 'unknown', () => 'unknown') : undefined;
  ticksPerSecond = await clockTicksPerSecond();
  printHeader(env, settings, budgetSec);
  say(`targets:   ${targetNames.join(', ')}${settings.targets ? '' : ` (the default; opt-in: ${TARGET_NAMES.filter((n) => !DEFAULT_TARGETS.includes(n)).join(', ')}, with BENCH_TARGETS)`}`);

  const tmpRoot = await run.makeTmp('egress-bench-');
  const body = jsonBody(settings.bodyBytes);

  const load = forkChild('load generator', join(BENCH_DIR, 'load.ts'));
  await waitReady(load, 20_000);
  const upstream = await startUpstream(settings);

  // Start every target first (all idle while another one is measured), then measure.
  const targets: Target[] = [];
  const egresses: EgressTarget[] = [];
  let redis: RedisServer | undefined;
  let nginxVersion: string | undefined;
  for (const name of targetNames) {
    if (name === 'direct') targets.push(directTarget(upstream));
    if (name === 'egress') {
      const started = await startEgress(upstream, tmpRoot);
      egresses.push(started);
      targets.push(started);
    }
    if (name === 'egress-redis') {
      const server = await startRedis(tmpRoot);
      if ('skipped' in server) {
        say(`egress-redis: ${server.skipped}`);
        notes.push(server.skipped);
      } else {
        redis = server;
        const started = await startEgress(upstream, tmpRoot, { redis });
        egresses.push(started);
        targets.push(started);
      }
    }
    if (name === 'egress-x2') {
      const started = await startEgress(upstream, tmpRoot, { instances: 2 });
      egresses.push(started);
      targets.push(started);
    }
    if (name === 'bare' || name === 'min' || name === 'hp3') targets.push(await startNodeProxy(name, upstream));
    if (name === 'nginx') {
      const started = await startNginx(upstream, tmpRoot);
      if ('skipped' in started) {
        say(`nginx:     ${started.skipped}`);
        notes.push(started.skipped);
      } else {
        targets.push(started.target);
        nginxVersion = started.version;
      }
    }
  }
  const token = egresses[0]?.token ?? `egt_${'x'.repeat(43)}`;
  const clients = targets.map((target): Client => ({
    target,
    // The direct call sends the credential itself, so the upstream treats every request alike. Every
    // proxy gets a caller token header (the bare ones pass it on; each egress-proxy checks and strips
    // the token its own store issued).
    headers: target.name === 'direct' ? { 'plaid-client-id': CLIENT_ID, 'plaid-secret': SECRET } as Record<string, string> : { [TOKEN_HEADER]: egresses.find((e) => e.name === target.name)?.token ?? token },
  }));

  say();
  say('targets (each its own process; the upstream is shared):');
  for (const { target } of clients) say(`  ${target.label.padEnd(13)} pid ${target.processes.map((p) => p.pid).join('+').padEnd(7)} ${target.description}`);
  say(`  ${'upstream'.padEnd(13)} pid ${String(upstream.process.pid).padEnd(7)} node:http on ${upstream.origin}, 200 + small JSON only with the injected PLAID-SECRET, else 401 (counted)`);
  if (redis) say(`  ${'redis-server'.padEnd(13)} pid ${String(redis.process.pid).padEnd(7)} redis-server ${redis.version} on 127.0.0.1:${redis.port} for egress-redis (--save '' --appendonly no), stopped after the proxies`);
  say(`  ${'load'.padEnd(13)} pid ${String(load.pid).padEnd(7)} ${generator === 'wrk' ? `wrk ${wrkVersion} (one thread, bench/wrk.lua)` : `autocannon ${env.versions.autocannon} (programmatic; wrk is not on PATH, or BENCH_LOAD=autocannon)`}; keep-alive connections, pipelining 1, in its own process`);
  say();

  const totals = new Map<TargetName, UpstreamStats>(clients.map((c) => [c.target.name, emptyStats()]));
  const account = (name: TargetName, delta: UpstreamStats) => {
    const total = totals.get(name)!;
    for (const key of Object.keys(total) as (keyof UpstreamStats)[]) total[key] += delta[key];
  };

  // Smoke: one GET and one POST per target must come back 200 before any load.
  for (const { target, headers } of clients) {
    const before = await upstream.stats();
    for (const method of ['GET', 'POST'] as const) {
      const res = await httpRequest(target.url, { method, headers: method === 'POST' ? { ...headers, 'content-type': 'application/json' } : headers, ...(method === 'POST' ? { body } : {}) });
      if (res.status !== 200) throw new Error(`${target.label}: smoke ${method} ${target.url} answered ${res.status}: ${res.body.slice(0, 500)}`);
    }
    account(target.name, diffStats(await settledStats(upstream), before));
  }

  const job = (client: Client, method: 'GET' | 'POST', durationSec: number, rate?: number): LoadJob => ({
    url: client.target.url,
    method,
    headers: method === 'POST' ? { ...client.headers, 'content-type': 'application/json' } : client.headers,
    ...(method === 'POST' ? { body } : {}),
    connections: rate ? settings.rateConnections : settings.connections,
    durationSec,
    timeoutSec: 10,
    generator,
    ...(rate ? { overallRate: rate } : {}),
  });

  // Warm-up (not recorded): JIT, connection pools, allocator.
  if (settings.warmupSec > 0) {
    say(`warm-up: ${settings.warmupSec} s GET + ${settings.warmupSec} s POST per target, at saturation (not recorded)`);
    for (const client of clients) {
      const before = await upstream.stats();
      await runLoad(load, job(client, 'GET', settings.warmupSec));
      await runLoad(load, job(client, 'POST', settings.warmupSec));
      account(client.target.name, diffStats(await settledStats(upstream), before));
    }
  }

  // Measured runs: scenario by scenario, every target in turn, so that what is compared ran close in time.
  const runs: RunRecord[] = [];
  const count = settings.rounds * scenarios.length * clients.length;
  say(`measuring: ${count} runs of ${settings.durationSec} s${settings.rounds > 1 ? ` (${settings.rounds} rounds; the tables show the median)` : ''}`);
  for (let round = 1; round <= settings.rounds; round++) for (const scenario of scenarios) {
    for (const client of clients) {
      const { target } = client;
      const before = await upstream.stats();
      // egress-redis: redis-server's CPU is measured on its own (the target's CPU is the proxy's only).
      const store = target.name === 'egress-redis' && redis ? redis.process : undefined;
      const storeBefore = store ? { at: performance.now(), ticks: cpuTicks(store.pid) } : undefined;
      const cpuBefore = cpuSnapshot(target);
      const result = await runLoad(load, job(client, scenario.method, settings.durationSec, scenario.rate));
      const cpu = cpuSince(cpuBefore, target, result.responses);
      const storeCpu = store && storeBefore ? storeCpuSince(storeBefore, store.pid, result.responses) : undefined;
      const seen = diffStats(await settledStats(upstream), before);
      account(target.name, seen);
      const mem = memoryOf(target.processes.map((p) => p.pid));
      runs.push({ round, target: target.name, label: target.label, scenario: scenario.id, load: result, upstream: seen, memory: mem, cpu, ...(storeCpu ? { storeCpu } : {}) });
      say(`  [${String(runs.length).padStart(String(count).length)}/${count}] ${scenario.label.padEnd(18)} ${target.label.padEnd(13)} ${Math.round(result.rps).toString().padStart(6)} req/s  p50 ${result.latencyMs.p50.toFixed(3)} ms  p99 ${result.latencyMs.p99.toFixed(3)} ms  errors ${result.errors}  non-2xx ${result.non2xx}  RSS ${mem ? (mem.rssKb / 1024).toFixed(1) : '-'} MiB  CPU ${Math.round(cpu.targetUsPerRequest)} us/req${storeCpu ? ` (+ redis-server ${Math.round(storeCpu.usPerRequest)} us/req)` : ''}  other load ${Math.round(cpu.otherPct)}% of a CPU`);
      checkRun(target, scenario, result, seen);
    }
  }

  // Shut everything down (redis-server last), then look at what each egress-proxy left behind.
  const metrics = new Map<TargetName, string | undefined>();
  for (const egress of egresses) metrics.set(egress.name, await egressMetrics(egress));
  const killed = await run.shutdown();
  for (const k of killed) failures.push(`had to SIGKILL ${k}: it did not stop on its signal within 8 s`);
  const audits = new Map<TargetName, AuditCheck>();
  for (const egress of egresses) {
    for (const { process: proc } of egress.instances) {
      if (proc.exited) {
        const { code, signal } = await proc.exit;
        if (code !== 0) failures.push(`${proc.name} exited with ${signal ?? `code ${code}`} on SIGTERM (expected 0); last output:\n${indent(proc.output().slice(-4000))}`);
      }
      if (proc.lines() > 0) {
        notes.push(`${proc.name} wrote ${proc.lines()} log line(s) at level warn or above; last:\n${indent(proc.output().slice(-3000))}`);
      }
    }
    const { check, problems } = await checkAudit(egress, totals.get(egress.name)!);
    audits.set(egress.name, check);
    failures.push(...problems);
  }
  if (redis && redis.process.exited) {
    const { code, signal } = await redis.process.exit;
    if (code !== 0) failures.push(`redis-server exited with ${signal ?? `code ${code}`} on SIGTERM (expected 0); last output:\n${indent(redis.process.output().slice(-4000))}`);
  }
  const ports = [upstream.port, ...targets.flatMap((t) => t.ports), ...(redis ? [redis.port] : [])];
  const open: number[] = [];
  for (const port of new Set(ports)) if (!(await portClosed(port))) open.push(port);
  if (open.length) failures.push(`still listening after shutdown: 127.0.0.1:${open.join(', 127.0.0.1:')}`);
  await run.removeTmp();
  clearTimeout(budget);

  // Report.
  const present = clients.map((c) => c.target.name);
  say();
  say(`results (${settings.durationSec} s per run${settings.rounds > 1 ? `, median of ${settings.rounds} rounds` : ''}; p50/p99 over every response; RSS = VmRSS of the target's process tree (egress x2: both trees, summed) after the run; CPU us/req = the target's process tree CPU time per response (egress x2: both); other CPU = CPU used during the run by processes outside the bench, % of one CPU)`);
  const combined = combineRounds(runs);
  say(resultsTable(combined, scenarios, present));
  if (present.includes('egress-redis')) {
    say();
    say('redis-server CPU during the egress-redis runs (not in egress-redis\'s CPU us/req above; the proxy + its store together is the sum)');
    say(storeCpuTable(combined, scenarios));
  }
  if (present.includes('egress') || present.includes('egress-redis') || present.includes('egress-x2')) {
    say();
    say('egress-proxy relative to the others, same run (ratio = first / second; req/s: higher is better; p50, p99, CPU/req: lower is better; added = first minus second)');
    if (present.includes('egress-redis')) say('the egress-redis rows: the same proxy with a Redis store (EGRESS_STORE=redis://…, rate limits: one script call per route on the way at a time, with every check that arrived meanwhile) relative to the file store; CPU/req is the proxy process only');
    if (present.includes('egress-x2')) say('the egress x2 rows: two proxy processes sharing the port (EGRESS_REUSE_PORT=1) relative to one; CPU/req is both processes together');
    say(egressTable(combined, scenarios, present));
  }
  say();
  say(`saturation runs: ${settings.connections} keep-alive connections, each sending its next request as soon as the previous response arrives (${generator === 'wrk' ? 'wrk' : 'autocannon'}).`);
  say(`fixed-rate runs: ${settings.rate} req/s offered over ${settings.rateConnections} keep-alive connections, ${generator === 'wrk' ? 'one request every 1/rate s across them (bench/wrk.lua\'s delay(): each request takes the next slot of one schedule, sent within 1 ms of it)' : 'each connection\'s quota spread evenly over the second (autocannon alone sends it as a burst at the top of each second)'}; a target that cannot keep up gets less (see notes).`);
  say('all processes share the machine\'s CPUs: the load generator, the upstream and the target compete for them, so saturation numbers are bounded by that contention, for every target alike.');
  for (const egress of egresses) {
    const audit = audits.get(egress.name);
    if (audit) say(`${egress.label} audit log: ${audit.summary}`);
    const m = metrics.get(egress.name);
    if (m) say(`${egress.label} /metrics: ${m}`);
  }
  say(`load average at the end: ${loadavg().map((n) => n.toFixed(2)).join(' ')} (at the start: ${env.loadavg.join(' ')})`);
  say(`upstream header checks: ${[...totals].map(([name, s]) => `${LABELS[name]} ${s.requests} requests, ${s.missingSecret} without the secret`).join('; ')}`);

  const out = {
    started: started.toISOString(),
    environment: { ...env, nginx: nginxVersion ?? null, loadGenerator: { saturation: generator, wrk: wrkVersion ?? null } },
    settings,
    scenarios,
    targets: clients.map(({ target }) => ({ name: target.name, label: target.label, description: target.description, pid: target.process.pid, pids: target.processes.map((p) => p.pid) })),
    runs,
    combined: settings.rounds > 1 ? combined : undefined,
    upstreamTotals: Object.fromEntries(totals),
    egress: Object.fromEntries(egresses.map((e) => [e.name, { pids: e.instances.map((i) => i.process.pid), audit: audits.get(e.name) ?? null, metrics: metrics.get(e.name) ?? null, logLines: e.instances.reduce((n, i) => n + i.process.lines(), 0) }])),
    redis: redis ? { version: redis.version, port: redis.port, pid: redis.process.pid } : null,
    failures,
    notes,
  };
  const resultsDir = join(BENCH_DIR, 'results');
  await mkdir(resultsDir, { recursive: true });
  const file = join(resultsDir, `${started.toISOString().replace(/[:.]/g, '-')}.json`);
  await writeFile(file, `${JSON.stringify(out, null, 2)}\n`);
  say(`results written to ${file}`);

  for (const note of notes) say(`note: ${note}`);
  if (failures.length) {
    say();
    say(`BENCH FAILED: ${failures.length} problem(s)`);
    for (const f of failures) say(`  FAIL: ${f}`);
    return 1;
  }
  say('all checks passed');
  return 0;
}

let ticksPerSecond = 100;

/** CPU of a helper process (egress-redis's redis-server) per response of the run, and as % of one CPU. */
function storeCpuSince(before: { at: number; ticks: number }, pid: number, responses: number): { usPerRequest: number; pct: number } {
  const sec = (cpuTicks(pid) - before.ticks) / ticksPerSecond;
  const elapsed = (performance.now() - before.at) / 1000;
  return { usPerRequest: responses > 0 ? (sec * 1e6) / responses : Number.NaN, pct: (sec / elapsed) * 100 };
}

interface CpuSnapshot {
  readonly at: number;
  readonly target: number;
  readonly bench: number;
  readonly machine: number;
}

/** Own CPU of the orchestrator in clock ticks (it is a bench process too, though an idle one). */
function selfTicks(): number {
  const { user, system } = process.cpuUsage();
  return ((user + system) / 1e6) * ticksPerSecond;
}

function cpuSnapshot(target: Target): CpuSnapshot {
  return { at: performance.now(), target: target.processes.reduce((n, p) => n + cpuTicks(p.pid), 0), bench: benchTicks() + selfTicks(), machine: machineBusyTicks() };
}

function cpuSince(before: CpuSnapshot, target: Target, responses: number): CpuUse {
  const after = cpuSnapshot(target);
  const elapsedSec = (after.at - before.at) / 1000;
  const targetSec = (after.target - before.target) / ticksPerSecond;
  const otherSec = Math.max(0, (after.machine - before.machine) - (after.bench - before.bench)) / ticksPerSecond;
  return {
    elapsedSec,
    targetUsPerRequest: responses > 0 ? (targetSec * 1e6) / responses : Number.NaN,
    targetPct: (targetSec / elapsedSec) * 100,
    otherPct: (otherSec / elapsedSec) * 100,
  };
}

function checkRun(target: Target, scenario: Scenario, result: LoadResult, seen: UpstreamStats): void {
  const where = `${target.label}, ${scenario.label}`;
  failures.push(...upstreamProblems(where, seen, target.name.startsWith('egress')), ...loadProblems(where, result));
  if (scenario.rate && result.rps < scenario.rate * 0.9) notes.push(`${where}: achieved ${Math.round(result.rps)} req/s of the ${scenario.rate} offered`);
}

function printHeader(env: Environment, settings: BenchSettings, budgetSec: number): void {
  say('egress-proxy benchmark');
  say(`command:   ${env.command}`);
  say(`node:      ${env.node} (v8 ${env.v8}) at ${env.execPath}`);
  say(`cpus:      ${env.cpuCount} x ${env.cpuModel} (available parallelism ${env.availableParallelism}), ${env.platform}, load average at start ${env.loadavg.join(' ')}`);
  say(`code:      ${env.git}; autocannon ${env.versions.autocannon}, undici ${env.versions.undici}, http-proxy-3 ${env.versions['http-proxy-3']}`);
  say(`settings:  ${settings.durationSec} s per run${settings.quick ? ' (BENCH_QUICK)' : ''}, warm-up ${settings.warmupSec} s per method per target, ${settings.connections} connections at saturation, fixed rate ${settings.rate} req/s over ${settings.rateConnections} connections, POST body ${settings.bodyBytes} B JSON; whole bench bounded to ${budgetSec} s`);
  say(`processes: load generator, upstream and every target each run in their own process; with ${env.availableParallelism} cores, load generator + upstream + target share them${env.availableParallelism <= 2 ? ' (the load generator takes a large share: read ratios, not absolute numbers)' : ''}`);
}

function kb(bytes: number): string {
  return bytes % 1024 === 0 ? `${bytes / 1024}KB` : `${bytes}B`;
}

await run.exit(main);
