// The part of autocannon's programmatic API the bench uses (autocannon ships no types).
declare module 'autocannon' {
  import type { EventEmitter } from 'node:events';

  interface Options {
    url: string;
    connections?: number;
    duration?: number;
    method?: string;
    headers?: Record<string, string>;
    body?: string | Buffer;
    pipelining?: number;
    overallRate?: number;
    connectionRate?: number;
    timeout?: number;
    excludeErrorStats?: boolean;
    setupClient?: (client: Client) => void;
  }

  /** autocannon's per-connection client (lib/httpClient.js); `_doRequest` is internal. */
  interface Client extends EventEmitter {
    destroyed: boolean;
    _doRequest: (...args: unknown[]) => void;
  }

  interface Histogram {
    average: number;
    mean: number;
    stddev: number;
    min: number;
    max: number;
    total: number;
    p50: number;
    p90: number;
    p99: number;
    [key: string]: number;
  }

  interface Result {
    requests: Histogram;
    latency: Histogram;
    throughput: Histogram;
    errors: number;
    timeouts: number;
    mismatches: number;
    non2xx: number;
    resets: number;
    duration: number;
    statusCodeStats: Record<string, { count: number }>;
    '1xx': number;
    '2xx': number;
    '3xx': number;
    '4xx': number;
    '5xx': number;
  }

  interface Instance extends EventEmitter, PromiseLike<Result> {}

  function autocannon(options: Options): Instance;
  export default autocannon;
  export type { Client, Instance, Options, Result };
}
