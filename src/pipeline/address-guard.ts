import { lookup as dnsLookup, type LookupAddress } from 'node:dns';
import { BlockList, isIP } from 'node:net';

/**
 * Refuse upstream addresses a route did not opt into: private, loopback, link-local (which holds
 * cloud metadata at 169.254.169.254), CGNAT, unspecified, multicast and reserved ranges, in IPv4
 * and IPv6, and IPv4 hidden in IPv6 (mapped, compatible, NAT64, 6to4, Teredo). The check runs on
 * the address the connection will use: the connector's own DNS lookup is replaced, so a name that
 * resolves differently between a check and the connect (DNS rebinding) cannot slip through.
 */
const BLOCKED = new BlockList();
for (const [net, bits] of [
  ['0.0.0.0', 8], ['10.0.0.0', 8], ['100.64.0.0', 10], ['127.0.0.0', 8], ['169.254.0.0', 16], ['172.16.0.0', 12],
  ['192.0.0.0', 24], ['192.0.2.0', 24], ['192.88.99.0', 24], ['192.168.0.0', 16], ['198.18.0.0', 15], ['198.51.100.0', 24],
  ['203.0.113.0', 24], ['224.0.0.0', 4], ['240.0.0.0', 4],
] as const) BLOCKED.addSubnet(net, bits, 'ipv4');
for (const [net, bits] of [
  ['::', 128], ['::1', 128], ['fc00::', 7], ['fe80::', 10], ['fec0::', 10], ['ff00::', 8], ['2001:db8::', 32], ['100::', 64],
] as const) BLOCKED.addSubnet(net, bits, 'ipv6');

/** The IPv4 address carried inside an IPv6 one, when it carries one. */
function embeddedIPv4(address: string): string | undefined {
  const lower = address.toLowerCase();
  const dotted = /^(?:::ffff:|::|64:ff9b::)(\d+\.\d+\.\d+\.\d+)$/.exec(lower);
  if (dotted) return dotted[1];
  const groups = expand(lower);
  if (!groups) return undefined;
  const v4 = (hi: number, lo: number) => `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
  if (groups.slice(0, 5).every((g) => g === 0) && (groups[5] === 0xffff || groups[5] === 0)) return v4(groups[6]!, groups[7]!); // mapped, compatible
  if (groups[0] === 0x64 && groups[1] === 0xff9b) return v4(groups[6]!, groups[7]!); // NAT64
  if (groups[0] === 0x2002) return v4(groups[1]!, groups[2]!); // 6to4
  if (groups[0] === 0x2001 && groups[1] === 0) return v4(groups[6]! ^ 0xffff, groups[7]! ^ 0xffff); // Teredo client
  return undefined;
}

function expand(address: string): number[] | undefined {
  if (address.includes('.')) return undefined;
  const [head, tail] = address.split('::');
  const h = head ? head.split(':') : [];
  const t = tail !== undefined && tail !== '' ? tail.split(':') : [];
  const missing = 8 - h.length - t.length;
  if (address.includes('::') ? missing < 1 : missing !== 0) return undefined;
  return [...h, ...Array<string>(address.includes('::') ? missing : 0).fill('0'), ...t].map((g) => Number.parseInt(g, 16));
}

export function isPrivateAddress(address: string): boolean {
  const family = isIP(address);
  if (family === 4) return BLOCKED.check(address, 'ipv4');
  if (family === 6) {
    const inner = embeddedIPv4(address);
    if (inner !== undefined && isIP(inner) === 4) return BLOCKED.check(inner, 'ipv4');
    return BLOCKED.check(address, 'ipv6');
  }
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
