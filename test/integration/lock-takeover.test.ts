import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { open, readdir, readFile, rename, unlink, utimes, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConflictError } from '../../src/errors.ts';
import { addRevoked, readRevoked } from '../../src/certs/revocations.ts';
import { lockAuditLog } from '../../src/observe/audit-lock.ts';
import { newCredentialRecord, openVersion } from '../../src/store/credentials.ts';
import { FileStore } from '../../src/store/file-store.ts';
import { createKeyring, readKeyring } from '../../src/store/keyring.ts';
import { acquireLock, lockContent, startTime, stealPath, takeOverLock } from '../../src/store/lock-file.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, makeTempDir } from '../helpers/proxy.ts';

/** The pid of a process that has exited: what a SIGKILLed writer's lock names. */
const deadPid = () => spawnSync('true').pid!;

/**
 * What a writer killed while holding `lock` leaves, and a second writer that found that lock's holder
 * gone and was killed in the middle of taking it over: the lock and that claimant's steal file.
 */
async function leftByTwoKills(lock: string): Promise<string> {
  const content = `${deadPid()} - 0123456789abcdef\n`;
  await writeFile(lock, content, { mode: 0o600 });
  const steal = stealPath(lock, content);
  await writeFile(steal, `${deadPid()} - fedcba9876543210\n`, { mode: 0o600 });
  // And a third claimant, killed between writing its claim on the steal file and linking it.
  await writeFile(join(dirname(steal), `.${basename(steal)}.${deadPid()}.1765000000000123.tmp`), `${deadPid()} - 00\n`, { mode: 0o600 });
  return content;
}

const lockFiles = async (dir: string) => (await readdir(dir)).filter((name) => name.includes('.lock'));

describe('a claimant killed while taking over a dead writer\'s lock', () => {
  it('keyring: master-key rotate still runs at once, and leaves no lock or steal file behind', async () => {
    const dir = await makeTempDir('egress-steal-keyring-');
    const env = envFor(dir);
    const keyPath = env.EGRESS_MASTER_KEY_FILE!;
    await createKeyring(keyPath);
    await leftByTwoKills(`${keyPath}.lock`);
    const started = Date.now();
    const rotated = await runCli(['master-key', 'rotate'], env);
    expect(rotated.code, rotated.stderr).toBe(0);
    // The lock wait is 30 s; a left steal file used to block (and spin) until it went stale (1 hour).
    expect(Date.now() - started).toBeLessThan(10_000);
    expect((await readKeyring(keyPath)).active).toBe(2);
    expect(await lockFiles(dir)).toEqual([]);
  }, 20_000);

  it('file store: keys put still writes at once', async () => {
    const dir = await makeTempDir('egress-steal-store-');
    const env = envFor(dir);
    await createKeyring(env.EGRESS_MASTER_KEY_FILE!);
    const storePath = env.EGRESS_STORE!.replace(/^file:/, '');
    await leftByTwoKills(`${storePath}.lock`);
    const put = await runCli(['keys', 'put', 'k', '--from-stdin'], env, JSON.stringify({ token: 'tok_steal_test' }));
    expect(put.code, put.stderr).toBe(0);
    expect(JSON.parse(await readFile(storePath, 'utf8')).credentials).toHaveProperty('k');
    expect(await lockFiles(dir)).toEqual([]);
  }, 20_000);

  it('audit log: the next instance takes the lock', async () => {
    const dir = await makeTempDir('egress-steal-audit-');
    const audit = join(dir, 'audit.log');
    await leftByTwoKills(`${audit}.lock`);
    const lock = await lockAuditLog(audit);
    expect(lock).toBeDefined();
    expect((await readFile(`${audit}.lock`, 'utf8')).split(' ')[0]).toBe(String(process.pid));
    await lock!.release();
    expect(await lockFiles(dir)).toEqual([]);
  });
});

describe('takeOverLock', () => {
  it('leaves a lock alone while a live claimant takes it over, and removes it only with the content it judged dead', async () => {
    const dir = await makeTempDir('egress-steal-unit-');
    const lock = join(dir, 'x.lock');
    const dead = `${deadPid()} - 00\n`;
    await writeFile(lock, dead);
    // A live claimant (this process) holds the steal file: another waits.
    await writeFile(stealPath(lock, dead), lockContent());
    expect(await takeOverLock(lock, { staleMs: 60_000 })).toBe(false);
    expect(await readFile(lock, 'utf8')).toBe(dead);

    // The lock changes hands to a live holder; the old steal file is left by its (dead) claimant.
    const live = lockContent();
    await writeFile(stealPath(lock, dead), `${deadPid()} - 01\n`);
    await writeFile(lock, live);
    expect(await takeOverLock(lock, { staleMs: 60_000 })).toBe(false);
    expect(await readFile(lock, 'utf8')).toBe(live);

    // Its holder gone, the lock is removed once.
    await writeFile(lock, `${deadPid()} - 02\n`);
    expect(await takeOverLock(lock, { staleMs: 60_000 })).toBe(true);
    expect(await takeOverLock(lock, { staleMs: 60_000 })).toBe(false);
    expect((await readdir(dir)).filter((name) => name === 'x.lock')).toEqual([]);
  });
});

describe('file store: a live writer that held the lock past its stale age', () => {
  it('finds its lock taken over before it renames, and writes nothing over the write made meanwhile', async () => {
    const dir = await makeTempDir('egress-lock-stale-live-');
    const path = join(dir, 'store.json');
    const keyring = await createKeyring(join(dir, 'master.key'));
    await new FileStore(path).put('credential', newCredentialRecord(keyring, 'seed', { token: 'tok_seed' }, new Date()), 0);
    const seeded = await readFile(path, 'utf8');

    // A slow disk, made real: writer A's read of the store (inside its lock) is a read of a FIFO,
    // which ends only when the test writes into it. The store file is back in place for everyone else.
    await unlink(path);
    execFileSync('mkfifo', ['-m', '600', path]);
    const a = new FileStore(path).put('credential', newCredentialRecord(keyring, 'from-a', { token: 'tok_a' }, new Date()), 0).then(() => 'written', (err: unknown) => err);
    const fifo = await open(path, 'w'); // returns once A has opened the FIFO for its read
    await writeFile(join(dir, 'store.copy'), seeded, { mode: 0o600 });
    await rename(join(dir, 'store.copy'), path);
    // A is still alive, but its lock is past the store's stale age (30 s): another writer takes it over.
    const old = new Date(Date.now() - 60_000);
    await utimes(`${path}.lock`, old, old);
    await new FileStore(path).put('credential', newCredentialRecord(keyring, 'from-b', { token: 'tok_b' }, new Date()), 0);
    expect(Object.keys(JSON.parse(await readFile(path, 'utf8')).credentials)).toEqual(['seed', 'from-b']);

    // A's read ends with what the store held when A read it; A goes on to write.
    await fifo.writeFile(seeded);
    await fifo.close();
    const result = await a;

    // B's write is still there: A did not replace the file with one built on what it read before B wrote.
    expect(Object.keys(JSON.parse(await readFile(path, 'utf8')).credentials)).toEqual(['seed', 'from-b']);
    expect(result).toBeInstanceOf(ConflictError);
    expect((result as Error).message).toContain('held its lock past 30 s and another writer took it over');
    expect(await lockFiles(dir)).toEqual([]);
    expect((await readdir(dir)).filter((name) => name.endsWith('.tmp'))).toEqual([]);
  });
});

describe('acquireLock: a live holder still at work past the stale age', () => {
  it('keeps its lock: it refreshes the lock while it holds it, so the next writer waits instead of taking it over', async () => {
    const dir = await makeTempDir('egress-lock-refresh-');
    const lock = join(dir, 'x.lock');
    const options = { waitMs: 0, staleMs: 3_000, what: 'x' };
    const held = await acquireLock(lock, options);
    try {
      // The holder's work (a slow disk) lasts longer than the stale age; its process stays responsive.
      await new Promise((r) => setTimeout(r, 3_600));
      await expect(acquireLock(lock, { ...options, waitMs: 300 })).rejects.toBeInstanceOf(ConflictError);
      await held.confirm();
    } finally {
      await held.release();
    }
    expect(await lockFiles(dir)).toEqual([]);
  });
});

describe('master key file: a live remove that held the keyring lock past its stale age', () => {
  it('finds its lock taken over before it writes, and does not drop the key a rotate added meanwhile', async () => {
    const dir = await makeTempDir('egress-lock-stale-keyring-');
    const env = envFor(dir);
    const keyPath = env.EGRESS_MASTER_KEY_FILE!;
    const storePath = env.EGRESS_STORE!.replace(/^file:/, '');
    const keyring1 = await createKeyring(keyPath);
    await new FileStore(storePath).put('credential', newCredentialRecord(keyring1, 'k', { token: 'tok_keyring_stale' }, new Date()), 0);
    expect((await runCli(['master-key', 'rotate'], env)).code).toBe(0);
    const stored = await readFile(storePath, 'utf8');

    // `master-key remove --version 1` (version 2 wraps everything) is held up right after it read
    // the keyring, with the keyring lock held: its first read of the store is a FIFO's.
    await unlink(storePath);
    execFileSync('mkfifo', ['-m', '600', storePath]);
    const remove = runCli(['master-key', 'remove', '--version', '1'], env);
    const fifo = await open(storePath, 'w');
    await writeFile(`${storePath}.copy`, stored, { mode: 0o600 });
    await rename(`${storePath}.copy`, storePath);
    expect(existsSync(`${keyPath}.lock`)).toBe(true);
    // Held past the keyring lock's stale age (an hour): a rotate takes the lock over, adds version 3
    // and re-wraps every data key with it.
    const old = new Date(Date.now() - 2 * 3_600_000);
    await utimes(`${keyPath}.lock`, old, old);
    const rotated = await runCli(['master-key', 'rotate'], env);
    expect(rotated.code, rotated.stderr).toBe(0);
    expect((await readKeyring(keyPath)).active).toBe(3);

    await fifo.writeFile(stored);
    await fifo.close();
    const removed = await remove;

    // Version 3, which wraps every data key now, is still in the keyring: the credential opens.
    const keyring = await readKeyring(keyPath);
    expect(keyring.versions().map((v) => v.version)).toEqual([1, 2, 3]);
    const record = (await new FileStore(storePath).load()).credentials.get('k')!;
    expect(openVersion(keyring, 'k', record.versions[0]!).fields.get('token')!.reveal()).toBe('tok_keyring_stale');
    expect(removed.code, removed.stderr).toBe(3);
    expect(removed.stderr).toContain('was not written: this command held its lock past 60 min and another took it over');
    expect(await lockFiles(dir)).toEqual([]);
  }, 30_000);
});

describe('a lock whose holder is a zombie (exited, not yet reaped by its parent)', () => {
  it('is taken over at once: keys put writes instead of waiting for the lock and failing', async () => {
    const dir = await makeTempDir('egress-lock-zombie-');
    const env = envFor(dir);
    await createKeyring(env.EGRESS_MASTER_KEY_FILE!);
    const storePath = env.EGRESS_STORE!.replace(/^file:/, '');
    // A writer that exited while its parent (here `sleep`, which never reaps) still runs: its pid
    // answers signal 0, and /proc names it, in state Z.
    const parent = spawn('sh', ['-c', 'sleep 0 & echo $!; exec sleep 30'], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      const zombie = Number(String(await once(parent.stdout!, 'data')).trim());
      await new Promise((r) => setTimeout(r, 200));
      expect((await readFile(`/proc/${zombie}/stat`, 'utf8')).split(') ')[1]!.startsWith('Z')).toBe(true);
      await writeFile(`${storePath}.lock`, `${zombie} ${startTime(zombie)} 0123456789abcdef\n`, { mode: 0o600 });

      const put = await runCli(['keys', 'put', 'k', '--from-stdin'], env, JSON.stringify({ token: 'tok_zombie_test' }));
      expect(put.code, put.stderr).toBe(0);
      expect(JSON.parse(await readFile(storePath, 'utf8')).credentials).toHaveProperty('k');
      expect(await lockFiles(dir)).toEqual([]);
    } finally {
      parent.kill();
    }
  }, 20_000);
});

describe('certificate revocation list: a live revoke that held the list\'s lock past its stale age', () => {
  it('finds its lock taken over before it renames, and does not drop the revocation made meanwhile', async () => {
    const dir = await makeTempDir('egress-lock-stale-revoked-');
    const path = join(dir, 'revoked.json');
    await addRevoked(dir, ['a1'], 'seed');
    const seeded = await readFile(path, 'utf8');

    // Revoke A's read of the list (inside its lock) is a FIFO's, which ends when the test writes into it.
    await unlink(path);
    execFileSync('mkfifo', ['-m', '600', path]);
    const a = addRevoked(dir, ['a2'], 'from-a').then(() => 'written', (err: unknown) => err);
    const fifo = await open(path, 'w');
    await writeFile(join(dir, 'revoked.copy'), seeded, { mode: 0o644 });
    await rename(join(dir, 'revoked.copy'), path);
    // A is alive, but its lock is past the certificate lists' stale age (60 s): revoke B takes it over.
    const old = new Date(Date.now() - 120_000);
    await utimes(`${path}.lock`, old, old);
    await addRevoked(dir, ['b1'], 'from-b');

    await fifo.writeFile(seeded);
    await fifo.close();
    const result = await a;
    // B's revocation stands: A did not write back the list it read before B wrote.
    expect(Object.keys((await readRevoked(dir)).serials).sort()).toEqual(['a1', 'b1']);
    expect(result).toBeInstanceOf(ConflictError);
    expect(await lockFiles(dir)).toEqual([]);
  });
});
