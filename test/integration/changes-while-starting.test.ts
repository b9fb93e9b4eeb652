import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { loadRoutes } from '../../src/config/load-routes.ts';
import { RouteReloader } from '../../src/config/reloader.ts';
import { createLogger } from '../../src/observe/log.ts';
import { generateToken, hashToken, newTokenId } from '../../src/store/callers.ts';
import { FileStore } from '../../src/store/file-store.ts';
import { createKeyring, writeKeyring } from '../../src/store/keyring.ts';
import { KeyringFile } from '../../src/store/keyring-file.ts';
import { StoreView } from '../../src/store/store-view.ts';
import type { StoreSnapshot } from '../../src/store/types.ts';
import { eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';

/** A real file store whose first read is overtaken by a write: the write lands after the read, before the read is applied. */
class OvertakenStore extends FileStore {
  #first = true;
  override async load(): Promise<StoreSnapshot> {
    const snapshot = await super.load();
    if (this.#first) {
      this.#first = false;
      const now = new Date().toISOString();
      await this.put('caller', { name: 'late', revision: 1, created_at: now, updated_at: now, tokens: [{ id: newTokenId(), hash: hashToken(generateToken()), created_at: now }] }, 0);
    }
    return snapshot;
  }
}

let dir: string | undefined;
let view: StoreView | undefined;
let keys: KeyringFile | undefined;
let routes: RouteReloader | undefined;
afterEach(async () => {
  await view?.close();
  keys?.close();
  routes?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('the store view', () => {
  it('sees a change written while its first read was out (the watch starts before the read, not after)', async () => {
    dir = await makeTempDir();
    await seedDataDir(dir, { routes: {}, callers: ['svc'] });
    view = new StoreView(new OvertakenStore(join(dir, 'store.json')), createLogger('silent'), { maxStaleMs: 60_000 });
    await view.start();
    expect(view.callerActive('svc')).toBe(true);
    await eventually(() => view!.callerActive('late'), 3_000, 'the caller added during the first read');
  });
});

describe('the live keyring', () => {
  it('loads a key added between the first read and the start of its watch', async () => {
    dir = await makeTempDir();
    const path = join(dir, 'master.key');
    const initial = await createKeyring(path);
    // `master-key rotate` in another process, finishing after the proxy read the file and before it watched it.
    await writeKeyring(path, initial.withNewKey(new Date()));
    keys = new KeyringFile(path, initial, createLogger('silent'), () => {});
    await keys.start();
    await eventually(() => keys!.current.active === 2, 3_000, 'the added key version in use');
  });
});

describe('the route reloader', () => {
  it('applies a route file edited between the first load and the start of its watch', async () => {
    dir = await makeTempDir();
    const file = join(dir, 'api.yaml');
    await writeFile(file, bearerRoute({ upstream: 'http://127.0.0.1:9', paths: ['/a'] }));
    const initial = await loadRoutes(dir);
    // A deploy writing the file while the proxy is still starting (opening the store, the audit log).
    await writeFile(file, bearerRoute({ upstream: 'http://127.0.0.1:9', paths: ['/a', '/b'] }));
    routes = new RouteReloader(dir, initial, createLogger('silent'), () => {});
    routes.watch(20);
    await eventually(() => JSON.stringify(routes!.config.routes[0]).includes('/b'), 3_000, 'the edited rule to apply');
  });
});
