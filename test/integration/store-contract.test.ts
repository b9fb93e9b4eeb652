import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { ConflictError } from '../../src/errors.ts';
import { revoke, rotate } from '../../src/rotation/transitions.ts';
import { newCredentialRecord } from '../../src/store/credentials.ts';
import { Keyring } from '../../src/store/keyring.ts';
import { FileStore } from '../../src/store/file-store.ts';
import { openStore } from '../../src/store/open-store.ts';
import { KEYS } from '../../src/store/redis-store.ts';
import type { CallerRecord, CredentialRecord } from '../../src/store/records.ts';
import type { StoreBackend } from '../../src/store/types.ts';
import { eventually, makeTempDir } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';

/** One contract, every backend: what the proxy and the CLI rely on from a store. */
interface Backend {
  /** A fresh, empty store; call again for a second handle on the same store. */
  open(): StoreBackend;
  /** Overwrite one record's stored bytes with garbage, behind the backend's back. */
  damage(name: string, garbage: string): Promise<void>;
}

let redis: TestRedis;
let fileDir: string;
let redisDb = 0;

beforeAll(async () => {
  redis = await TestRedis.create();
  fileDir = await makeTempDir('egress-contract-');
});
afterAll(async () => {
  await redis?.destroy();
});

let fileCounter = 0;
const backends: [string, () => Backend][] = [
  ['file', () => {
    const path = join(fileDir, `store-${fileCounter++}.json`);
    return {
      open: () => new FileStore(path),
      damage: async (name, garbage) => {
        const doc = JSON.parse(await readFile(path, 'utf8')) as { callers: Record<string, unknown> };
        doc.callers[name] = garbage;
        await writeFile(path, JSON.stringify(doc));
      },
    };
  }],
  ['redis', () => {
    const db = ++redisDb;
    return {
      open: () => openStore(`${redis.url}/${db}`),
      damage: async (name, garbage) => {
        const c = redis.client({ db });
        await c.set(KEYS.record('caller', name), garbage);
        c.disconnect();
      },
    };
  }],
];

function caller(name: string, revision: number): CallerRecord {
  const at = new Date().toISOString();
  return { name, revision, created_at: at, updated_at: at, tokens: [{ id: 'ab12cd34', hash: 'a'.repeat(64), created_at: at }] };
}

describe.each(backends)('%s store', (_name, make) => {
  it('round-trips records, validated and frozen', async () => {
    const backend = make();
    const store = backend.open();
    try {
      await store.put('caller', caller('svc', 1), 0);
      const snapshot = await store.load();
      expect(snapshot.callers.get('svc')).toEqual(caller('svc', 1).name === 'svc' ? expect.objectContaining({ name: 'svc', revision: 1 }) : undefined);
      expect(Object.isFrozen(snapshot.callers.get('svc'))).toBe(true);
      expect(snapshot.credentials.size).toBe(0);
    } finally {
      await store.close();
    }
  });

  it('compare-and-set: a write based on a stale revision is a conflict', async () => {
    const store = make().open();
    try {
      await store.put('caller', caller('svc', 1), 0);
      await expect(store.put('caller', caller('svc', 1), 0)).rejects.toBeInstanceOf(ConflictError);
      await store.put('caller', caller('svc', 2), 1);
      await expect(store.put('caller', caller('svc', 2), 1)).rejects.toBeInstanceOf(ConflictError);
      expect((await store.load()).callers.get('svc')!.revision).toBe(2);
    } finally {
      await store.close();
    }
  });

  it('concurrent writers from separate handles: exactly one wins', async () => {
    const backend = make();
    const handles = Array.from({ length: 8 }, () => backend.open());
    try {
      await handles[0]!.put('caller', caller('race', 1), 0);
      const results = await Promise.allSettled(handles.map((h, i) => h.put('caller', { ...caller('race', 2), tokens: [{ id: `0000000${i}`, hash: String(i).repeat(64), created_at: 'x' }] }, 1)));
      expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
      for (const r of results) if (r.status === 'rejected') expect(r.reason).toBeInstanceOf(ConflictError);
    } finally {
      for (const h of handles) await h.close();
    }
  });

  it('a watcher hears about a write from another handle within a second', async () => {
    const backend = make();
    const writer = backend.open();
    const reader = backend.open();
    await writer.put('caller', caller('first', 1), 0);
    let heard = 0;
    const stop = reader.watch(() => heard++);
    try {
      await new Promise((r) => setTimeout(r, 300));
      const before = heard;
      const started = Date.now();
      await writer.put('caller', caller('second', 1), 0);
      await eventually(() => heard > before, 1_000, 'the change notification');
      expect(Date.now() - started).toBeLessThan(1_000);
      expect((await reader.load()).callers.has('second')).toBe(true);
    } finally {
      stop();
      await writer.close();
      await reader.close();
    }
  });

  it('after raiseKekFloor(2), a data key newly wrapped by key 1 is refused and nothing is written; wraps the stored record already holds, and new ones by key 2, are written; the floor only rises', async () => {
    const keyring1 = new Keyring(1, [{ version: 1, createdAt: '', key: randomBytes(32) }]);
    const keyring2 = keyring1.withNewKey(new Date());
    const by = { actor: 'test', now: new Date() };
    const store = make().open();
    try {
      const held = newCredentialRecord(keyring1, 'held', { secret: 'a' }, by.now);
      await store.put('credential', held, 0);
      await store.raiseKekFloor(2);
      const kept = (): Promise<CredentialRecord | undefined> => store.load().then((s) => s.credentials.get('held'));

      // A new credential, and a new version of an existing one, wrapped by key 1.
      await expect(store.put('credential', newCredentialRecord(keyring1, 'late', { secret: 'b' }, by.now), 0)).rejects.toThrow(ConflictError);
      await expect(store.put('credential', rotate(held, keyring1, { secret: 'c' }, { stage: true, graceMs: 0 }, by), 1)).rejects.toThrow(/master key version 1.*version 2/);
      expect((await store.load()).credentials.has('late')).toBe(false);
      expect(await kept()).toEqual(held);

      // Version 1 keeps its key-1 wrap through a rotation wrapped by key 2, and through a revoke.
      const staged = rotate(held, keyring2, { secret: 'c' }, { stage: true, graceMs: 0 }, by);
      await store.put('credential', staged, 1);
      const revoked = revoke(staged, 2, by);
      await store.put('credential', revoked, 2);
      expect(await kept()).toEqual(revoked);
      await store.put('credential', newCredentialRecord(keyring2, 'late', { secret: 'b' }, by.now), 0);

      // Lowering is ignored; callers hold no data keys and are not affected.
      await store.raiseKekFloor(1);
      await expect(store.put('credential', newCredentialRecord(keyring1, 'later', { secret: 'd' }, by.now), 0)).rejects.toThrow(ConflictError);
      await store.put('caller', caller('svc', 1), 0);
    } finally {
      await store.close();
    }
  });

  it('a damaged record fails on its own; the others load', async () => {
    const backend = make();
    const store = backend.open();
    try {
      await store.put('caller', caller('good', 1), 0);
      await store.put('caller', caller('bad', 1), 0);
      await backend.damage('bad', '{"name":"bad","revision":1,"tokens":"trunc');
      const snapshot = await store.load();
      expect(snapshot.callers.has('good')).toBe(true);
      expect(snapshot.callers.has('bad')).toBe(false);
      expect(snapshot.damaged.has('caller:bad')).toBe(true);
    } finally {
      await store.close();
    }
  });
});
