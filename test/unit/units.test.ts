import { describe, expect, it } from 'vitest';
import { formatDuration, parseDuration, parseRate, parseSize } from '../../src/config/units.ts';

describe('parseDuration', () => {
  it.each([
    ['500ms', 500], ['5s', 5000], ['2m', 120_000], ['2min', 120_000], ['24h', 86_400_000], ['90d', 7_776_000_000], ['0', 0], ['1.5s', 1500], [' 5s ', 5000],
  ])('%j -> %d ms', (text, ms) => expect(parseDuration(text)).toBe(ms));

  it.each(['', '5', '5 sec', '-1s', '5S', 's', '1e3ms', '5sconstructor', 'constructor', '5 constructor'])('refuses %j', (text) => {
    expect(parseDuration(text)).toBeUndefined();
  });
});

describe('parseSize', () => {
  it.each([
    ['1mb', 1024 ** 2], ['512kb', 512 * 1024], ['100b', 100], ['100', 100], ['1GB', 1024 ** 3], ['1.5kb', 1536], [2048, 2048],
  ] as const)('%j -> %d bytes', (text, bytes) => expect(parseSize(text)).toBe(bytes));

  it.each(['', 'lots', '1tb', '-1', '1 constructor', 1.5, -1, Number.NaN, Number.POSITIVE_INFINITY])('refuses %j', (text) => {
    expect(parseSize(text)).toBeUndefined();
  });
});

describe('parseRate', () => {
  it.each([
    ['20/s', 20, 1000], ['300/min', 300, 60_000], ['10000/day', 10_000, 86_400_000], ['5/hour', 5, 3_600_000], ['7 / second', 7, 1000], ['1/M', 1, 60_000],
  ])('%j -> %d per %d ms', (text, count, periodMs) => expect(parseRate(text)).toEqual({ count, periodMs }));

  it.each(['20/fortnight', '0/s', '-1/s', '1.5/s', '20', '/s', '20/', 's/20', '99999999999999999999/s'])('refuses %j', (text) => {
    expect(parseRate(text)).toBeUndefined();
  });

  // Period names are looked up in a plain object: inherited names must not count as periods.
  it.each(['20/constructor', '20/tostring', '20/valueof', '20/hasownproperty'])('refuses the inherited name %j', (text) => {
    expect(parseRate(text)).toBeUndefined();
  });
});

describe('formatDuration', () => {
  it.each([[86_400_000, '1d'], [7_200_000, '2h'], [120_000, '2m'], [5000, '5s'], [1500, '1500ms'], [0, '0s']])('%d -> %j', (ms, text) => {
    expect(formatDuration(ms)).toBe(text);
  });

  it('round-trips through parseDuration', () => {
    for (const ms of [0, 1, 999, 1000, 61_000, 3_600_000, 86_400_000 * 3]) expect(parseDuration(formatDuration(ms))).toBe(ms);
  });
});
