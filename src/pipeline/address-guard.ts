import { lookup as dnsLookup, type LookupAddress } from 'node:dns';
import { BlockList, isIP } from 'node:net';

/**
 * Refuse upstream addresses a route did not opt into: private, loopback, link-local (which holds
 * cloud metadata at 169.254.169.254), CGNAT, unspecified, multicast and reserved ranges, in IPv4
 * and IPv6, and IPv4 hidden in IPv6 (see embeddedIPv4). The check runs on the address the
 * connection will use: the connector's own DNS lookup is replaced, so a name that resolves
 * differently between a check and the connect (DNS rebinding) cannot slip through.
 */
const BLOCKED = new BlockList();
for (const [net, bits] of [
  ['0.0.0.0', 8], ['10.0.0.0', 8], ['100.64.0.0', 10], ['127.0.0.0', 8], ['169.254.0.0', 16], ['172.16.0.0', 12],
  ['192.0.0.0', 24], ['192.0.2.0', 24], ['192.88.99.0', 24], ['192.168.0.0', 16], ['198.18.0.0', 15], ['198.51.100.0', 24],
  ['203.0.113.0', 24], ['224.0.0.0', 4], ['240.0.0.0', 4],
] as const) BLOCKED.addSubnet(net, bits, 'ipv4');
// 64:ff9b:1::/48 is NAT64 for local use (RFC 8215): not global, and where the IPv4 address sits in
// it depends on the prefix length its operator chose, so the whole prefix is refused.
for (const [net, bits] of [
  ['::', 128], ['::1', 128], ['fc00::', 7], ['fe80::', 10], ['fec0::', 10], ['ff00::', 8], ['2001:db8::', 32], ['100::', 64], ['64:ff9b:1::', 48],
] as const) BLOCKED.addSubnet(net, bits, 'ipv6');

/**
 * The IPv4 addresses an IPv6 address carries, in every form that carries one: mapped
 * (::ffff:a.b.c.d) and compatible (::a.b.c.d, RFC 4291 §2.5.5), translated (::ffff:0:a.b.c.d,
 * SIIT, RFC 6052 / 6145), NAT64's well-known prefix (64:ff9b::/96, RFC 6052), 6to4 (2002::/16,
 * RFC 3056), Teredo's server and client (2001::/32, RFC 4380), and ISATAP's interface identifier
 * (…:0:5efe:a.b.c.d under any prefix, u/g bits either way, RFC 5214).
 */
function embeddedIPv4(address: string): string[] {
  const g = groups(address);
  if (!g) return [];
  const v4 = (hi: number, lo: number) => `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
  const zero = (from: number, to: number) => g.slice(from, to).every((x) => x === 0);
  const found: string[] = [];
  if (zero(0, 5) && (g[5] === 0xffff || g[5] === 0)) found.push(v4(g[6]!, g[7]!)); // mapped, compatible
  if (zero(0, 4) && g[4] === 0xffff && g[5] === 0) found.push(v4(g[6]!, g[7]!)); // translated (SIIT)
  if (g[0] === 0x64 && g[1] === 0xff9b) found.push(v4(g[6]!, g[7]!)); // NAT64
  if (g[0] === 0x2002) found.push(v4(g[1]!, g[2]!)); // 6to4
  if (g[0] === 0x2001 && g[1] === 0) found.push(v4(g[2]!, g[3]!), v4(g[6]! ^ 0xffff, g[7]! ^ 0xffff)); // Teredo server, client (obfuscated)
  if ((g[4]! & 0xfcff) === 0 && g[5] === 0x5efe) found.push(v4(g[6]!, g[7]!)); // ISATAP
  return found;
}

/** The eight 16-bit groups of a valid IPv6 address (isIP said so), a dotted IPv4 tail included. */
function groups(address: string): number[] | undefined {
  let text = address.toLowerCase();
  const dotted = /^(.*:)(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (dotted) {
    const [a, b, c, d] = dotted.slice(2).map(Number) as [number, number, number, number];
    text = `${dotted[1]}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = text.split('::');
  const h = head ? head.split(':') : [];
  const t = tail !== undefined && tail !== '' ? tail.split(':') : [];
  const compressed = tail !== undefined;
  const missing = 8 - h.length - t.length;
  if (compressed ? missing < 1 : missing !== 0) return undefined;
  return [...h, ...Array<string>(compressed ? missing : 0).fill('0'), ...t].map((x) => Number.parseInt(x, 16));
}

export function isPrivateAddress(address: string): boolean {
  const family = isIP(address);
  if (family === 4) return BLOCKED.check(address, 'ipv4');
  if (family === 6) return BLOCKED.check(address, 'ipv6') || embeddedIPv4(address).some((inner) => BLOCKED.check(inner, 'ipv4'));
  return true;
}

export class PrivateAddressError extends Error {
  readonly code = 'EGRESS_PRIVATE_ADDRESS';
  constructor(host: string) {
    super(`${host} resolves to a private or reserved address, and the route does not allow private addresses`);
  }
}

type LookupCallback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

/**
 * A `lookup` for net/tls connect options: resolve, refuse any private answer, connect to the
 * address that was checked. (An IP-literal host never reaches lookup: see checkLiteral.)
 */
export function guardedLookup(hostname: string, options: { all?: boolean; family?: number }, callback: LookupCallback): void {
  dnsLookup(hostname, { all: true, family: options.family ?? 0 }, (err, addresses) => {
    if (err) return callback(err, '');
    const list = addresses as LookupAddress[];
    if (list.length === 0 || list.some((a) => isPrivateAddress(a.address))) return callback(new PrivateAddressError(hostname), '');
    if (options.all) return callback(null, list);
    return callback(null, list[0]!.address, list[0]!.family);
  });
}

/** For an IP-literal upstream (which skips DNS): refuse it up front unless private addresses are allowed. */
export function checkLiteral(host: string): void {
  const bare = host.replace(/^\[|\]$/g, '');
  if (isIP(bare) !== 0 && isPrivateAddress(bare)) throw new PrivateAddressError(host);
}
