import { spawn, type ChildProcess } from 'node:child_process';
import { watch } from 'node:fs';
import { chmod, copyFile, rename, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openVersion } from '../../src/store/credentials.ts';
import { readKeyring } from '../../src/store/keyring.ts';
import { openStore } from '../../src/store/open-store.ts';
import { BIN, collect, runCli, startServe } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { forms } from './lab.ts';
import { unopenable } from './sec-helpers.ts';

/**
 * FLT-13c/d: a credential written while the master key is rotated and its old version removed.
 * A writer wraps a new data key with the keyring's active key; if `master-key rotate` and `remove`
 * of that key run between the wrap and the commit, the record lands wrapped by a key no keyring
 * holds any more, and the credential is lost for good. The store must refuse such a write.
 */

let redis: TestRedis;
beforeAll(async () => {
  redis = await TestRedis.create();
});
afterAll(async () => {
  await redis?.destroy();
});

async function credentialIds(storeSpec: string): Promise<string[]> {
  const store = openStore(storeSpec);
  try {
    return [...(await store.load()).credentials.keys()];
  } finally {
    await store.close();
  }
}

/** Resolves when a file whose name `match` accepts is created in `dir` (fs.watch: no polling, so a short-lived file is seen too). */
function created(dir: string, match: (name: string) => boolean): { seen: Promise<void>; close(): void } {
  const watcher = watch(dir);
  let timer: NodeJS.Timeout | undefined;
  const seen = new Promise<void>((resolve, reject) => {
    watcher.on('change', (_event, name) => {
      if (typeof name === 'string' && match(name)) resolve();
    });
    timer = setTimeout(() => reject(new Error(`no matching file appeared in ${dir}`)), 15_000);
  });
  const close = () => {
    clearTimeout(timer);
    watcher.close();
  };
  return { seen: seen.finally(close), close };
}

describe('FLT-13c/d', () => {
  it('FLT-13c keys put that wrapped its data key before master-key rotate and remove of that key, and commits after them: refused (exit 3), nothing written; run again, it is wrapped by the new key', async () => {
    const dir = await makeTempDir('egress-flt13c-');
    await seedDataDir(dir, { routes: {}, credentials: {} });
    const env = envFor(dir);
    const storeSpec = env.EGRESS_STORE!;
    const keyPath = env.EGRESS_MASTER_KEY_FILE!;
    const secret = 'sk_flt13c_LATE_5d5d5d';
    // The store's writer lock, held by this (live) process: the writer reads the keyring, wraps its
    // data key with key 1, and then waits here for the lock.
    const lock = join(dir, 'store.json.lock');
    await writeFile(lock, String(process.pid), { flag: 'wx', mode: 0o600 });
    let writer: ChildProcess | undefined;
    const claim = created(dir, (name) => writer?.pid !== undefined && name.startsWith(`.store.json.lock.${writer.pid}.`));
    try {
      writer = spawn(process.execPath, [BIN, 'keys', 'put', 'late', '--from-stdin'], { env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
      const result = collect(writer, JSON.stringify({ secret }));
      // Its first try at the lock: it has wrapped the data key. Freeze it there, free the lock, and
      // rotate the master key and remove version 1 while it is frozen.
      await claim.seen;
      writer.kill('SIGSTOP');
      await unlink(lock);
      const rotated = await runCli(['master-key', 'rotate'], env);
      expect(rotated.code, rotated.stderr).toBe(0);
      const removed = await runCli(['master-key', 'remove', '--version', '1'], env);
      expect(removed.code, removed.stderr).toBe(0);
      writer.kill('SIGCONT');
      const late = await result;

      // No data key in the store is wrapped by a key the keyring no longer holds.
      expect(await unopenable(storeSpec, keyPath)).toEqual([]);
      // The write was refused as a conflict, saying why, and nothing was written.
      expect(late.code, late.stderr).toBe(3);
      expect(late.stderr).toMatch(/master key version 1.*version 2/);
      expect(await credentialIds(storeSpec)).toEqual([]);
      for (const f of forms(secret)) expect(late.stdout + late.stderr).not.toContain(f);
      // Run again, it reads the rotated keyring and succeeds.
      const again = await runCli(['keys', 'put', 'late', '--from-stdin', '--json'], env, JSON.stringify({ secret }));
      expect(again.code, again.stderr).toBe(0);
      expect((JSON.parse(again.stdout) as { versions: { kek: number }[] }).versions[0]!.kek).toBe(2);
      expect(await unopenable(storeSpec, keyPath)).toEqual([]);
    } finally {
      claim.close();
      if (writer?.exitCode === null) {
        writer.kill('SIGCONT');
        writer.kill('SIGKILL');
      }
    }
  });

  it('FLT-13d admin API of an instance whose master key file is an older copy (Redis store): after master-key rotate and remove elsewhere, its new credential is refused (409), nothing written; with the rotated file it is accepted', async () => {
    const dir = await makeTempDir('egress-flt13d-');
    const env = envFor(dir, { EGRESS_STORE: `${redis.url}/3` });
    await seedDataDir(dir, { routes: {}, store: env.EGRESS_STORE! });
    const keyPath = env.EGRESS_MASTER_KEY_FILE!;
    // This instance's copy of the master key file, made before the rotation (another host's copy,
    // or one the instance has not reloaded yet).
    const instanceKey = join(dir, 'instance.key');
    await copyFile(keyPath, instanceKey);
    await chmod(instanceKey, 0o600);
    const admin = await runCli(['admin-token', 'create', 'rotator', '--json'], env);
    expect(admin.code, admin.stderr).toBe(0);
    const token = (JSON.parse(admin.stdout) as { token: string }).token;
    const serve = await startServe({ ...env, EGRESS_MASTER_KEY_FILE: instanceKey });
    const secret = 'sk_flt13d_LATE_6e6e6e';
    const put = async () => {
      const res = await fetch(`${serve.admin}/v1/credentials`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify({ id: 'late', fields: { secret } }) });
      return { status: res.status, body: (await res.json()) as { error?: { code: string; message: string }; versions?: { kek: number }[] } };
    };
    try {
      expect((await runCli(['master-key', 'rotate'], env)).code).toBe(0);
      expect((await runCli(['master-key', 'remove', '--version', '1'], env)).code).toBe(0);

      const refused = await put();
      expect(await unopenable(env.EGRESS_STORE!, keyPath)).toEqual([]);
      expect(refused.status).toBe(409);
      expect(refused.body.error).toMatchObject({ code: 'conflict' });
      expect(refused.body.error!.message).toMatch(/master key version 1.*version 2/);
      expect(await credentialIds(env.EGRESS_STORE!)).toEqual([]);

      // The rotated file reaches the instance; it reloads it and the same request succeeds.
      await copyFile(keyPath, `${instanceKey}.new`);
      await chmod(`${instanceKey}.new`, 0o600);
      await rename(`${instanceKey}.new`, instanceKey);
      await eventually(() => serve.output().includes('master key file reloaded'), 3_000, 'the keyring reloaded');
      const accepted = await put();
      expect(accepted.status, JSON.stringify(accepted.body)).toBe(201);
      expect(accepted.body.versions![0]!.kek).toBe(2);
      expect(await unopenable(env.EGRESS_STORE!, keyPath)).toEqual([]);
      for (const f of forms(secret)) expect(serve.output()).not.toContain(f);
    } finally {
      await serve.stop();
    }
  });
});
