/** Parsers for the human units used in route files and flags: durations, sizes and rates. */

// Maps, not object literals: a unit named "constructor" must not find Object.prototype.
const DURATION_UNITS: ReadonlyMap<string, number> = new Map([['ms', 1], ['s', 1000], ['m', 60_000], ['min', 60_000], ['h', 3_600_000], ['d', 86_400_000]]);
const SIZE_UNITS: ReadonlyMap<string, number> = new Map([['b', 1], ['kb', 1024], ['mb', 1024 ** 2], ['gb', 1024 ** 3]]);
const RATE_PERIODS: ReadonlyMap<string, number> = new Map([
  ['s', 1000], ['sec', 1000], ['second', 1000], ['m', 60_000], ['min', 60_000], ['minute', 60_000],
  ['h', 3_600_000], ['hour', 3_600_000], ['d', 86_400_000], ['day', 86_400_000],
]);

/** `500ms`, `5s`, `2m`, `24h`, `90d`, or `0` -> milliseconds. Returns undefined when malformed. */
export function parseDuration(text: string): number | undefined {
  if (text.trim() === '0') return 0;
  const match = /^(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)$/.exec(text.trim());
  if (!match) return undefined;
  const ms = Number(match[1]) * (DURATION_UNITS.get(match[2]!) ?? Number.NaN);
  return Number.isFinite(ms) ? Math.round(ms) : undefined;
}

/** `1mb`, `512kb`, `100b` or a plain byte count -> bytes. */
export function parseSize(text: string | number): number | undefined {
  if (typeof text === 'number') return Number.isSafeInteger(text) && text >= 0 ? text : undefined;
  const match = /^(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)?$/i.exec(text.trim());
  if (!match) return undefined;
  const bytes = Number(match[1]) * (SIZE_UNITS.get((match[2] ?? 'b').toLowerCase()) ?? Number.NaN);
  return Number.isFinite(bytes) ? Math.floor(bytes) : undefined;
}

export interface Rate {
  /** Requests allowed per period. */
  readonly count: number;
  readonly periodMs: number;
}

/** `20/s`, `300/min`, `10000/day` -> { count, periodMs }. */
export function parseRate(text: string): Rate | undefined {
  const match = /^(\d+)\s*\/\s*([a-z]+)$/i.exec(text.trim());
  if (!match) return undefined;
  const count = Number(match[1]);
  const periodMs = RATE_PERIODS.get(match[2]!.toLowerCase());
  if (!periodMs || !Number.isSafeInteger(count) || count < 1) return undefined;
  return { count, periodMs };
}

export function formatDuration(ms: number): string {
  if (ms % 86_400_000 === 0 && ms > 0) return `${ms / 86_400_000}d`;
  if (ms % 3_600_000 === 0 && ms > 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0 && ms > 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}
