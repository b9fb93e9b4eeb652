import { mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

let upstream: Upstream;
beforeAll(async () => {
  upstream = await startUpstream();
});
afterAll(async () => {
  await upstream?.close();
});

describe('the routes folder replaced whole', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    await serve?.stop();
  });

  // A deploy that ships a new routes folder (mv routes.new routes) replaces the folder being
  // watched: its changes, and every later edit, must still reload without a SIGHUP.
  it('a new folder moved into place is loaded, and later edits in it are too', async () => {
    const dir = await makeTempDir();
    const route = (...paths: string[]) => bearerRoute({ upstream: upstream.url, paths });
    const { tokens } = await seedDataDir(dir, { routes: { api: route('/a') }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const get = (path: string) => fetch(`${serve!.url}${path}`, { headers: { 'x-egress-token': tokens.svc! } }).then((r) => r.status);
    expect(await get('/api/b')).toBe(403);

    const routes = join(dir, 'routes');
    await mkdir(join(dir, 'routes.new'));
    await writeFile(join(dir, 'routes.new', 'api.yaml'), route('/a', '/b'));
    await rename(routes, join(dir, 'routes.old'));
    await rename(join(dir, 'routes.new'), routes);
    await rm(join(dir, 'routes.old'), { recursive: true });
    await eventually(async () => (await get('/api/b')) === 200, 8_000, 'the new folder to load');

    await writeFile(join(routes, 'api.yaml'), route('/a', '/b', '/c'));
    await eventually(async () => (await get('/api/c')) === 200, 8_000, 'an edit in the new folder to load');
  }, 30_000);
});
