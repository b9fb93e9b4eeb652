import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import { checkLiteral, guardedLookup, isPrivateAddress, PrivateAddressError } from '../../src/pipeline/address-guard.ts';

// Hoisted by vitest: names under .rebind.test get the queued answers; nothing is asked of a real resolver for them.
const dnsAnswers = vi.hoisted(() => ({ queue: [] as { address: string; family: number }[][] }));
vi.mock('node:dns', async (importOriginal) => {
  const real = await importOriginal<typeof import('node:dns')>();
  const lookup = (host: string, opts: unknown, cb: (err: NodeJS.ErrnoException | null, a: unknown) => void) => {
    if (host.endsWith('.rebind.test')) return void setImmediate(() => cb(null, dnsAnswers.queue.shift() ?? []));
    return (real.lookup as unknown as (h: string, o: unknown, c: unknown) => void)(host, opts, cb);
  };
  return { ...real, default: { ...real, lookup }, lookup };
});

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
      for (const form of [`${a}.${b}.${c}.${d}`, `::ffff:${a}.${b}.${c}.${d}`, `::ffff:${hex(a, b)}:${hex(c, d)}`, `64:ff9b::${hex(a, b)}:${hex(c, d)}`, `2002:${hex(a, b)}:${hex(c, d)}::1`, `::ffff:0:${hex(a, b)}:${hex(c, d)}`, `0:0:0:0:ffff:0:${a}.${b}.${c}.${d}`, `64:ff9b:0:0:0:0:${a}.${b}.${c}.${d}`, `2001:4860::200:5efe:${a}.${b}.${c}.${d}`]) {
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

describe('IPv4 carried in IPv6: every form is classed by the IPv4 address it carries', () => {
  // [form, a private IPv4 in that form, the same form carrying a public IPv4 (or undefined when the whole prefix is refused)]
  it.each([
    ['IPv4-mapped ::ffff:0:0/96 (RFC 4291 §2.5.5.2)', '::ffff:10.0.0.1', '::ffff:8.8.8.8'],
    ['IPv4-mapped, written out in full', '0:0:0:0:0:ffff:10.0.0.1', '0:0:0:0:0:ffff:8.8.8.8'],
    ['IPv4-compatible ::/96 (RFC 4291 §2.5.5.1)', '::10.0.0.1', '::8.8.8.8'],
    ['IPv4-compatible, written out in full', '0:0:0:0:0:0:10.0.0.1', '0:0:0:0:0:0:8.8.8.8'],
    ['IPv4-translated ::ffff:0:0:0/96 (SIIT, RFC 6052 / 6145)', '::ffff:0:10.0.0.1', '::ffff:0:8.8.8.8'],
    ['IPv4-translated in hex', '::ffff:0:a9fe:a9fe', '::ffff:0:808:808'],
    ['IPv4-translated, written out in full', '0:0:0:0:ffff:0:127.0.0.1', '0:0:0:0:ffff:0:8.8.8.8'],
    ['NAT64 well-known prefix 64:ff9b::/96 (RFC 6052)', '64:ff9b::10.0.0.1', '64:ff9b::8.8.8.8'],
    ['NAT64 well-known prefix, written out in full', '64:ff9b:0:0:0:0:10.0.0.1', '64:ff9b:0:0:0:0:8.8.8.8'],
    // Not global (RFC 8215); where the IPv4 sits depends on the operator's prefix length, here /48 with a public one in the last 32 bits.
    ['NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215)', '64:ff9b:1:a00:0:100:808:808', undefined],
    ['6to4 2002::/16 (RFC 3056)', '2002:a00:1::1', '2002:808:808::1'],
    ['6to4 written with a dotted tail', '2002:a00:1::1.2.3.4', '2002:808:808::1.2.3.4'],
    ['Teredo 2001::/32, the client (RFC 4380)', '2001:0:808:808:8000:63bf:f5ff:fffe', '2001:0:808:808:8000:63bf:f7f7:f7f7'],
    ['Teredo 2001::/32, the server (RFC 4380)', '2001:0:a00:1:8000:63bf:f7f7:f7f7', '2001:0:808:808:8000:63bf:f7f7:f7f7'],
    ['ISATAP interface identifier ::0:5efe:a.b.c.d (RFC 5214)', '2001:4860::5efe:10.0.0.1', '2001:4860::5efe:8.8.8.8'],
    ['ISATAP interface identifier, universal bit set ::200:5efe:a.b.c.d', '2001:4860::200:5efe:a9fe:a9fe', '2001:4860::200:5efe:808:808'],
  ])('%s', (_form, privateForm, publicForm) => {
    expect(isPrivateAddress(privateForm!), privateForm).toBe(true);
    if (publicForm) expect(isPrivateAddress(publicForm), publicForm).toBe(false);
    else expect(isPrivateAddress('64:ff9b:1::808:808')).toBe(true);
  });
});

describe('guardedLookup', () => {
  const ask = (all: boolean) => new Promise<{ err: Error | null; address: unknown }>((resolve) => guardedLookup('x.rebind.test', { all }, (err, address) => resolve({ err, address })));

  it('SSRF-12b a mixed public+private answer, a name that rebinds to loopback on its next lookup, and an empty answer are refused', async () => {
    // Control: a public answer alone is passed through.
    dnsAnswers.queue.push([{ address: '93.184.216.34', family: 4 }]);
    expect(await ask(false)).toEqual({ err: null, address: '93.184.216.34' });
    dnsAnswers.queue.push([{ address: '93.184.216.34', family: 4 }, { address: '127.0.0.1', family: 4 }]);
    expect((await ask(true)).err).toBeInstanceOf(PrivateAddressError);
    // First lookup public (what would be checked), the next ones loopback / metadata (what would be dialled): each is checked on its own.
    dnsAnswers.queue.push([{ address: '93.184.216.34', family: 4 }], [{ address: '::ffff:127.0.0.1', family: 6 }], [{ address: '169.254.169.254', family: 4 }]);
    expect(await ask(false)).toEqual({ err: null, address: '93.184.216.34' });
    expect((await ask(false)).err).toBeInstanceOf(PrivateAddressError);
    expect((await ask(true)).err).toBeInstanceOf(PrivateAddressError);
    dnsAnswers.queue.push([]);
    expect((await ask(true)).err).toBeInstanceOf(PrivateAddressError);
    expect(dnsAnswers.queue).toEqual([]);
  });
});
