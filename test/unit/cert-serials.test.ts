import { describe, expect, it } from 'vitest';
import { serial } from '../../src/certs/ca.ts';
import { serialKey } from '../../src/certs/revocations.ts';

describe('certificate serial numbers', () => {
  it('are 16 bytes whose first is 0x01–0x7f: positive and minimal DER, never a leading zero byte', () => {
    const firsts = new Set<number>();
    for (let i = 0; i < 20_000; i++) {
      const s = serial();
      expect(s).toMatch(/^[0-9a-f]{32}$/);
      const first = Number.parseInt(s.slice(0, 2), 16);
      expect(first).toBeGreaterThanOrEqual(0x01);
      expect(first).toBeLessThanOrEqual(0x7f);
      firsts.add(first);
    }
    // Random, not fixed: nearly every allowed first byte turns up.
    expect(firsts.size).toBeGreaterThan(120);
  });

  it('compare without case or leading zeros, as Node reports them', () => {
    expect(serialKey('00AB12')).toBe('ab12');
    expect(serialKey('0000ab12')).toBe('ab12');
    expect(serialKey('7F00')).toBe('7f00');
    expect(serialKey('0')).toBe('0');
    expect(serialKey('00')).toBe('0');
  });
});
