import { mkdir, rename, rm, symlink, writeFile } from 'node:fs/promises';
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

  // A route file kept elsewhere (a config-management checkout) and linked into the folder: an edit
  // made there changes nothing in the folder itself, so the folder's watch never saw it.
  it('a route file that is a link to a file outside the folder: edits there are loaded, in place and by a rename over it', async () => {
    const dir = await makeTempDir();
    const outside = await makeTempDir('egress-routes-elsewhere-');
    const route = (...paths: string[]) => bearerRoute({ upstream: upstream.url, paths });
    const { tokens } = await seedDataDir(dir, { routes: {}, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    await writeFile(join(outside, 'api.yaml'), route('/a'));
    await symlink(join(outside, 'api.yaml'), join(dir, 'routes', 'api.yaml'));
    serve = await startServe(envFor(dir));
    const get = (path: string) => fetch(`${serve!.url}${path}`, { headers: { 'x-egress-token': tokens.svc! } }).then((r) => r.status);
    expect(await get('/api/a')).toBe(200);
    expect(await get('/api/b')).toBe(403);

    await writeFile(join(outside, 'api.yaml'), route('/a', '/b'));
    await eventually(async () => (await get('/api/b')) === 200, 8_000, 'the edit to the linked file to load');

    await writeFile(join(outside, 'api.yaml.tmp'), route('/a', '/b', '/c'));
    await rename(join(outside, 'api.yaml.tmp'), join(outside, 'api.yaml'));
    await eventually(async () => (await get('/api/c')) === 200, 8_000, 'the linked file replaced by a rename to load');
    await rm(outside, { recursive: true, force: true });
  }, 30_000);

  // Files are read one after another. Two files changed together while a reload is between them
  // (here: while it parses a large file sorted between the two) gave a mix of the old first file
  // and the new second one. Here the mix has both routes on /p, which is refused: a reload rejected
  // although neither the old nor the new folder was wrong (and in other folders a mix is applied).
  it('two files changed while a reload reads the folder: never a mix of old and new', async () => {
    const dir = await makeTempDir();
    const route = (name: string, prefix: string, path: string) => bearerRoute({ upstream: upstream.url, paths: [path] }).replace('name: api\nprefix: /api', `name: ${name}\nprefix: ${prefix}`);
    const paths = Array.from({ length: 80_000 }, (_, i) => `/p${i}`).join(', ');
    const { tokens } = await seedDataDir(dir, {
      routes: { a: route('a', '/p', '/from-a'), m: route('m', '/m', '/x').replace('[/x]', `[${paths}]`), z: route('z', '/q', '/from-z') },
      credentials: { key: { token: 'tok_1234567890' } },
      callers: ['svc'],
    });
    serve = await startServe(envFor(dir));
    const get = (path: string) => fetch(`${serve!.url}${path}`, { headers: { 'x-egress-token': tokens.svc! } }).then((r) => r.status);
    expect(await get('/p/from-a')).toBe(200);
    const routes = join(dir, 'routes');
    const replace = async (name: string, text: string) => {
      await writeFile(join(routes, `.${name}.tmp`), text);
      await rename(join(routes, `.${name}.tmp`), join(routes, name));
    };
    const before = serve.output().length;
    serve.child.kill('SIGHUP');
    // a.yaml is read at once; m.yaml then takes about two seconds to parse, and z.yaml comes after it.
    await new Promise((r) => setTimeout(r, 300));
    await replace('a.yaml', route('a', '/q', '/from-a'));
    await replace('z.yaml', route('z', '/p', '/from-z'));
    await eventually(async () => (await get('/q/from-a')) === 200 && (await get('/p/from-z')) === 200, 20_000, 'the new folder to load');
    expect(serve.output().slice(before)).not.toContain('route reload rejected');
  }, 60_000);
});
