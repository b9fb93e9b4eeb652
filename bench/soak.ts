/**
 * egress-proxy soak: `npm run bench:soak`.
 *
 * Starts the upstream and egress-proxy exactly as the bench does (bench/targets.ts: CLI setup, route
 * file, `egress serve` with the file store), drives it for BENCH_SOAK_MINUTES with the bench's load
 * generator (bench/load.ts, its own process) at saturation, or at a fixed rate when BENCH_RATE is
 * set, and every BENCH_SOAK_SAMPLE_SECONDS samples the proxy's resident memory (VmRSS of its process
 * tree, from /proc) and its admin /metrics (heap used, heap spaces, process_resident_memory_bytes,
 * event-loop lag). The first BENCH_SOAK_WARMUP_MINUTES are warm-up (JIT, heap growth, pools); over
 * the rest it reports min/median/max RSS, the least-squares slope of RSS (MiB per minute), heap used
 * at the start and end, throughput per minute and errors, writes bench/results/soak-<timestamp>.json,
 * and gives a verdict:
 *
 *   flat  when the steady-state RSS slope is below BENCH_SOAK_MAX_SLOPE MiB/min (0.5) and max - min
 *         is within BENCH_SOAK_MAX_SPREAD of the median (0.10, i.e. 10%), and nothing failed;
 *   exit 1 otherwise, or on any load error or non-2xx answer, any request that reached the upstream
 *         without the injected secret (or with the caller token), a missing audit line or a broken
 *         audit chain, or the proxy exiting on its own or uncleanly.
 *
 * The load runs in chunks of 30 s (GET and POST alternately, BENCH_SOAK_METHOD=mixed; or only GET or
 * POST), each on fresh keep-alive connections, so each minute's throughput and errors are known.
 *
 * Settings (environment): BENCH_SOAK_MINUTES (10), BENCH_SOAK_WARMUP_MINUTES (2), BENCH_SOAK_SAMPLE_SECONDS (10),
 * BENCH_SOAK_METHOD (mixed), BENCH_SOAK_MAX_SLOPE (0.5), BENCH_SOAK_MAX_SPREAD (0.10), BENCH_CONNECTIONS (10),
 * BENCH_RATE (unset: saturation), BENCH_BODY_BYTES (2048), BENCH_KEEP_TMP=1, BENCH_EGRESS_NODE_ARGS.
 *
 * Every wait is bounded (each load chunk, each scrape, start-up and shutdown, and the whole soak);
 * every child process is stopped on every exit path (success, failure, the overall deadline,
 * SIGINT/SIGTERM/SIGHUP, and process exit).
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { TOKEN_HEADER, diffStats, jsonBody, median, numberSetting, readSettings, sleep, type LoadJob, type LoadResult, type UpstreamStats } from './common.ts';
import { checkAudit, loadProblems, scrapeMetrics, settledStats, upstreamProblems, type AuditCheck } from './checks.ts';
import { environment } from './environment.ts';
import { httpRequest } from './http.ts';
import { BenchRun, clockTicksPerSecond, cpuTicks, forkChild, indent, memoryOf, portClosed, runLoad, waitReady } from './proc.ts';
import { table } from './report.ts';
import { BENCH_DIR, startEgress, startUpstream, type EgressTarget } from './targets.ts';

const say = (line = '') => process.stdout.write(`${line}\n`);

const run = new BenchRun('soak');
const { failures } = run;
const notes: string[] = [];

/** Each load chunk lasts this long (the last one less): per-chunk errors and throughput, GET/POST alternating. */
const CHUNK_SEC = 30;
/** The audit log rotates at its default size (100mb); keep every rotated file so each line can be counted and the whole chain verified. */
const AUDIT_KEEP = '1000';

interface SoakSettings {
  readonly minutes: number;
  readonly warmupMinutes: number;
  readonly sampleSec: number;
  readonly method: 'mixed' | 'GET' | 'POST';
  /** MiB per minute. */
  readonly maxSlope: number;
  /** Fraction of the median RSS. */
  readonly maxSpread: number;
  /** Fixed offered rate (req/s) when BENCH_RATE is set; saturation otherwise. */
  readonly rate: number | undefined;
  readonly connections: number;
  readonly bodyBytes: number;
}

function readSoakSettings(env: NodeJS.ProcessEnv): SoakSettings {
  const bench = readSettings(env);
  const num = (name: string, fallback: number, min: number, max: number) => numberSetting(env, name, fallback, min, max);
  const minutes = num('BENCH_SOAK_MINUTES', 10, 0.1, 24 * 60);
  const warmupMinutes = num('BENCH_SOAK_WARMUP_MINUTES', Math.min(2, minutes / 2), 0, 24 * 60);
  if (warmupMinutes >= minutes) throw new Error(`BENCH_SOAK_WARMUP_MINUTES (${warmupMinutes}) must be less than BENCH_SOAK_MINUTES (${minutes})`);
  const method = (env.BENCH_SOAK_METHOD ?? 'mixed').toUpperCase();
  if (method !== 'MIXED' && method !== 'GET' && method !== 'POST') throw new Error(`BENCH_SOAK_METHOD must be mixed, GET or POST (got "${env.BENCH_SOAK_METHOD}")`);
  const rated = env.BENCH_RATE !== undefined && env.BENCH_RATE !== '';
  return {
    minutes,
    warmupMinutes,
    sampleSec: num('BENCH_SOAK_SAMPLE_SECONDS', 10, 1, 600),
    method: method === 'MIXED' ? 'mixed' : method,
    maxSlope: num('BENCH_SOAK_MAX_SLOPE', 0.5, 0, 1e6),
    maxSpread: num('BENCH_SOAK_MAX_SPREAD', 0.1, 0, 100),
    rate: rated ? bench.rate : undefined,
    connections: rated ? bench.rateConnections : bench.connections,
    bodyBytes: bench.bodyBytes,
  };
}

interface Sample {
  /** Seconds since the load started. */
  readonly t: number;
  readonly warmup: boolean;
  /** VmRSS of the proxy's process tree, kB. */
  readonly rssKb: number | undefined;
  /** CPU of the proxy since the previous sample, % of one CPU. */
  readonly cpuPct: number | undefined;
  /** Requests the upstream received since the previous sample, per second. */
  readonly upstreamRps: number | undefined;
  readonly heapUsedBytes: number | undefined;
  readonly heapTotalBytes: number | undefined;
  readonly externalBytes: number | undefined;
  /** process_resident_memory_bytes, as the proxy reports itself. */
  readonly promRssBytes: number | undefined;
  readonly eventLoopLagP99Sec: number | undefined;
  /** nodejs_heap_space_size_used_bytes by space. */
  readonly heapSpaces: Record<string, number>;
  /** nodejs_heap_space_size_total_bytes by space: what V8 has committed for it. */
  readonly heapSpacesCommitted: Record<string, number>;
  readonly scrapeError?: string;
}

interface Chunk {
  readonly index: number;
  readonly method: 'GET' | 'POST';
  /** Seconds since the load started. */
  readonly startSec: number;
  readonly durationSec: number;
  readonly load: LoadResult;
  readonly upstream: UpstreamStats;
}

async function main(): Promise<number> {
  const soak = readSoakSettings(process.env);
  const started = new Date();
  const soakSec = Math.max(1, Math.round(soak.minutes * 60));
  const warmupSec = soak.warmupMinutes * 60;
  // Start-up, smoke, the load, shutdown, and counting and verifying an audit log of up to a few GB.
  const budgetSec = soakSec + 600;
  const budget = run.budget(budgetSec);

  const env = await environment();
  const ticksPerSecond = await clockTicksPerSecond();
  say('egress-proxy soak');
  say(`command:   ${env.command}`);
  say(`node:      ${env.node} at ${env.execPath}; ${env.cpuCount} x ${env.cpuModel}, load average at start ${env.loadavg.join(' ')}; code ${env.git}`);
  say(`load:      ${soak.minutes} min (${soakSec} s) ${soak.rate ? `at a fixed ${soak.rate} req/s over ${soak.connections} connections` : `at saturation over ${soak.connections} keep-alive connections`}, ${soak.method === 'mixed' ? `GET and ${soak.bodyBytes} B JSON POST in alternate ${CHUNK_SEC} s chunks` : `${soak.method} only, ${CHUNK_SEC} s chunks`}`);
  say(`sampling:  every ${soak.sampleSec} s: VmRSS of the proxy's process tree (/proc) and its /metrics; the first ${soak.warmupMinutes} min are warm-up`);
  say(`verdict:   flat when the steady-state RSS slope < ${soak.maxSlope} MiB/min and max - min <= ${pct(soak.maxSpread)} of the median, with no error; bounded to ${budgetSec} s`);

  const tmpRoot = await run.makeTmp('egress-soak-');
  const body = jsonBody(soak.bodyBytes);
  const load = forkChild('load generator', join(BENCH_DIR, 'load.ts'));
  await waitReady(load, 20_000);
  const upstream = await startUpstream(readSettings(process.env));
  const egress = await startEgress(upstream, tmpRoot, { serveEnv: { EGRESS_AUDIT_KEEP: AUDIT_KEEP } });
  const adminPort = egress.instances[0]!.adminPort;
  const headers = { [TOKEN_HEADER]: egress.token };
  say();
  say(`egress-proxy pid ${egress.process.pid}: ${egress.description}; ${egress.url}, admin 127.0.0.1:${adminPort}`);
  say(`upstream     pid ${upstream.process.pid}: node:http on ${upstream.origin}, 200 only with the injected PLAID-SECRET, else 401 (counted)`);
  say(`load         pid ${load.pid}: autocannon (bench/load.ts), pipelining 1`);

  const totalBefore = await upstream.stats();
  for (const method of ['GET', 'POST'] as const) {
    const res = await httpRequest(egress.url, { method, headers: method === 'POST' ? { ...headers, 'content-type': 'application/json' } : headers, ...(method === 'POST' ? { body } : {}) });
    if (res.status !== 200) throw new Error(`smoke ${method} ${egress.url} answered ${res.status}: ${res.body.slice(0, 500)}`);
  }

  // ---- sampler: every sampleSec from the start of the load, bounded in count; one last sample at the end.
  const samples: Sample[] = [];
  let last = { at: performance.now(), ticks: cpuTicks(egress.process.pid), requests: (await upstream.stats()).requests };
  const takeSample = async (t: number): Promise<Sample> => {
    const mem = memoryOf(egress.processes.map((p) => p.pid));
    const now = { at: performance.now(), ticks: egress.processes.reduce((n, p) => n + cpuTicks(p.pid), 0), requests: await upstream.stats().then((s) => s.requests, () => Number.NaN) };
    const elapsed = (now.at - last.at) / 1000;
    // Rates over less than a second (the first sample, taken as the load starts) say nothing.
    const cpuPct = elapsed >= 1 ? ((now.ticks - last.ticks) / ticksPerSecond / elapsed) * 100 : undefined;
    const upstreamRps = elapsed >= 1 && Number.isFinite(now.requests) ? (now.requests - last.requests) / elapsed : undefined;
    last = now;
    let metrics: Map<string, number> | undefined;
    let scrapeError: string | undefined;
    try {
      metrics = await scrapeMetrics(adminPort, 5000);
    } catch (err) {
      scrapeError = (err as Error).message;
    }
    const heapSpaces: Record<string, number> = {};
    const heapSpacesCommitted: Record<string, number> = {};
    for (const [series, value] of metrics ?? []) {
      const space = /^nodejs_heap_space_size_(used|total)_bytes\{space="([^"]+)"\}$/.exec(series);
      if (space) (space[1] === 'used' ? heapSpaces : heapSpacesCommitted)[space[2]!] = value;
    }
    return {
      t: Math.round(t * 10) / 10,
      warmup: t < warmupSec,
      rssKb: mem?.rssKb,
      cpuPct,
      upstreamRps,
      heapUsedBytes: metrics?.get('nodejs_heap_size_used_bytes'),
      heapTotalBytes: metrics?.get('nodejs_heap_size_total_bytes'),
      externalBytes: metrics?.get('nodejs_external_memory_bytes'),
      promRssBytes: metrics?.get('process_resident_memory_bytes'),
      eventLoopLagP99Sec: metrics?.get('nodejs_eventloop_lag_p99_seconds'),
      heapSpaces,
      heapSpacesCommitted,
      ...(scrapeError ? { scrapeError } : {}),
    };
  };
  const record = (s: Sample) => {
    samples.push(s);
    say(`  t=${String(Math.round(s.t)).padStart(5)} s${s.warmup ? ' (warm-up)' : '          '}  RSS ${mb(s.rssKb === undefined ? undefined : s.rssKb * 1024).padStart(7)} MiB  heap used ${mb(s.heapUsedBytes).padStart(6)} MiB of ${mb(s.heapTotalBytes).padStart(6)}  external ${mb(s.externalBytes).padStart(5)} MiB  CPU ${s.cpuPct === undefined ? '-' : `${Math.round(s.cpuPct)}%`}  upstream ${s.upstreamRps === undefined ? '-' : `${Math.round(s.upstreamRps)} req/s`}  loop lag p99 ${s.eventLoopLagP99Sec === undefined ? '-' : (s.eventLoopLagP99Sec * 1000).toFixed(1)} ms  committed new ${mb(s.heapSpacesCommitted.new)} old ${mb(s.heapSpacesCommitted.old)} code ${mb(s.heapSpacesCommitted.code)} lo ${mb(s.heapSpacesCommitted.large_object)} MiB${s.scrapeError ? `  /metrics: ${s.scrapeError}` : ''}`);
  };

  say();
  say('samples:');
  const loadStart = performance.now();
  record(await takeSample(0));
  let loadDone = false;
  const maxSamples = Math.ceil(soakSec / soak.sampleSec) + 1;
  const sampler = (async () => {
    for (let i = 1; i <= maxSamples; i++) {
      const due = loadStart + i * soak.sampleSec * 1000;
      while (!loadDone && performance.now() < due) await sleep(Math.min(250, due - performance.now()));
      if (loadDone || egress.process.exited) return;
      record(await takeSample((performance.now() - loadStart) / 1000));
    }
  })();

  // ---- the load: chunk after chunk until soakSec has passed (a bounded count).
  const chunks: Chunk[] = [];
  const chunkCount = Math.ceil(soakSec / CHUNK_SEC);
  try {
    for (let index = 0; index < chunkCount; index++) {
      const startSec = (performance.now() - loadStart) / 1000;
      const durationSec = Math.max(1, Math.min(CHUNK_SEC, Math.round(soakSec - startSec)));
      if (startSec >= soakSec - 0.5) break;
      const method = soak.method === 'mixed' ? (index % 2 === 0 ? 'GET' : 'POST') : soak.method;
      const job: LoadJob = {
        url: egress.url,
        method,
        headers: method === 'POST' ? { ...headers, 'content-type': 'application/json' } : headers,
        ...(method === 'POST' ? { body } : {}),
        connections: soak.connections,
        durationSec,
        timeoutSec: 10,
        ...(soak.rate ? { overallRate: soak.rate } : {}),
      };
      const before = await upstream.stats();
      const l = await runLoad(load, job);
      const seen = diffStats(await upstream.stats(), before);
      const chunk: Chunk = { index, method, startSec: Math.round(startSec * 10) / 10, durationSec, load: l, upstream: seen };
      chunks.push(chunk);
      say(`  chunk ${String(index + 1).padStart(3)}/${chunkCount} ${method.padEnd(4)} ${String(Math.round(chunk.startSec)).padStart(5)}-${String(Math.round(chunk.startSec + durationSec)).padEnd(5)} s  ${String(Math.round(l.rps)).padStart(6)} req/s  p50 ${l.latencyMs.p50.toFixed(2)} ms  p99 ${l.latencyMs.p99.toFixed(2)} ms  errors ${l.errors}  non-2xx ${l.non2xx}`);
      const where = `chunk ${index + 1} (${method}, ${Math.round(chunk.startSec)}-${Math.round(chunk.startSec + durationSec)} s)`;
      failures.push(...loadProblems(where, l));
      if (soak.rate && l.rps < soak.rate * 0.9) notes.push(`${where}: achieved ${Math.round(l.rps)} req/s of the ${soak.rate} offered`);
      if (egress.process.exited) break;
    }
  } finally {
    loadDone = true;
    await sampler;
  }
  const loadSec = (performance.now() - loadStart) / 1000;
  // One last sample as the load ends, unless the sampler just took it.
  if (!egress.process.exited && (samples[samples.length - 1]?.t ?? 0) < loadSec - 1) record(await takeSample(loadSec));
  const total = diffStats(await settledStats(upstream), totalBefore);
  failures.push(...upstreamProblems('soak', total, true));

  // ---- shut down, then check what the proxy left behind.
  const ports = [upstream.port, ...egress.ports];
  const killed = await run.shutdown();
  for (const k of killed) failures.push(`had to SIGKILL ${k}: it did not stop on its signal within 8 s`);
  if (egress.process.exited) {
    const { code, signal } = await egress.process.exit;
    if (code !== 0) failures.push(`egress-proxy exited with ${signal ?? `code ${code}`} on SIGTERM (expected 0); last output:\n${indent(egress.process.output().slice(-4000))}`);
  }
  if (egress.process.lines() > 0) notes.push(`egress-proxy wrote ${egress.process.lines()} log line(s) at level warn or above; last:\n${indent(egress.process.output().slice(-3000))}`);
  const open: number[] = [];
  for (const port of new Set(ports)) if (!(await portClosed(port))) open.push(port);
  if (open.length) failures.push(`still listening after shutdown: 127.0.0.1:${open.join(', 127.0.0.1:')}`);
  const { check: audit, problems } = await checkAudit(egress, total);
  failures.push(...problems);
  await run.removeTmp();
  clearTimeout(budget);

  // ---- analysis.
  const steady = samples.filter((s) => !s.warmup && s.t > 0 && s.rssKb !== undefined);
  const rssMb = steady.map((s) => s.rssKb! / 1024);
  const slope = leastSquaresSlope(steady.map((s) => s.t / 60), rssMb);
  const heapSteady = steady.filter((s) => s.heapUsedBytes !== undefined);
  const heapSlope = leastSquaresSlope(heapSteady.map((s) => s.t / 60), heapSteady.map((s) => s.heapUsedBytes! / 2 ** 20));
  const rss = rssMb.length ? { min: Math.min(...rssMb), median: median(rssMb), max: Math.max(...rssMb) } : undefined;
  const spread = rss ? rss.max - rss.min : Number.NaN;
  const scrapeErrors = samples.filter((s) => s.scrapeError).length;
  if (scrapeErrors > 0) notes.push(`${scrapeErrors} of ${samples.length} /metrics scrapes failed (heap figures missing there)`);
  const steadySec = steady.length ? steady[steady.length - 1]!.t - steady[0]!.t : 0;
  if (steadySec < 300) notes.push(`the steady part spans only ${Math.round(steadySec)} s: over so short a window the slope mostly shows noise and the last of the warm-up (the default, 10 min with 2 min of warm-up, judges 8 min)`);
  if (steady.length < 3) failures.push(`only ${steady.length} sample(s) after the warm-up: too few for a slope (run longer, shorten BENCH_SOAK_WARMUP_MINUTES or sample more often with BENCH_SOAK_SAMPLE_SECONDS)`);
  const slopeOk = Number.isFinite(slope) && slope < soak.maxSlope;
  const spreadOk = rss !== undefined && spread <= soak.maxSpread * rss.median;
  const flat = steady.length >= 3 && slopeOk && spreadOk;

  const minutes = perMinute(chunks);
  say();
  say(`throughput per minute (from the load generator; GET and POST chunks separately${soak.rate ? `; ${soak.rate} req/s offered` : ''}):`);
  say(table(['minute', 'GET req/s', 'POST req/s', 'responses', 'errors', 'non-2xx', 'RSS MiB at end', 'heap used MiB at end'], minutes.map((m) => {
    const at = nearest(samples, (m.minute + 1) * 60);
    return [String(m.minute + 1), m.getRps === undefined ? '-' : String(Math.round(m.getRps)), m.postRps === undefined ? '-' : String(Math.round(m.postRps)), String(m.responses), String(m.errors), String(m.non2xx), at?.rssKb === undefined ? '-' : (at.rssKb / 1024).toFixed(1), mb(at?.heapUsedBytes)];
  }), new Set([0, 1, 2, 3, 4, 5, 6, 7])));

  const first = heapSteady[0];
  const lastHeap = heapSteady[heapSteady.length - 1];
  const errors = chunks.reduce((n, c) => n + c.load.errors, 0);
  const non2xx = chunks.reduce((n, c) => n + c.load.non2xx, 0);
  const responses = chunks.reduce((n, c) => n + c.load.responses, 0);
  say();
  say(`warm-up:      the first ${soak.warmupMinutes} min (${samples.filter((s) => s.warmup).length} samples), not judged`);
  say(`steady state: ${steady.length} samples from t=${steady[0] ? Math.round(steady[0].t) : '-'} s to t=${steady.length ? Math.round(steady[steady.length - 1]!.t) : '-'} s`);
  say(`  RSS         min ${fmt(rss?.min)} MiB, median ${fmt(rss?.median)} MiB, max ${fmt(rss?.max)} MiB (max - min ${fmt(spread)} MiB = ${rss ? pct(spread / rss.median) : '-'} of the median; bound ${pct(soak.maxSpread)})`);
  say(`  RSS slope   ${signed(slope)} MiB/min, least squares over the steady samples (bound < ${soak.maxSlope} MiB/min)`);
  say(`  heap used   ${mb(first?.heapUsedBytes)} MiB at t=${first ? Math.round(first.t) : '-'} s, ${mb(lastHeap?.heapUsedBytes)} MiB at t=${lastHeap ? Math.round(lastHeap.t) : '-'} s (slope ${signed(heapSlope)} MiB/min, not judged)`);
  if (first && lastHeap) {
    // Spaces that hold under 0.1 MiB at both ends are left out of the line (they are in the JSON).
    const spacesLine = (what: string, start: Record<string, number>, end: Record<string, number>) => {
      const spaces = [...new Set([...Object.keys(start), ...Object.keys(end)])].filter((space) => Math.max(start[space] ?? 0, end[space] ?? 0) >= 0.1 * 2 ** 20);
      if (spaces.length) say(`  heap spaces ${what} MiB, start -> end: ${spaces.map((space) => `${space.replace(/_space$/, '')} ${mb(start[space])} -> ${mb(end[space])}`).join(', ')}`);
    };
    spacesLine('used', first.heapSpaces, lastHeap.heapSpaces);
    spacesLine('committed', first.heapSpacesCommitted, lastHeap.heapSpacesCommitted);
  }
  say(`  requests    ${responses} responses in ${Math.round(loadSec)} s (${Math.round(responses / loadSec)} req/s), ${errors} errors, ${non2xx} non-2xx; the upstream received ${total.requests}, ${total.missingSecret} without the secret, ${total.tokenSeen} with the caller token`);
  say(`  audit log   ${audit.summary}`);
  say(`load average at the end: ${loadavg().map((n) => n.toFixed(2)).join(' ')} (at the start: ${env.loadavg.join(' ')}); other processes on the machine move every figure`);

  const out = {
    started: started.toISOString(),
    environment: env,
    settings: soak,
    egress: { pid: egress.process.pid, description: egress.description },
    samples,
    chunks,
    minutes,
    steady: { samples: steady.length, fromSec: steady[0]?.t ?? null, toSec: steady[steady.length - 1]?.t ?? null, rssMb: rss ?? null, spreadMb: Number.isFinite(spread) ? spread : null, slopeMbPerMin: Number.isFinite(slope) ? slope : null, heapUsedStartBytes: first?.heapUsedBytes ?? null, heapUsedEndBytes: lastHeap?.heapUsedBytes ?? null, heapSlopeMbPerMin: Number.isFinite(heapSlope) ? heapSlope : null },
    upstreamTotal: total,
    audit: audit satisfies AuditCheck,
    verdict: flat && failures.length === 0 ? 'flat' : 'fail',
    failures,
    notes,
  };
  const resultsDir = join(BENCH_DIR, 'results');
  await mkdir(resultsDir, { recursive: true });
  const file = join(resultsDir, `soak-${started.toISOString().replace(/[:.]/g, '-')}.json`);
  await writeFile(file, `${JSON.stringify(out, null, 2)}\n`);
  say(`results written to ${file}`);
  for (const note of notes) say(`note: ${note}`);

  say();
  const memoryVerdict = `RSS slope ${signed(slope)} MiB/min (bound < ${soak.maxSlope}), max - min ${fmt(spread)} MiB = ${rss ? pct(spread / rss.median) : '-'} of the median (bound ${pct(soak.maxSpread)})`;
  if (flat && failures.length === 0) {
    say(`VERDICT: FLAT: ${memoryVerdict}; no errors`);
    return 0;
  }
  if (!flat) say(`VERDICT: NOT FLAT: ${memoryVerdict}${!slopeOk ? '; the slope is over its bound' : ''}${!spreadOk ? '; the range is over its bound' : ''}`);
  else say(`VERDICT: FAILED: memory was flat (${memoryVerdict}), but the checks below failed`);
  for (const f of failures) say(`  FAIL: ${f}`);
  return 1;
}

function perMinute(chunks: readonly Chunk[]): { minute: number; getRps: number | undefined; postRps: number | undefined; responses: number; errors: number; non2xx: number }[] {
  const byMinute = new Map<number, Chunk[]>();
  for (const c of chunks) {
    const minute = Math.floor((c.startSec + 0.5) / 60);
    byMinute.set(minute, [...(byMinute.get(minute) ?? []), c]);
  }
  const rate = (list: Chunk[]) => {
    const sec = list.reduce((n, c) => n + c.load.durationSec, 0);
    return sec > 0 ? list.reduce((n, c) => n + c.load.responses, 0) / sec : undefined;
  };
  return [...byMinute].sort((a, b) => a[0] - b[0]).map(([minute, list]) => ({
    minute,
    getRps: rate(list.filter((c) => c.method === 'GET')),
    postRps: rate(list.filter((c) => c.method === 'POST')),
    responses: list.reduce((n, c) => n + c.load.responses, 0),
    errors: list.reduce((n, c) => n + c.load.errors, 0),
    non2xx: list.reduce((n, c) => n + c.load.non2xx, 0),
  }));
}

/** Slope of the least-squares line through (x, y); NaN with fewer than two distinct x. */
export function leastSquaresSlope(xs: readonly number[], ys: readonly number[]): number {
  const n = Math.min(xs.length, ys.length);
  if (n < 2) return Number.NaN;
  const mx = xs.slice(0, n).reduce((a, b) => a + b, 0) / n;
  const my = ys.slice(0, n).reduce((a, b) => a + b, 0) / n;
  let sxy = 0;
  let sxx = 0;
  for (let i = 0; i < n; i++) {
    sxy += (xs[i]! - mx) * (ys[i]! - my);
    sxx += (xs[i]! - mx) ** 2;
  }
  return sxx > 0 ? sxy / sxx : Number.NaN;
}

function nearest(samples: readonly Sample[], t: number): Sample | undefined {
  let best: Sample | undefined;
  for (const s of samples) if (s.t <= t + 1 && (!best || Math.abs(s.t - t) < Math.abs(best.t - t))) best = s;
  return best;
}

function mb(bytes: number | undefined): string {
  return bytes === undefined || !Number.isFinite(bytes) ? '-' : (bytes / 2 ** 20).toFixed(1);
}

function fmt(value: number | undefined): string {
  return value === undefined || !Number.isFinite(value) ? '-' : value.toFixed(1);
}

function signed(value: number): string {
  return Number.isFinite(value) ? `${value >= 0 ? '+' : '-'}${Math.abs(value).toFixed(2)}` : '-';
}

function pct(fraction: number): string {
  return Number.isFinite(fraction) ? `${(fraction * 100).toFixed(fraction < 0.1 ? 1 : 0)}%` : '-';
}

await run.exit(main);
