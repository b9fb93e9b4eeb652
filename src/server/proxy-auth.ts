/** `Basic base64(caller:token)` (what HTTPS_PROXY=http://caller:token@… sends) or `Bearer token`. */
export function proxyToken(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const bearer = /^Bearer (\S+)$/i.exec(header);
  if (bearer) return bearer[1];
  const basic = /^Basic ([A-Za-z0-9+/=]+)$/i.exec(header);
  if (!basic) return undefined;
  const decoded = Buffer.from(basic[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon === -1 ? undefined : decodeURIComponent(decoded.slice(colon + 1));
}
