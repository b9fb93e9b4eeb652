import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { apiKeyRoute, bearerRoute } from '../helpers/routes.ts';

let upstream: Upstream;
beforeAll(async () => {
  upstream = await startUpstream();
});
afterAll(async () => {
  await upstream?.close();
});

const routeFile = (...paths: string[]) => bearerRoute({ upstream: upstream.url, paths });

describe('route reload', () => {
  let proxy: TestProxy;
  afterEach(async () => {
    await proxy?.close();
  });

  it('applies a valid change, and keeps serving the last good config when a file turns invalid', async () => {
    proxy = await startTestProxy({ routes: { api: routeFile('/a') }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    const get = (path: string) => fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': proxy.tokens.svc! } }).then((r) => r.status);
    expect(await get('/api/a')).toBe(200);
    expect(await get('/api/b')).toBe(403);

    await writeFile(join(proxy.routesDir, 'api.yaml'), routeFile('/a', '/b'));
    await eventually(async () => (await get('/api/b')) === 200, 5_000, 'the new rule to apply');

    // An invalid file (unknown key) next to the good one: the folder is rejected whole.
    await writeFile(join(proxy.routesDir, 'broken.yaml'), 'name: broken\nprefix: /broken\nupstreem: http://x\n');
    await eventually(async () => {
      const ready = (await (await fetch(`${proxy.admin}/readyz`)).json()) as { routes: { last_reload_error?: { errors: string[] } } };
      return (ready.routes.last_reload_error?.errors.join('\n') ?? '').includes('broken.yaml:3:1');
    }, 5_000, 'the rejected reload to show in /readyz');
    expect(await get('/api/a')).toBe(200);
    expect(await get('/api/b')).toBe(200);
    expect(proxy.logs()).toContain('route reload rejected');

    // Even a change to the good file is not applied while the folder is invalid.
    await writeFile(join(proxy.routesDir, 'api.yaml'), routeFile('/a'));
    await new Promise((r) => setTimeout(r, 500));
    expect(await get('/api/b')).toBe(200);

    await rm(join(proxy.routesDir, 'broken.yaml'));
    await eventually(async () => (await get('/api/b')) === 403, 5_000, 'the fixed folder to apply');
    const metrics = await (await fetch(`${proxy.admin}/metrics`)).text();
    expect(metrics).toMatch(/egress_config_reloads_total\{result="rejected"\} [1-9]/);
    expect(metrics).toMatch(/egress_config_reloads_total\{result="ok"\} [1-9]/);
  });
  it('warns, at start and at each reload, of a host two routes share as their upstream without naming it in hosts: (forward mode does not intercept it)', async () => {
    // A host name, not an address: forward mode intercepts names only.
    const named = upstream.url.replace('127.0.0.1', 'localhost');
    proxy = await startTestProxy({ routes: { api: apiKeyRoute({ upstream: named, paths: ['/a'] }) }, credentials: { key: { secret: 'sk_1234567890' } }, callers: ['svc'] });
    expect(proxy.logs()).not.toContain('forward mode does not intercept it');
    await writeFile(join(proxy.routesDir, 'api2.yaml'), apiKeyRoute({ upstream: named, name: 'api2', paths: ['/a'] }));
    await eventually(() => proxy.logs().includes('is the upstream host of api.yaml and api2.yaml, and neither names it in hosts: forward mode does not intercept it'), 5_000, 'the warning');
  });
});

describe('SIGHUP on the real process', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    await serve?.stop();
  });

  it('reloads on SIGHUP, and a rejected reload keeps the old routes', async () => {
    const dir = await makeTempDir();
    const { tokens } = await seedDataDir(dir, { routes: { api: routeFile('/a') }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const get = (path: string) => fetch(`${serve!.url}${path}`, { headers: { 'x-egress-token': tokens.svc! } }).then((r) => r.status);
    expect(await get('/api/a')).toBe(200);

    await writeFile(join(dir, 'routes', 'api.yaml'), `${routeFile('/a', '/c')}bogus: 1\n`);
    serve.child.kill('SIGHUP');
    await eventually(() => serve!.output().includes('route reload rejected'), 5_000, 'the rejection to be logged');
    expect(serve.output()).toMatch(/api\.yaml:\d+:\d+: unknown key \\"bogus\\"/);
    expect(await get('/api/a')).toBe(200);
    expect(await get('/api/c')).toBe(403);

    await writeFile(join(dir, 'routes', 'api.yaml'), routeFile('/a', '/c'));
    serve.child.kill('SIGHUP');
    await eventually(async () => (await get('/api/c')) === 200, 5_000, 'SIGHUP reload');
    // Audit lines are written in batches, at most 10 ms after the response has gone.
    await eventually(async () => (await readFile(join(dir, 'audit.log'), 'utf8')).includes('"path":"/api/c"'), 2_000, 'the audit line of /api/c');
  });
});
