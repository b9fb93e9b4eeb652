/**
 * Shared by the bench orchestrator (bench/run.ts) and its child processes: the fixed credential
 * values, the settings taken from BENCH_* variables, and the shapes of the IPC messages.
 */

/** The credential stored in egress-proxy and injected by every other proxy. */
export const CLIENT_ID = 'bench-client';
export const SECRET = 'bench-secret-0123456789';
export const CALLER = 'bench-caller';
export const TOKEN_HEADER = 'x-egress-token';

/** The path the upstream serves; proxies are called on `/bench` + this. */
export const UPSTREAM_PATH = '/accounts/get';
export const PROXY_PREFIX = '/bench';
/** Headers the bench's pass-through proxies (bare, min) do not pass on, in either direction. */
export const HOP_BY_HOP: ReadonlySet<string> = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'host']);

export interface BenchSettings {
  /** Seconds per measured scenario. */
  readonly durationSec: number;
  /** Seconds of unrecorded load per target (GET, then POST) before its measured scenarios. */
  readonly warmupSec: number;
  readonly connections: number;
  /** Connections of the fixed-rate scenarios: enough that each sends at most 50 req/s (one per 20 ms), so the offered rate holds while latency stays under 20 ms. */
  readonly rateConnections: number;
  /** Offered load of the fixed-rate scenarios, requests per second across all connections. */
  readonly rate: number;
  /** Size of the JSON POST body, bytes. */
  readonly bodyBytes: number;
  /** Measured rounds (each: every scenario x every target); the tables show the median per cell. */
  readonly rounds: number;
  readonly quick: boolean;
  /** Optional subset of targets (BENCH_TARGETS=direct,egress,...); all by default. */
  readonly targets: readonly string[] | undefined;
  /** BENCH_LOAD: the load generator (saturation and fixed rate); undefined = wrk when it is on PATH, else autocannon. */
  readonly load: 'wrk' | 'autocannon' | undefined;
}

/** A BENCH_* number from the environment, `fallback` when unset; out of [min, max] is an error. */
export function numberSetting(env: NodeJS.ProcessEnv, name: string, fallback: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < min || value > max) throw new Error(`${name} must be a number between ${min} and ${max} (got "${raw}")`);
  return value;
}

export function readSettings(env: NodeJS.ProcessEnv): BenchSettings {
  const quick = env.BENCH_QUICK === '1' || env.BENCH_QUICK === 'true';
  const num = (name: string, fallback: number, min: number, max: number) => numberSetting(env, name, fallback, min, max);
  // autocannon checks its stop flag once a second, so a run lasts a whole number of seconds.
  const durationSec = Math.round(num('BENCH_DURATION', quick ? 1 : 5, 1, 600));
  const warmupSec = Math.round(num('BENCH_WARMUP', quick ? 1 : 3, 0, 60));
  const targets = env.BENCH_TARGETS ? env.BENCH_TARGETS.split(',').map((s) => s.trim()).filter(Boolean) : undefined;
  const connections = Math.round(num('BENCH_CONNECTIONS', 10, 1, 1000));
  const rate = Math.round(num('BENCH_RATE', 2000, 1, 1_000_000));
  const load = env.BENCH_LOAD || undefined;
  if (load !== undefined && load !== 'wrk' && load !== 'autocannon') throw new Error(`BENCH_LOAD must be wrk or autocannon (got "${load}")`);
  return {
    durationSec,
    warmupSec,
    connections,
    rateConnections: Math.min(rate, Math.max(connections, Math.ceil(rate / 50))),
    rate,
    bodyBytes: Math.round(num('BENCH_BODY_BYTES', 2048, 16, 1_000_000)),
    rounds: Math.round(num('BENCH_ROUNDS', 1, 1, 100)),
    quick,
    targets,
    load,
  };
}

/** The median of the finite values; NaN when there are none. */
export function median(values: readonly number[]): number {
  const sorted = values.filter(Number.isFinite).sort((a, b) => a - b);
  if (sorted.length === 0) return Number.NaN;
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** A JSON document of exactly `bytes` bytes, shaped like a provider API call. */
export function jsonBody(bytes: number): string {
  const head = `{"access_token":"access-sandbox-bench","options":{"account_ids":["acc-1","acc-2"]},"padding":"`;
  const tail = '"}';
  const fill = Math.max(0, bytes - head.length - tail.length);
  const body = head + 'x'.repeat(fill) + tail;
  if (Buffer.byteLength(body) !== bytes) throw new Error(`body must be at least ${head.length + tail.length} bytes`);
  return body;
}

// ---- IPC between the orchestrator and its children ------------------------------------------

export interface ReadyMessage {
  readonly type: 'ready';
  readonly port: number;
}

export interface UpstreamStats {
  requests: number;
  ok: number;
  /** Requests without `plaid-secret: <SECRET>`: answered 401. */
  missingSecret: number;
  /** Requests whose plaid-client-id is not CLIENT_ID (counted, still answered). */
  badClientId: number;
  /** Requests that still carried the caller token (X-Egress-Token). */
  tokenSeen: number;
  /** POSTs whose body was not exactly the expected size. */
  badBody: number;
  /** Requests for any path other than UPSTREAM_PATH. */
  wrongPath: number;
  get: number;
  post: number;
}

export function emptyStats(): UpstreamStats {
  return { requests: 0, ok: 0, missingSecret: 0, badClientId: 0, tokenSeen: 0, badBody: 0, wrongPath: 0, get: 0, post: 0 };
}

export function diffStats(after: UpstreamStats, before: UpstreamStats): UpstreamStats {
  const out = emptyStats();
  for (const key of Object.keys(out) as (keyof UpstreamStats)[]) out[key] = after[key] - before[key];
  return out;
}

export interface LoadJob {
  readonly url: string;
  readonly method: 'GET' | 'POST';
  readonly headers: Record<string, string>;
  readonly body?: string;
  readonly connections: number;
  readonly durationSec: number;
  /** Fixed offered load, requests a second: wrk's paced schedule, or autocannon's overallRate spread evenly over each second. */
  readonly overallRate?: number;
  /** Per-request timeout, seconds. */
  readonly timeoutSec: number;
  /** 'wrk' runs wrk instead of autocannon (see bench/load.ts). */
  readonly generator?: 'wrk' | 'autocannon';
}

export interface LatencySummary {
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
  readonly p999: number;
  readonly max: number;
  readonly mean: number;
  readonly samples: number;
}

export interface LoadResult {
  /** autocannon's requests.average: responses per second, mean of its one-second samples. */
  readonly rps: number;
  readonly responses: number;
  readonly durationSec: number;
  /** Exact percentiles over every response, from autocannon's per-response timings (ms, float). */
  readonly latencyMs: LatencySummary;
  /** autocannon's own histogram (whole milliseconds; with a rate, corrected for coordinated omission). */
  readonly autocannonLatencyMs: { readonly p50: number; readonly p99: number };
  readonly errors: number;
  readonly timeouts: number;
  readonly non2xx: number;
  readonly statusCodes: Record<string, number>;
}

export type LoadRequest = { readonly type: 'run'; readonly id: number; readonly job: LoadJob };
export type LoadReply =
  | { readonly type: 'result'; readonly id: number; readonly result: LoadResult }
  | { readonly type: 'error'; readonly id: number; readonly message: string };

export type StatsRequest = { readonly type: 'stats'; readonly id: number };
export type StatsReply = { readonly type: 'stats'; readonly id: number; readonly stats: UpstreamStats };

/** For child entry points: exit when the orchestrator goes away, however it went. */
export function exitWithParent(): void {
  process.on('disconnect', () => process.exit(0));
  process.on('SIGTERM', () => process.exit(0));
  process.on('SIGINT', () => process.exit(0));
}

export function sleep(ms: number): Promise<void> {
  // A deadline computed a moment after it was checked can be a hair in the past: not a negative timeout.
  return new Promise((resolveSleep) => setTimeout(resolveSleep, Math.max(0, ms)));
}

/** Reject with `what` when `promise` has not settled within `ms`. */
export function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${Math.round(ms / 1000)} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
