import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { checkLiteral, isPrivateAddress } from '../../src/pipeline/address-guard.ts';

describe('isPrivateAddress', () => {
  it.each([
    '127.0.0.1', '127.255.255.254', '10.0.0.1', '172.16.0.1', '172.31.255.255', '192.168.1.1', '169.254.169.254', '100.64.0.1',
    '0.0.0.0', '224.0.0.1', '255.255.255.255', '198.18.0.1', '::', '::1', 'fd00::1', 'fc00::1', 'fe80::1', 'ff02::1',
    '::ffff:127.0.0.1', '::ffff:7f00:1', '::127.0.0.1', '64:ff9b::a9fe:a9fe', '2002:a9fe:a9fe::1', '2001:0:4136:e378:8000:63bf:f5ff:fffe',
  ])('refuses %s', (address) => expect(isPrivateAddress(address)).toBe(true));

  it.each(['8.8.8.8', '1.1.1.1', '172.32.0.1', '100.128.0.1', '2606:4700:4700::1111', '::ffff:8.8.8.8', '2002:0808:0808::1'])('allows %s', (address) => {
    expect(isPrivateAddress(address)).toBe(false);
  });

  it('treats anything that is not an IP address as refused', () => {
    expect(isPrivateAddress('localhost')).toBe(true);
    expect(isPrivateAddress('')).toBe(true);
  });

  it('a private IPv4 address stays refused in every IPv6 form that carries it (property)', () => {
    const privateV4 = fc.oneof(
      fc.tuple(fc.constant(10), fc.nat(255), fc.nat(255), fc.nat(255)),
      fc.tuple(fc.constant(127), fc.nat(255), fc.nat(255), fc.nat(255)),
      fc.tuple(fc.constant(169), fc.constant(254), fc.nat(255), fc.nat(255)),
      fc.tuple(fc.constant(192), fc.constant(168), fc.nat(255), fc.nat(255)),
    );
    fc.assert(fc.property(privateV4, ([a, b, c, d]) => {
      const hex = (x: number, y: number) => ((x << 8) | y).toString(16);
      for (const form of [`${a}.${b}.${c}.${d}`, `::ffff:${a}.${b}.${c}.${d}`, `::ffff:${hex(a, b)}:${hex(c, d)}`, `64:ff9b::${hex(a, b)}:${hex(c, d)}`, `2002:${hex(a, b)}:${hex(c, d)}::1`]) {
        expect(isPrivateAddress(form), form).toBe(true);
      }
    }));
  });

  it('checkLiteral refuses private IP-literal hosts (bracketed IPv6 too) and leaves names to the resolver', () => {
    expect(() => checkLiteral('127.0.0.1')).toThrow(/private/);
    expect(() => checkLiteral('[::1]')).toThrow(/private/);
    expect(() => checkLiteral('8.8.8.8')).not.toThrow();
    expect(() => checkLiteral('api.plaid.com')).not.toThrow();
  });
});
