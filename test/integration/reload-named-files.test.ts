import { mkdir, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { apiKeyRoute } from '../helpers/routes.ts';
import { makeTestPki, type TestPki } from '../helpers/tls.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * An upstream CA bundle kept outside the routes folder (/etc/ssl/…, a mounted secret) is replaced
 * at its path when it is renewed: the proxy must trust the new bundle without a SIGHUP, by the
 * same rules as the routes folder (a rename over it, a swapped symlink, and a file that vanishes
 * or turns invalid keeps the last good configuration).
 */
let oldCa: TestPki;
let newCa: TestPki;
let upstream: Upstream;

beforeAll(async () => {
  oldCa = makeTestPki({ commonName: 'egress test CA (expiring)' });
  newCa = makeTestPki({ commonName: 'egress test CA (renewed)' });
  // The upstream already presents a certificate from the renewed CA.
  upstream = await startUpstream(undefined, { key: newCa.serverKey, cert: newCa.serverCert });
});

afterAll(async () => {
  await upstream?.close();
});

const route = (caPath: string) => apiKeyRoute({ upstream: upstream.url, extra: `upstream_ca: ${caPath}\n` });

describe('a CA file outside the routes folder', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    await serve?.stop();
    serve = undefined;
  });

  async function start(caPath: string): Promise<{ get: () => Promise<number>; reloadError: () => Promise<string>; routesDir: string }> {
    const dir = await makeTempDir();
    const { tokens } = await seedDataDir(dir, { routes: { api: route(caPath) }, credentials: { key: { secret: 'sk_test_named_files_1234' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const get = () => fetch(`${serve!.url}/api/x`, { headers: { 'x-egress-token': tokens.svc! } }).then(async (r) => (await r.arrayBuffer(), r.status));
    const reloadError = async () => {
      const ready = (await (await fetch(`${serve!.admin}/readyz`)).json()) as { routes: { last_reload_error?: { errors: string[] } } };
      return ready.routes.last_reload_error?.errors.join('\n') ?? '';
    };
    return { get, reloadError, routesDir: join(dir, 'routes') };
  }

  it('replaced by a rename over it, edited in place, turned invalid, removed and put back: reloaded each time without SIGHUP', async () => {
    const outside = await makeTempDir('egress-ca-');
    const caPath = join(outside, 'upstream-ca.pem');
    await writeFile(caPath, oldCa.caCert);
    const { get, reloadError } = await start(caPath);
    expect(await get()).toBe(502);

    // The renewed bundle written beside it and renamed over it (an atomic replace).
    await writeFile(`${caPath}.tmp`, `${oldCa.caCert}${newCa.caCert}`);
    await rename(`${caPath}.tmp`, caPath);
    await eventually(async () => (await get()) === 200, 8_000, 'the renamed-in bundle to be trusted');

    // Turned invalid in place: rejected, alerted, and the last good bundle stays in force.
    await writeFile(caPath, 'not a certificate\n');
    await eventually(async () => (await reloadError()).includes('upstream_ca: the file holds no PEM certificate'), 8_000, 'the invalid file to be rejected');
    await eventually(() => serve!.output().includes('"alert":"reload_rejected"'), 5_000, 'the reload_rejected alert');
    expect(await get()).toBe(200);

    // Removed: rejected the same way.
    await rm(caPath);
    await eventually(async () => (await reloadError()).includes('ENOENT'), 8_000, 'the missing file to be rejected');
    expect(await get()).toBe(200);

    // Put back with the old CA only: loaded, and the upstream is no longer trusted.
    await writeFile(caPath, oldCa.caCert);
    await eventually(async () => (await get()) === 502, 8_000, 'the file put back to be loaded');
    expect(await reloadError()).toBe('');

    // An edit in place (same file, new content) is seen too.
    await writeFile(caPath, newCa.caCert);
    await eventually(async () => (await get()) === 200, 8_000, 'the edited file to be loaded');
  }, 60_000);

  it('a symlink swapped to a new release is followed, and so are later swaps', async () => {
    const outside = await makeTempDir('egress-ca-');
    await mkdir(join(outside, 'v1'));
    await mkdir(join(outside, 'v2'));
    await mkdir(join(outside, 'v3'));
    await writeFile(join(outside, 'v1', 'ca.pem'), oldCa.caCert);
    await writeFile(join(outside, 'v2', 'ca.pem'), newCa.caCert);
    await writeFile(join(outside, 'v3', 'ca.pem'), oldCa.caCert);
    // As a mounted secret is laid out: the path goes through a link that is swapped whole.
    const swap = async (release: string) => {
      await symlink(release, join(outside, 'current.new'));
      await rename(join(outside, 'current.new'), join(outside, 'current'));
    };
    await swap('v1');
    const { get } = await start(join(outside, 'current', 'ca.pem'));
    expect(await get()).toBe(502);

    await swap('v2');
    await eventually(async () => (await get()) === 200, 8_000, 'the swapped link to be followed');
    await swap('v3');
    await eventually(async () => (await get()) === 502, 8_000, 'a second swap to be followed');
  }, 60_000);
  it('a route edited to name a CA file that is not there yet: rejected, then loaded when the file appears', async () => {
    const outside = await makeTempDir('egress-ca-');
    await writeFile(join(outside, 'old.pem'), oldCa.caCert);
    const { get, reloadError, routesDir } = await start(join(outside, 'old.pem'));
    expect(await get()).toBe(502);

    const next = join(outside, 'next', 'ca.pem');
    await writeFile(join(routesDir, 'api.yaml'), route(next));
    await eventually(async () => (await reloadError()).includes('ENOENT'), 8_000, 'the route naming a missing file to be rejected');
    expect(await get()).toBe(502);

    await mkdir(join(outside, 'next'));
    await writeFile(next, newCa.caCert);
    await eventually(async () => (await get()) === 200, 8_000, 'the file, once there, to be loaded');
  }, 60_000);
});
