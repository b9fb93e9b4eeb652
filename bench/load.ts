/**
 * Child process: the load generator. Runs the jobs sent by the orchestrator over IPC, one at a time,
 * in its own process so it never shares an event loop with a target.
 *
 * Saturation jobs with `generator: 'wrk'` run wrk (bench/wrk.lua), a C load generator: on a
 * 2-core machine the load generator, the upstream and the target share the CPUs, and autocannon
 * spends several times wrk's CPU per request, which the target then does not get. wrk's latency
 * percentiles come from its per-microsecond histogram. Fixed-rate jobs with `generator: 'wrk'`
 * run wrk too: bench/wrk.lua paces every request through wrk's delay() hook (BENCH_WRK_RATE).
 * At 2,000 req/s autocannon took a fifth to a third of a core, and the latency it measured was
 * largely its own contention with the target for the two cores.
 *
 * Latency: every response's time (autocannon measures it with hrtime, in fractional ms) is kept
 * and the percentiles are exact. autocannon's own histogram has whole-millisecond resolution, too
 * coarse for loopback, and in rate mode it adds synthetic samples (coordinated omission correction
 * with a 1 ms interval); its values are kept in the result for reference only.
 *
 * Fixed rate: autocannon's overallRate is a per-connection quota per one-second window, sent as
 * fast as possible at the top of each second (a burst). The bench spreads each connection's quota
 * evenly over the second instead (setupClient wraps the client's request function), so the target
 * sees a steady `overallRate` requests per second. autocannon's own quota still applies on top.
 */
import autocannon, { type Client } from 'autocannon';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { exitWithParent, type LatencySummary, type LoadJob, type LoadReply, type LoadRequest, type LoadResult } from './common.ts';

exitWithParent();

let busy = false;

process.on('message', (message: LoadRequest) => {
  if (message?.type !== 'run') return;
  if (busy) {
    reply({ type: 'error', id: message.id, message: 'load generator busy' });
    return;
  }
  busy = true;
  run(message.job).then(
    (result) => reply({ type: 'result', id: message.id, result }),
    (err: unknown) => reply({ type: 'error', id: message.id, message: (err as Error)?.stack ?? String(err) }),
  ).finally(() => {
    busy = false;
  });
});

function reply(message: LoadReply): void {
  process.send!(message);
}

async function run(job: LoadJob): Promise<LoadResult> {
  if (job.generator === 'wrk') return runWrk(job);
  let samples = new Float64Array(1 << 16);
  let count = 0;
  const connections = job.overallRate ? Math.min(job.connections, job.overallRate) : job.connections;
  const instance = autocannon({
    url: job.url,
    method: job.method,
    headers: job.headers,
    ...(job.body !== undefined ? { body: job.body } : {}),
    connections,
    pipelining: 1,
    duration: job.durationSec,
    timeout: job.timeoutSec,
    ...(job.overallRate ? { overallRate: job.overallRate, setupClient: pace(connections * 1000 / job.overallRate) } : {}),
  });
  instance.on('response', (_client: unknown, _status: number, _bytes: number, responseTimeMs: number) => {
    if (count === samples.length) {
      const grown = new Float64Array(samples.length * 2);
      grown.set(samples);
      samples = grown;
    }
    samples[count++] = responseTimeMs;
  });
  const result = await instance;

  const statusCodes: Record<string, number> = {};
  for (const [code, { count: n }] of Object.entries(result.statusCodeStats ?? {})) statusCodes[code] = n;
  return {
    rps: result.requests.average,
    responses: count,
    durationSec: result.duration,
    latencyMs: summarise(samples.subarray(0, count)),
    autocannonLatencyMs: { p50: result.latency.p50, p99: result.latency.p99 },
    errors: result.errors,
    timeouts: result.timeouts,
    non2xx: result.non2xx,
    statusCodes,
  };
}

const WRK_SCRIPT = join(import.meta.dirname, 'wrk.lua');

/** One job with wrk: one thread, the job's connections, its duration (and rate); the script prints the numbers as JSON. */
function runWrk(job: LoadJob): Promise<LoadResult> {
  const args = ['-t1', `-c${job.connections}`, `-d${job.durationSec}s`, '--timeout', `${job.timeoutSec}s`, '-s', WRK_SCRIPT, job.url];
  const env = {
    ...process.env,
    BENCH_WRK_METHOD: job.method,
    BENCH_WRK_HEADERS: Object.entries(job.headers).map(([name, value]) => `${name}: ${value}`).join('\n'),
    ...(job.body !== undefined ? { BENCH_WRK_BODY: job.body } : {}),
    ...(job.overallRate ? { BENCH_WRK_RATE: String(job.overallRate) } : {}),
  };
  return new Promise((resolveRun, reject) => {
    const child = spawn('wrk', args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), (job.durationSec + job.timeoutSec + 20) * 1000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const line = stdout.trim().split('\n').at(-1) ?? '';
      if (code !== 0 || !line.startsWith('{')) {
        reject(new Error(`wrk ${args.join(' ')} exited ${signal ?? code}: ${(stderr || stdout).slice(-2000)}`));
        return;
      }
      const w = JSON.parse(line) as WrkSummary;
      const ms = (us: number) => us / 1000;
      const durationSec = w.durationUs / 1e6;
      const errors = w.connect + w.read + w.write + w.timeout;
      resolveRun({
        rps: w.requests / durationSec,
        responses: w.requests,
        durationSec,
        latencyMs: { p50: ms(w.p50), p90: ms(w.p90), p99: ms(w.p99), p999: ms(w.p999), max: ms(w.max), mean: ms(w.mean), samples: w.requests },
        autocannonLatencyMs: { p50: Number.NaN, p99: Number.NaN },
        errors,
        timeouts: w.timeout,
        non2xx: w.status,
        // wrk counts answers of 400 and above, without their codes.
        statusCodes: w.status > 0 ? { '2xx/3xx': w.requests - w.status, '4xx/5xx': w.status } : { '2xx/3xx': w.requests },
      });
    });
  });
}

/** What bench/wrk.lua's done() prints: wrk's counts, and LatencySummary's latencies in microseconds. */
interface WrkSummary extends Omit<LatencySummary, 'samples'> {
  readonly requests: number;
  readonly durationUs: number;
  readonly connect: number;
  readonly read: number;
  readonly write: number;
  readonly status: number;
  readonly timeout: number;
}

/** setupClient hook: each connection sends one request every `intervalMs`, from a random phase. */
function pace(intervalMs: number): (client: Client) => void {
  return (client) => {
    const send = client._doRequest;
    if (typeof send !== 'function') throw new Error('autocannon internals changed (Client#_doRequest is missing): cannot pace the fixed-rate run');
    let next = performance.now() + Math.random() * intervalMs;
    client._doRequest = function paced(...args: unknown[]) {
      const now = performance.now();
      const at = Math.max(next, now);
      next = at + intervalMs;
      const wait = at - now;
      if (wait < 0.5) {
        send.apply(client, args);
        return;
      }
      setTimeout(() => {
        if (!client.destroyed) send.apply(client, args);
      }, wait);
    };
  };
}

function summarise(values: Float64Array): LatencySummary {
  const n = values.length;
  if (n === 0) return { p50: Number.NaN, p90: Number.NaN, p99: Number.NaN, p999: Number.NaN, max: Number.NaN, mean: Number.NaN, samples: 0 };
  const sorted = Float64Array.from(values).sort();
  const at = (q: number) => sorted[Math.min(n - 1, Math.max(0, Math.ceil(q * n) - 1))]!;
  let sum = 0;
  for (const v of sorted) sum += v;
  return { p50: at(0.5), p90: at(0.9), p99: at(0.99), p999: at(0.999), max: sorted[n - 1]!, mean: sum / n, samples: n };
}

process.send!({ type: 'ready', port: 0 });
