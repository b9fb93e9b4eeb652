import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { findRouteByHost } from '../../src/config/compile-routes.ts';
import { ConfigError, loadRoutes } from '../../src/config/load-routes.ts';

/** Which route a forward-mode tunnel to a host belongs to. */
const route = (name: string, upstream: string, hosts?: string) =>
  `name: ${name}\nprefix: /${name}\nupstream: ${upstream}\n${hosts ? `hosts: ${hosts}\n` : ''}credential: c\ninject: { scheme: bearer }\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/x]\n`;

async function folder(files: Record<string, string>): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'egress-hosts-'));
  for (const [name, text] of Object.entries(files)) await writeFile(join(dir, `${name}.yaml`), text);
  return dir;
}

describe('forward-mode hosts', () => {
  it('default to the upstream host name, and never to an IP address', async () => {
    const config = await loadRoutes(await folder({ a: route('a', 'https://api.plaid.com'), b: route('b', 'https://10.0.0.5') }));
    expect(findRouteByHost(config, 'api.plaid.com')?.name).toBe('a');
    expect(findRouteByHost(config, '10.0.0.5')).toBeUndefined();
  });

  it('two routes sharing an upstream without naming it: both load, and the host is not intercepted (ambiguous)', async () => {
    const config = await loadRoutes(await folder({ a: route('a', 'https://api.plaid.com'), b: route('b', 'https://api.plaid.com/v2') }));
    expect(config.routes).toHaveLength(2);
    expect(findRouteByHost(config, 'api.plaid.com')).toBeUndefined();
  });

  it('a route that names a host in hosts wins over a default', async () => {
    const config = await loadRoutes(await folder({ a: route('a', 'https://api.plaid.com'), b: route('b', 'http://127.0.0.1:9', '[api.plaid.com]') }));
    expect(findRouteByHost(config, 'api.plaid.com')?.name).toBe('b');
  });

  it('the same host named in two route files is an error', async () => {
    const dir = await folder({ a: route('a', 'https://x.test', '[api.bank.test]'), b: route('b', 'https://y.test', '[api.bank.test]') });
    await expect(loadRoutes(dir)).rejects.toBeInstanceOf(ConfigError);
  });

  it('hosts are exact lower-case DNS names: no IP, no trailing dot, no upper case, no wildcard', async () => {
    for (const bad of ['[10.0.0.1]', '[api.bank.test.]', '[API.bank.test]', '["*.bank.test"]']) {
      await expect(loadRoutes(await folder({ a: route('a', 'https://x.test', bad) })), bad).rejects.toBeInstanceOf(ConfigError);
    }
  });
});
