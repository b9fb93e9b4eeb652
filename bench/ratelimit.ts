/**
 * Rate-limiter micro-benchmark: `npm run bench:ratelimit`.
 *
 * Against a private redis-server (free port, no persistence, started and stopped here), compares:
 *   gcra-redis  our RedisRateLimiter.check(): GCRA in one Lua EVAL, on ioredis connections built
 *               exactly as the proxy builds them (parseRedisUrl(url).connect(): 500 ms command
 *               timeout, no offline queue), falling back to per-instance buckets when Redis fails
 *   rlf-redis   rate-limiter-flexible's RateLimiterRedis (fixed window counter, INCR + TTL in Lua) on
 *               the same kind of ioredis connection; two buckets as its RateLimiterUnion takes them
 *   memory      our MemoryRateLimiter, the in-process baseline (what the file store uses)
 * For each: sequential latency, throughput with concurrent callers, CPU per call (client and
 * redis-server), a correctness check (burst then refuse; two buckets all-or-nothing; a steady
 * over-limit load, which shows GCRA's refill against the fixed window), and what a call does while
 * redis-server is frozen (SIGSTOP) for 2 s. Prints plain tables (ratios to memory), writes JSON to
 * bench/results/ratelimit-<timestamp>.json, exits 1 if our limiters fail a check.
 *
 * Settings (environment): RL_BENCH_SEQ (sequential calls per limiter and round, default 20000),
 * RL_BENCH_CONCURRENCY (50), RL_BENCH_SECONDS (throughput seconds per limiter and round, 2),
 * RL_BENCH_ROUNDS (3; the tables show the median, the order of the limiters rotates each round),
 * RL_BENCH_FREEZE_MS (2000).
 */
import { once } from 'node:events';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { RateLimiterMemory, RateLimiterRedis, RateLimiterRes } from 'rate-limiter-flexible';
import type { RateLimitOptions } from '../src/config/route-schema.ts';
import { createLogger } from '../src/observe/log.ts';
import { MemoryRateLimiter, type Bucket } from '../src/pipeline/rate-limiter.ts';
import { RedisRateLimiter } from '../src/pipeline/redis-rate-limiter.ts';
import { parseRedisUrl, REDIS_LIMITS, type RedisConnection } from '../src/store/redis-client.ts';
import { sleep } from './common.ts';
import { clockTicksPerSecond, cpuTicks, killAllSync, stopAll, type Managed } from './proc.ts';
import { ratio, table } from './report.ts';
import { BENCH_DIR, startRedis } from './targets.ts';

const say = (line = '') => process.stdout.write(`${line}\n`);

const num = (name: string, fallback: number, min: number, max: number): number => {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < min || value > max) throw new Error(`${name} must be a number between ${min} and ${max} (got "${raw}")`);
  return Math.round(value);
};
const SETTINGS = {
  sequentialCalls: num('RL_BENCH_SEQ', 20_000, 100, 1_000_000),
  concurrency: num('RL_BENCH_CONCURRENCY', 50, 1, 1000),
  freezeMs: num('RL_BENCH_FREEZE_MS', 2000, 200, 10_000),
  throughputSec: num('RL_BENCH_SECONDS', 2, 1, 30),
  rounds: num('RL_BENCH_ROUNDS', 3, 1, 20),
  warmupCalls: 2000,
};

// ---- the limiters, behind one shape ----------------------------------------------------------

type Outcome = 'allowed' | 'refused' | 'error';

interface Answer {
  readonly outcome: Outcome;
  /** The limiter's hint for when to try again, ms (GCRA: retry-after; fixed window: msBeforeNext). */
  readonly retryMs?: number;
}

/** One limiter configured for one limit; `key` names a caller, so each test can start from full buckets. */
interface Subject {
  readonly name: string;
  readonly buckets: 1 | 2;
  check(key: string): Promise<Answer>;
}

/** A limit both ways: GCRA (rate, burst) and the fixed window with the same numbers (points per duration). */
interface Limit {
  readonly count: number;
  readonly periodSec: number;
}

function gcraLimit(limit: Limit): RateLimitOptions {
  return { rate: { count: limit.count, periodMs: limit.periodSec * 1000 }, burst: limit.count };
}

/** Caller bucket + (optionally) the route's upstream bucket, as rate-limit.ts builds them. */
function buckets(key: string, caller: Limit, upstream?: Limit): Bucket[] {
  const out: Bucket[] = [{ key: ['rule', 0, key], limit: gcraLimit(caller), policy: 'caller' }];
  if (upstream) out.push({ key: ['upstream'], limit: gcraLimit(upstream), policy: 'upstream' });
  return out;
}

let scopes = 0;

function memorySubject(caller: Limit, upstream?: Limit): Subject {
  const limiter = new MemoryRateLimiter();
  const scope = `bench-${++scopes}`;
  return {
    name: 'memory (ours)',
    buckets: upstream ? 2 : 1,
    async check(key) {
      const r = limiter.check(scope, buckets(key, caller, upstream));
      return r.allowed ? { outcome: 'allowed' } : { outcome: 'refused', retryMs: r.retryAfterMs };
    },
  };
}

function gcraSubject(limiter: RedisRateLimiter, caller: Limit, upstream?: Limit): Subject {
  const scope = `bench-${++scopes}`;
  return {
    name: 'gcra-redis (ours)',
    buckets: upstream ? 2 : 1,
    async check(key) {
      const pending = limiter.check(scope, buckets(key, caller, upstream));
      const r = pending instanceof Promise ? await pending : pending;
      return r.allowed ? { outcome: 'allowed' } : { outcome: 'refused', retryMs: r.retryAfterMs };
    },
  };
}

/** rate-limiter-flexible's answer: a RateLimiterRes (refused), an Error (store failed), or a union's map of either. */
function rlfRejection(reason: unknown): Answer {
  if (reason instanceof RateLimiterRes) return { outcome: 'refused', retryMs: reason.msBeforeNext };
  if (reason instanceof Error) return { outcome: 'error' };
  if (reason && typeof reason === 'object') {
    const values = Object.values(reason as Record<string, unknown>);
    if (values.some((v) => v instanceof Error)) return { outcome: 'error' };
    const refused = values.filter((v): v is RateLimiterRes => v instanceof RateLimiterRes);
    if (refused.length) return { outcome: 'refused', retryMs: Math.max(...refused.map((r) => r.msBeforeNext)) };
  }
  return { outcome: 'error' };
}

function rlfSubject(client: Redis | RedisConnection, name: string, caller: Limit, upstream?: Limit, insurance = false): Subject {
  const prefix = `rlf-${++scopes}`;
  const make = (limit: Limit, keyPrefix: string) => new RateLimiterRedis({
    storeClient: client,
    keyPrefix,
    points: limit.count,
    duration: limit.periodSec,
    ...(insurance ? { insuranceLimiter: new RateLimiterMemory({ keyPrefix: `${keyPrefix}-ins`, points: limit.count, duration: limit.periodSec }) } : {}),
  });
  const callerLimiter = make(caller, `${prefix}-caller`);
  if (!upstream) {
    return {
      name,
      buckets: 1,
      check: (key) => callerLimiter.consume(key).then((): Answer => ({ outcome: 'allowed' }), rlfRejection),
    };
  }
  // Two buckets: one limiter per bucket, both consumed in parallel and refused if either refuses, which is
  // what RateLimiterUnion does (it takes one key for all its limiters, and the upstream bucket is keyed by route, not caller).
  const upstreamLimiter = make(upstream, `${prefix}-upstream`);
  return {
    name,
    buckets: 2,
    check: (key) => Promise.all([
      callerLimiter.consume(key).then(() => undefined, (e: unknown) => e),
      upstreamLimiter.consume('route').then(() => undefined, (e: unknown) => e),
    ]).then(([a, b]): Answer => (a === undefined && b === undefined ? { outcome: 'allowed' } : rlfRejection(Object.fromEntries([['caller', a], ['upstream', b]].filter(([, v]) => v !== undefined))))),
  };
}

// ---- measurements ----------------------------------------------------------------------------

function percentile(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

interface PerfResult {
  readonly name: string;
  readonly buckets: number;
  readonly rounds?: number;
  readonly perRound?: readonly { readonly p50Us: number; readonly p99Us: number; readonly perSec: number }[];
  readonly sequential: { readonly calls: number; readonly p50Us: number; readonly p99Us: number; readonly meanUs: number; readonly refused: number; readonly errors: number };
  readonly throughput: { readonly calls: number; readonly perSec: number; readonly concurrency: number; readonly clientCpuUsPerCall: number; readonly redisCpuUsPerCall: number; readonly refused: number; readonly errors: number };
}

async function measure(subject: Subject, redisPid: number | undefined, ticksPerSecond: number): Promise<PerfResult> {
  const key = 'perf-caller';
  for (let i = 0; i < SETTINGS.warmupCalls; i++) await subject.check(key);
  const samples = new Float64Array(SETTINGS.sequentialCalls);
  let refused = 0;
  let errors = 0;
  for (let i = 0; i < samples.length; i++) {
    const t0 = performance.now();
    const a = await subject.check(key);
    samples[i] = (performance.now() - t0) * 1000;
    if (a.outcome === 'refused') refused++;
    else if (a.outcome === 'error') errors++;
  }
  let sum = 0;
  for (const v of samples) sum += v;
  samples.sort();
  const sequential = { calls: samples.length, p50Us: percentile(samples, 0.5), p99Us: percentile(samples, 0.99), meanUs: sum / samples.length, refused, errors };

  let calls = 0;
  let tRefused = 0;
  let tErrors = 0;
  const cpu0 = process.cpuUsage();
  const redis0 = redisPid ? cpuTicks(redisPid) : 0;
  const t0 = performance.now();
  const end = t0 + SETTINGS.throughputSec * 1000;
  const worker = async () => {
    while (performance.now() < end) {
      const a = await subject.check(key);
      calls++;
      if (a.outcome === 'refused') tRefused++;
      else if (a.outcome === 'error') tErrors++;
    }
  };
  await Promise.all(Array.from({ length: SETTINGS.concurrency }, worker));
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const redisSec = redisPid ? (cpuTicks(redisPid) - redis0) / ticksPerSecond : 0;
  return {
    name: subject.name,
    buckets: subject.buckets,
    sequential,
    throughput: {
      calls,
      perSec: calls / elapsed,
      concurrency: SETTINGS.concurrency,
      clientCpuUsPerCall: (cpu.user + cpu.system) / calls,
      redisCpuUsPerCall: redisPid ? (redisSec * 1e6) / calls : Number.NaN,
      refused: tRefused,
      errors: tErrors,
    },
  };
}

/** The median of each number over the rounds (counts of refusals and errors are summed). */
function medianResult(results: readonly PerfResult[]): PerfResult {
  const med = (pick: (r: PerfResult) => number) => {
    const v = results.map(pick).sort((a, b) => a - b);
    const mid = v.length >> 1;
    return v.length % 2 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
  };
  const sum = (pick: (r: PerfResult) => number) => results.reduce((acc, r) => acc + pick(r), 0);
  const first = results[0]!;
  return {
    name: first.name,
    buckets: first.buckets,
    rounds: results.length,
    sequential: { calls: first.sequential.calls, p50Us: med((r) => r.sequential.p50Us), p99Us: med((r) => r.sequential.p99Us), meanUs: med((r) => r.sequential.meanUs), refused: sum((r) => r.sequential.refused), errors: sum((r) => r.sequential.errors) },
    throughput: { calls: sum((r) => r.throughput.calls), perSec: med((r) => r.throughput.perSec), concurrency: first.throughput.concurrency, clientCpuUsPerCall: med((r) => r.throughput.clientCpuUsPerCall), redisCpuUsPerCall: med((r) => r.throughput.redisCpuUsPerCall), refused: sum((r) => r.throughput.refused), errors: sum((r) => r.throughput.errors) },
    perRound: results.map((r) => ({ p50Us: r.sequential.p50Us, p99Us: r.sequential.p99Us, perSec: r.throughput.perSec })),
  };
}

interface Check {
  readonly limiter: string;
  readonly check: string;
  readonly expected: string;
  readonly got: string;
  /** true: as expected; false: not; null: no expectation (a description of the semantics). */
  readonly pass: boolean | null;
  /** Our limiters must pass; rate-limiter-flexible's differences are reported, not failed. */
  readonly ours: boolean;
}

/** `n` calls at once (the concurrent case is where a non-atomic limiter would over-admit). */
async function burst(subject: Subject, key: string, n: number): Promise<{ allowed: number; refused: number; errors: number }> {
  const answers = await Promise.all(Array.from({ length: n }, () => subject.check(key)));
  return {
    allowed: answers.filter((a) => a.outcome === 'allowed').length,
    refused: answers.filter((a) => a.outcome === 'refused').length,
    errors: answers.filter((a) => a.outcome === 'error').length,
  };
}

interface SteadyResult {
  readonly offered: number;
  readonly allowed: number;
  readonly longestGapMs: number;
  readonly maxIn1s: number;
  readonly firstRetryMs: number | undefined;
  readonly allowedPerQuarterSec: number[];
}

/** A steady over-limit load: one call every `everyMs` for `seconds`; when were calls admitted? */
async function steady(subject: Subject, key: string, everyMs: number, seconds: number): Promise<SteadyResult> {
  const start = performance.now();
  const admitted: number[] = [];
  let firstRetryMs: number | undefined;
  let offered = 0;
  const pending: Promise<void>[] = [];
  for (let next = start; next < start + seconds * 1000; next += everyMs) {
    const wait = next - performance.now();
    if (wait > 0) await sleep(wait);
    offered++;
    const sent = performance.now() - start;
    pending.push(subject.check(key).then((a) => {
      if (a.outcome === 'allowed') admitted.push(sent);
      else if (firstRetryMs === undefined && a.outcome === 'refused') firstRetryMs = a.retryMs;
    }));
  }
  await Promise.all(pending);
  admitted.sort((a, b) => a - b);
  let longestGapMs = 0;
  for (let i = 1; i < admitted.length; i++) longestGapMs = Math.max(longestGapMs, admitted[i]! - admitted[i - 1]!);
  let maxIn1s = 0;
  for (let i = 0, j = 0; i < admitted.length; i++) {
    while (admitted[i]! - admitted[j]! >= 1000) j++;
    maxIn1s = Math.max(maxIn1s, i - j + 1);
  }
  const quarters = Array.from({ length: seconds * 4 }, () => 0);
  for (const t of admitted) quarters[Math.min(quarters.length - 1, Math.floor(t / 250))]!++;
  return { offered, allowed: admitted.length, longestGapMs, maxIn1s, firstRetryMs, allowedPerQuarterSec: quarters };
}

interface FreezeResult {
  readonly name: string;
  readonly offered: number;
  readonly inFreeze: { readonly calls: number; readonly allowed: number; readonly refused: number; readonly errors: number; readonly pending: number; readonly p50Ms: number; readonly maxMs: number; readonly stalled: number };
  readonly outside: { readonly calls: number; readonly errors: number; readonly maxMs: number };
  /** ms after the thaw until the first call that was answered by Redis again (by log line for ours; first success otherwise). */
  readonly recoveryMs: number | undefined;
  readonly logs: string[];
}

/**
 * Calls at a steady 200/s for freezeMs + 1.5 s, with redis-server stopped (SIGSTOP) from +0.5 s for
 * freezeMs. Each call's start, duration and outcome; calls still unanswered 3 s after the load ends
 * count as pending (hung).
 */
async function freezeTest(name: string, subject: Subject, redis: Managed, logs?: { t: number; line: string }[]): Promise<FreezeResult> {
  const everyMs = 5;
  const freezeAt = 500;
  const thawAt = freezeAt + SETTINGS.freezeMs;
  const endAt = thawAt + 1000;
  const calls: { start: number; end?: number; outcome?: Outcome }[] = [];
  const start = performance.now();
  const logStart = logs?.length ?? 0;
  let frozen = false;
  let thawedAt = Number.NaN;
  try {
    for (let next = 0; next < endAt; next += everyMs) {
      const wait = start + next - performance.now();
      if (wait > 0) await sleep(wait);
      const now = performance.now() - start;
      if (!frozen && now >= freezeAt && now < thawAt) {
        process.kill(redis.pid, 'SIGSTOP');
        frozen = true;
      }
      if (frozen && now >= thawAt) {
        process.kill(redis.pid, 'SIGCONT');
        frozen = false;
        thawedAt = now;
      }
      const call: { start: number; end?: number; outcome?: Outcome } = { start: now };
      calls.push(call);
      subject.check('freeze-caller').then((a) => {
        call.end = performance.now() - start;
        call.outcome = a.outcome;
      }, () => {
        call.end = performance.now() - start;
        call.outcome = 'error';
      });
    }
  } finally {
    if (frozen) {
      process.kill(redis.pid, 'SIGCONT');
      thawedAt = performance.now() - start;
    }
  }
  const settleBy = performance.now() + 3000;
  while (calls.some((c) => c.end === undefined) && performance.now() < settleBy) await sleep(20);
  const during = calls.filter((c) => c.start >= freezeAt && c.start < thawAt);
  const outside = calls.filter((c) => c.start < freezeAt || c.start >= thawAt);
  const durations = Float64Array.from(during.filter((c) => c.end !== undefined).map((c) => c.end! - c.start)).sort();
  let recoveryMs: number | undefined;
  const ownLogs = (logs ?? []).slice(logStart).map((l) => ({ t: l.t - start, line: l.line }));
  if (logs) {
    const back = ownLogs.find((l) => l.t >= thawedAt && /shared through Redis again/.test(l.line));
    recoveryMs = back ? back.t - thawedAt : undefined;
  } else {
    const first = calls.filter((c) => c.outcome === 'allowed' && c.end !== undefined && c.end >= thawedAt && c.start >= freezeAt).sort((a, b) => a.end! - b.end!)[0];
    recoveryMs = first ? first.end! - thawedAt : undefined;
  }
  return {
    name,
    offered: calls.length,
    inFreeze: {
      calls: during.length,
      allowed: during.filter((c) => c.outcome === 'allowed').length,
      refused: during.filter((c) => c.outcome === 'refused').length,
      errors: during.filter((c) => c.outcome === 'error').length,
      pending: during.filter((c) => c.end === undefined).length,
      p50Ms: percentile(durations, 0.5),
      maxMs: durations.length ? durations[durations.length - 1]! : Number.NaN,
      stalled: during.filter((c) => c.end === undefined || c.end - c.start >= 400).length,
    },
    outside: {
      calls: outside.length,
      errors: outside.filter((c) => c.outcome === 'error').length,
      maxMs: Math.max(0, ...outside.filter((c) => c.end !== undefined).map((c) => c.end! - c.start)),
    },
    recoveryMs,
    logs: ownLogs.map((l) => `+${Math.round(l.t)} ms ${l.line.trim()}`),
  };
}

// ---- the run ---------------------------------------------------------------------------------

let tmpRoot: string | undefined;
let redisProcess: Managed | undefined;
const connections: { disconnect(): void }[] = [];

async function cleanup(): Promise<void> {
  if (redisProcess && !redisProcess.exited) {
    try {
      process.kill(redisProcess.pid, 'SIGCONT');
    } catch {
      // gone
    }
  }
  for (const c of connections) c.disconnect();
  await stopAll(5000);
  if (tmpRoot) await rm(tmpRoot, { recursive: true, force: true }).catch(() => {});
}

process.on('exit', () => {
  if (redisProcess && !redisProcess.exited) {
    try {
      process.kill(redisProcess.pid, 'SIGCONT');
    } catch {
      // gone
    }
  }
  killAllSync();
});
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    process.stderr.write(`\n${sig}: stopping redis-server\n`);
    void cleanup().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
  });
}

async function ready(client: RedisConnection | Redis): Promise<RedisConnection | Redis> {
  (client as NodeJS.EventEmitter).on('error', () => {});
  connections.push(client);
  if (client.status !== 'ready') await once(client as NodeJS.EventEmitter, 'ready', { signal: AbortSignal.timeout(10_000) });
  return client;
}

function fmt(value: number, digits = 1): string {
  return Number.isFinite(value) ? value.toFixed(digits) : '-';
}

async function main(): Promise<number> {
  const started = new Date();
  const budget = setTimeout(() => {
    process.stderr.write('\nthe rate-limit bench did not finish within 240 s: stopping\n');
    void cleanup().finally(() => process.exit(1));
  }, 240_000);
  const ticksPerSecond = await clockTicksPerSecond();
  const versions = { ioredis: await pkgVersion('ioredis'), 'rate-limiter-flexible': await pkgVersion('rate-limiter-flexible') };

  tmpRoot = await mkdtemp(join(tmpdir(), 'egress-rl-bench-'));
  const redis = await startRedis(tmpRoot);
  if ('skipped' in redis) throw new Error(redis.skipped);
  redisProcess = redis.process;

  say('rate-limiter micro-benchmark');
  say(`node:      ${process.version}, ${cpus().length} x ${cpus()[0]?.model ?? 'unknown'}`);
  say(`redis:     redis-server ${redis.version} on 127.0.0.1:${redis.port} (pid ${redis.process.pid}, --save '' --appendonly no), loopback`);
  say(`clients:   ioredis ${versions.ioredis} via parseRedisUrl(url).connect() (command timeout ${REDIS_LIMITS.commandTimeoutMs} ms, no offline queue, as the proxy); rate-limiter-flexible ${versions['rate-limiter-flexible']}`);
  say(`settings:  ${SETTINGS.sequentialCalls} sequential calls (after ${SETTINGS.warmupCalls} warm-up), then ${SETTINGS.throughputSec} s with ${SETTINGS.concurrency} concurrent callers, per limiter and round, ${SETTINGS.rounds} round(s); freeze ${SETTINGS.freezeMs} ms`);
  say();

  const spec = parseRedisUrl(redis.url);
  const client = await ready(spec.connect()) as RedisConnection;
  const logs: { t: number; line: string }[] = [];
  const log = createLogger('info', { write: (line: string) => void logs.push({ t: performance.now(), line }) });
  const ours = new RedisRateLimiter(client, await ready(spec.connect()) as RedisConnection, log);
  const rlfClient = await ready(spec.connect()) as RedisConnection;

  // 1. Speed: every call allowed (a limit far above what the machine can do), one hot key, as the bench route.
  const HUGE: Limit = { count: 10_000_000, periodSec: 1 };
  say(`measuring latency and throughput (every call allowed: limit 10000000/s), ${SETTINGS.rounds} round(s), the order rotated each round…`);
  const subjects = [
    memorySubject(HUGE), gcraSubject(ours, HUGE), rlfSubject(rlfClient, 'rlf-redis', HUGE),
    memorySubject(HUGE, HUGE), gcraSubject(ours, HUGE, HUGE), rlfSubject(rlfClient, 'rlf-redis (2 limiters)', HUGE, HUGE),
  ];
  const rounds: PerfResult[][] = subjects.map(() => []);
  for (let round = 0; round < SETTINGS.rounds; round++) {
    for (let k = 0; k < subjects.length; k++) {
      const i = (k + round * 2) % subjects.length;
      const subject = subjects[i]!;
      const result = await measure(subject, subject.name.startsWith('memory') ? undefined : redis.process.pid, ticksPerSecond);
      rounds[i]!.push(result);
      say(`  [round ${round + 1}] ${result.name.padEnd(24)} ${result.buckets} bucket(s): p50 ${fmt(result.sequential.p50Us)} us, p99 ${fmt(result.sequential.p99Us)} us, ${Math.round(result.throughput.perSec)} calls/s`);
    }
  }
  const perf = rounds.map(medianResult);

  // 2. Correctness.
  say('checking correctness…');
  const checks: Check[] = [];
  const PER_MIN: Limit = { count: 100, periodSec: 60 };
  for (const subject of [memorySubject(PER_MIN), gcraSubject(ours, PER_MIN), rlfSubject(rlfClient, 'rlf-redis', PER_MIN)]) {
    const r = await burst(subject, 'burst-caller', 150);
    const isOurs = !subject.name.startsWith('rlf');
    checks.push({ limiter: subject.name, check: '150 calls at once, limit 100/min burst 100 (rlf: 100 points / 60 s)', expected: '100 allowed, 50 refused', got: `${r.allowed} allowed, ${r.refused} refused${r.errors ? `, ${r.errors} errors` : ''}`, pass: r.allowed === 100 && r.refused === 50 && r.errors === 0, ours: isOurs });
    const again = await subject.check('burst-caller');
    checks.push({ limiter: subject.name, check: 'the 151st call, right after', expected: 'refused', got: `${again.outcome}${again.retryMs !== undefined ? ` (retry in ${Math.round(again.retryMs)} ms)` : ''}`, pass: again.outcome === 'refused', ours: isOurs });
  }
  // Two buckets, all or nothing: caller A (100/min) and the route's upstream bucket (120/min), then caller B.
  const CALLER: Limit = { count: 100, periodSec: 60 };
  const UPSTREAM: Limit = { count: 120, periodSec: 60 };
  for (const subject of [memorySubject(CALLER, UPSTREAM), gcraSubject(ours, CALLER, UPSTREAM), rlfSubject(rlfClient, 'rlf-redis (2 limiters)', CALLER, UPSTREAM)]) {
    const a = await burst(subject, 'caller-a', 150);
    const b = await burst(subject, 'caller-b', 50);
    const isOurs = !subject.name.startsWith('rlf');
    checks.push({
      limiter: subject.name,
      check: 'two buckets: caller A sends 150 (its bucket 100/min, upstream 120/min), then caller B 50',
      expected: 'A 100 allowed; B 20 allowed (A\'s 50 refused calls spent nothing upstream)',
      got: `A ${a.allowed} allowed; B ${b.allowed} allowed${a.errors + b.errors ? `, ${a.errors + b.errors} errors` : ''}`,
      pass: a.allowed === 100 && b.allowed === 20 && a.errors + b.errors === 0,
      ours: isOurs,
    });
  }
  // A steady over-limit load: 60 calls/s offered against 20/s (burst 20; rlf: 20 points / 1 s), for 3 s, all three at once.
  const PER_SEC: Limit = { count: 20, periodSec: 1 };
  const steadySubjects = [memorySubject(PER_SEC), gcraSubject(ours, PER_SEC), rlfSubject(rlfClient, 'rlf-redis', PER_SEC)];
  const steadyResults = await Promise.all(steadySubjects.map((s) => steady(s, 'steady-caller', 1000 / 60, 3)));
  for (const [i, subject] of steadySubjects.entries()) {
    const r = steadyResults[i]!;
    const isOurs = !subject.name.startsWith('rlf');
    checks.push({
      limiter: subject.name,
      check: '60/s offered for 3 s against 20/s burst 20',
      expected: isOurs ? 'GCRA: 20 at once, then one per 50 ms: ~80 allowed, gaps ~50 ms' : '(fixed window: up to 20 per window from its first call, then nothing until it expires)',
      got: `${r.allowed}/${r.offered} allowed, longest gap ${Math.round(r.longestGapMs)} ms (details below)`,
      pass: isOurs ? r.allowed >= 74 && r.allowed <= 84 && r.longestGapMs < 120 : null,
      ours: isOurs,
    });
  }

  // 3. Redis frozen (SIGSTOP) for freezeMs while calls keep coming.
  say(`freezing redis-server (SIGSTOP) for ${SETTINGS.freezeMs} ms under each Redis limiter…`);
  const freezes: FreezeResult[] = [];
  freezes.push(await freezeTest('gcra-redis (ours)', gcraSubject(ours, HUGE, HUGE), redis.process, logs));
  await sleep(1500);
  freezes.push(await freezeTest('rlf-redis', rlfSubject(rlfClient, 'rlf-redis', HUGE), redis.process));
  await sleep(500);
  freezes.push(await freezeTest('rlf-redis + insuranceLimiter', rlfSubject(rlfClient, 'rlf-redis + insurance', HUGE, undefined, true), redis.process));
  await sleep(500);
  const plain = await ready(new Redis({ host: '127.0.0.1', port: redis.port })) as Redis;
  freezes.push(await freezeTest('rlf-redis, default ioredis', rlfSubject(plain, 'rlf-redis (default ioredis)', HUGE), redis.process));

  // Report.
  say();
  say(`latency (${SETTINGS.sequentialCalls} sequential calls, one at a time) and throughput (${SETTINGS.concurrency} concurrent callers, ${SETTINGS.throughputSec} s): median of ${SETTINGS.rounds} round(s); ratios to memory with the same number of buckets; CPU per call: this process (client) and redis-server`);
  const base = (buckets: number) => perf.find((p) => p.name.startsWith('memory') && p.buckets === buckets);
  say(table(
    ['limiter', 'buckets', 'p50 us', 'p99 us', 'p50:mem', 'p99:mem', 'calls/s', 'calls/s:mem', 'client CPU us/call', 'redis CPU us/call', 'refused', 'errors'],
    perf.map((p) => {
      const m = base(p.buckets);
      const mem = p.name.startsWith('memory');
      return [
        p.name, String(p.buckets), fmt(p.sequential.p50Us, 2), fmt(p.sequential.p99Us, 2),
        mem ? '' : ratio(p.sequential.p50Us, m?.sequential.p50Us), mem ? '' : ratio(p.sequential.p99Us, m?.sequential.p99Us),
        String(Math.round(p.throughput.perSec)), mem ? '' : ratio(p.throughput.perSec, m?.throughput.perSec),
        fmt(p.throughput.clientCpuUsPerCall), mem ? '' : fmt(p.throughput.redisCpuUsPerCall),
        String(p.sequential.refused + p.throughput.refused), String(p.sequential.errors + p.throughput.errors),
      ];
    }),
    new Set([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
  ));
  const g1 = perf.find((p) => p.name.startsWith('gcra') && p.buckets === 1);
  const r1 = perf.find((p) => p.name.startsWith('rlf') && p.buckets === 1);
  const g2 = perf.find((p) => p.name.startsWith('gcra') && p.buckets === 2);
  const r2 = perf.find((p) => p.name.startsWith('rlf') && p.buckets === 2);
  if (g1 && r1 && g2 && r2) {
    say(`gcra-redis / rlf-redis: 1 bucket p50 ${ratio(g1.sequential.p50Us, r1.sequential.p50Us)}, p99 ${ratio(g1.sequential.p99Us, r1.sequential.p99Us)}, calls/s ${ratio(g1.throughput.perSec, r1.throughput.perSec)}; 2 buckets p50 ${ratio(g2.sequential.p50Us, r2.sequential.p50Us)}, p99 ${ratio(g2.sequential.p99Us, r2.sequential.p99Us)}, calls/s ${ratio(g2.throughput.perSec, r2.throughput.perSec)}`);
  }
  say('memory calls go through the same async wrapper as the others (one promise per call); the proxy calls it synchronously.');
  say('2 buckets: ours is one EVAL with both keys (all or nothing); rlf-redis is two RateLimiterRedis.consume() in parallel (two EVALSHAs), refused if either refuses, as its RateLimiterUnion does.');

  say();
  say('correctness');
  say(table(['limiter', 'check', 'expected', 'got', 'result'], checks.map((c) => [c.limiter, c.check, c.expected, c.got, c.pass === null ? 'info' : c.pass ? 'ok' : c.ours ? 'FAIL' : 'differs']), new Set()));
  say();
  say('steady over-limit load: 60 calls/s offered for 3 s against 20/s burst 20 (rlf: 20 points per 1 s window); when calls were admitted');
  say(table(
    ['limiter', 'allowed', 'offered', 'longest gap ms', 'max in any 1 s', 'first retry hint ms', 'allowed per 250 ms'],
    steadySubjects.map((subject, i) => {
      const r = steadyResults[i]!;
      return [subject.name, String(r.allowed), String(r.offered), String(Math.round(r.longestGapMs)), String(r.maxIn1s), r.firstRetryMs === undefined ? '-' : String(Math.round(r.firstRetryMs)), r.allowedPerQuarterSec.join(' ')];
    }),
    new Set([1, 2, 3, 4, 5]),
  ));

  say();
  say(`redis-server frozen (SIGSTOP) for ${SETTINGS.freezeMs} ms, calls offered at 200/s throughout (limit 10000000/s, so every answer should be "allowed"); "stalled" = took >= 400 ms or never answered; pending = unanswered 3 s after the load ended`);
  say(table(
    ['limiter', 'calls in freeze', 'allowed', 'refused', 'errors', 'pending', 'stalled', 'p50 ms', 'max ms', 'errors outside freeze', 'back on Redis after thaw'],
    freezes.map((f) => [f.name, String(f.inFreeze.calls), String(f.inFreeze.allowed), String(f.inFreeze.refused), String(f.inFreeze.errors), String(f.inFreeze.pending), String(f.inFreeze.stalled), fmt(f.inFreeze.p50Ms), fmt(f.inFreeze.maxMs), String(f.outside.errors), f.recoveryMs === undefined ? '-' : `${Math.round(f.recoveryMs)} ms`]),
    new Set([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
  ));
  const ourFreeze = freezes[0]!;
  if (ourFreeze.logs.length) say(`gcra-redis log during its freeze test: ${ourFreeze.logs.map((l) => l.replace(/\{.*"msg":"([^"]*)".*\}/, '$1')).join('; ')}`);

  say();
  say('semantics:');
  say('  gcra-redis / memory: GCRA (a token bucket kept as one timestamp per key) on Redis\'s clock: the bucket refills continuously, one call per');
  say('    period/rate after a burst; retry-after is the time to the next token; a refused call spends nothing; several buckets are taken together or not');
  say('    at all, in one EVAL. On a Redis error or a 500 ms timeout it falls back to per-instance memory buckets for 1 s, then tries Redis again.');
  say('  rlf-redis: rate-limiter-flexible\'s RateLimiterRedis is a fixed-window counter (SET NX EX + INCRBY; the window starts at the key\'s first call');
  say('    and lasts `duration` whole seconds): `points` calls per window, then nothing until the key expires, then a full burst again (2 x points can');
  say('    pass within a second across a window edge, as GCRA\'s burst + refill allows, but the fixed window repeats that burst every window, where GCRA');
  say('    paces at the rate after one burst); msBeforeNext is the time to the window\'s end; refused calls still increment the counter. Several limits are');
  say('    separate calls (RateLimiterUnion): a call refused by one still spends the others. On a Redis error the promise rejects with the error');
  say('    (the caller decides), or, with `insuranceLimiter`, the call is answered by that in-memory limiter, each call after its own timeout.');
  say('    Only whole-second durations, and no burst distinct from the rate (`20/s burst 40` has no equivalent).');

  const failed = checks.filter((c) => c.ours && c.pass === false);
  if (ourFreeze.inFreeze.errors > 0 || ourFreeze.inFreeze.pending > 0) failed.push({ limiter: ourFreeze.name, check: 'redis frozen', expected: 'no errors, nothing pending (fall back)', got: `${ourFreeze.inFreeze.errors} errors, ${ourFreeze.inFreeze.pending} pending`, pass: false, ours: true });

  const steadyOut = steadySubjects.map((subject, i) => ({ limiter: subject.name, ...steadyResults[i]! }));
  const out = { started: started.toISOString(), node: process.version, cpus: cpus().length, redis: redis.version, versions, settings: SETTINGS, perf, checks, steady: steadyOut, freezes, failures: failed };
  const resultsDir = join(BENCH_DIR, 'results');
  await mkdir(resultsDir, { recursive: true });
  const file = join(resultsDir, `ratelimit-${started.toISOString().replace(/[:.]/g, '-')}.json`);
  await writeFile(file, `${JSON.stringify(out, null, 2)}\n`);
  say();
  say(`results written to ${file}`);

  await ours.close();
  await cleanup();
  clearTimeout(budget);
  if (failed.length) {
    say(`RATE-LIMIT BENCH FAILED: ${failed.length} check(s)`);
    for (const f of failed) say(`  FAIL: ${f.limiter}: ${f.check}: expected ${f.expected}, got ${f.got}`);
    return 1;
  }
  say('all checks of our limiters passed');
  return 0;
}

async function pkgVersion(name: string): Promise<string> {
  try {
    return (JSON.parse(await readFile(join(BENCH_DIR, '..', 'node_modules', name, 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

let exitCode = 1;
try {
  exitCode = await main();
} catch (err) {
  process.stderr.write(`\nrate-limit bench failed: ${(err as Error)?.stack ?? String(err)}\n`);
  await cleanup();
  exitCode = 1;
}
process.exit(exitCode);
