import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { promoteCredential, rewrapAll } from '../../src/rotation/operations.ts';
import { rotate } from '../../src/rotation/transitions.ts';
import type { FieldValues } from '../../src/store/credentials.ts';
import { FileStore } from '../../src/store/file-store.ts';
import { newCredentialRecord, openVersion } from '../../src/store/credentials.ts';
import type { Keyring } from '../../src/store/keyring.ts';
import { createKeyring, readKeyring, writeKeyring } from '../../src/store/keyring.ts';
import { openStore } from '../../src/store/open-store.ts';
import type { CredentialRecord } from '../../src/store/records.ts';
import type { StoreBackend, StoreSnapshot } from '../../src/store/types.ts';
import { BIN, ROOT, runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { bearerRoute } from '../helpers/routes.ts';

const HOUR = 3_600_000;
const dirs: string[] = [];

async function tempDir(): Promise<string> {
  const dir = await makeTempDir('egress-mk-');
  dirs.push(dir);
  await mkdir(join(dir, 'routes'), { recursive: true });
  return dir;
}

afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

/** What every sealed version should decrypt to, by "id@version". */
type Expected = Map<string, FieldValues>;

/**
 * `count` credentials under KEK 1; with `mixed`, some also have a previous, a pending or a retired
 * version, so re-wrapping covers every state that holds ciphertext.
 */
function makeRecords(keyring: Keyring, count: number, mixed: boolean): { records: CredentialRecord[]; expected: Expected } {
  const expected: Expected = new Map();
  const records: CredentialRecord[] = [];
  const now = new Date();
  const by = { actor: 'test', now };
  for (let i = 0; i < count; i++) {
    const id = `cred-${String(i).padStart(3, '0')}`;
    const fields = (n: number) => ({ client_id: `client-${i}`, secret: `sk_${i}_v${n}_${'z'.repeat(i % 5)}` });
    let r = newCredentialRecord(keyring, id, fields(1), now);
    // i % 4: 0 current only; 1 current + previous; 2 current + pending; 3 retired + previous + current + pending.
    if (mixed && i % 4 === 1) r = rotate(r, keyring, fields(2), { stage: false, graceMs: HOUR }, by);
    if (mixed && i % 4 === 2) r = rotate(r, keyring, fields(2), { stage: true, graceMs: HOUR }, by);
    if (mixed && i % 4 === 3) {
      r = rotate(r, keyring, fields(2), { stage: false, graceMs: 0 }, by);
      r = rotate(r, keyring, fields(3), { stage: false, graceMs: HOUR }, by);
      r = rotate(r, keyring, fields(4), { stage: true, graceMs: HOUR }, by);
    }
    for (const v of r.versions) {
      const n = v.version;
      if (v.data) expected.set(`${id}@${n}`, fields(n));
    }
    records.push(r);
  }
  return { records, expected };
}

/** The store file written in one go (a store.put per record would rewrite the file each time). */
async function writeStoreFile(path: string, records: readonly CredentialRecord[], extra: Record<string, unknown> = {}): Promise<void> {
  const credentials: Record<string, unknown> = { ...extra };
  for (const r of records) credentials[r.id] = r;
  await writeFile(path, JSON.stringify({ format: 'egress-store/1', credentials, callers: {}, admins: {} }), { mode: 0o600 });
}

async function load(spec: string): Promise<StoreSnapshot> {
  const store = openStore(spec);
  try {
    return await store.load();
  } finally {
    await store.close();
  }
}

function reveal(keyring: Keyring, record: CredentialRecord, version: number): Record<string, string> {
  const resolved = openVersion(keyring, record.id, record.versions.find((v) => v.version === version)!);
  return Object.fromEntries([...resolved.fields].map(([k, s]) => [k, s.reveal()]));
}

/** Every version that has ciphertext opens with `keyring` to what it was sealed with; returns kek -> count. */
function verifyAll(snapshot: StoreSnapshot, keyring: Keyring, expected: Expected): Map<number, number> {
  expect(snapshot.damaged.size).toBe(0);
  const wraps = new Map<number, number>();
  let opened = 0;
  for (const record of snapshot.credentials.values()) {
    for (const v of record.versions) {
      if (!v.data) {
        expect(v.dek).toBeUndefined();
        continue;
      }
      const want = expected.get(`${record.id}@${v.version}`);
      expect(want, `${record.id}@${v.version} is expected`).toBeDefined();
      expect(reveal(keyring, record, v.version)).toEqual(want);
      wraps.set(v.kek, (wraps.get(v.kek) ?? 0) + 1);
      opened++;
    }
  }
  expect(opened).toBe(expected.size);
  return wraps;
}

interface StatusData {
  versions: { version: number; active: boolean; wraps: number }[];
  missing_versions: number[];
}

async function status(env: Record<string, string>): Promise<StatusData> {
  const res = await runCli(['master-key', 'status', '--json'], env);
  expect(res.code, res.stderr).toBe(0);
  return JSON.parse(res.stdout) as StatusData;
}

const wrapsOf = (s: StatusData) => Object.fromEntries(s.versions.map((v) => [v.version, v.wraps]));

describe('master-key rotate and remove (file store)', () => {
  it('adds version 2, re-wraps every data key, keeps every credential readable; remove refuses the active key and keys still in use', async () => {
    const dir = await tempDir();
    const env = envFor(dir);
    const keyPath = join(dir, 'master.key');
    const storePath = join(dir, 'store.json');
    const keyring1 = await createKeyring(keyPath);
    const { records, expected } = makeRecords(keyring1, 24, true);
    await writeStoreFile(storePath, records);
    const wrapped = expected.size;
    expect(wrapped).toBeGreaterThan(24);
    const dataBefore = new Map(records.flatMap((r) => r.versions.filter((v) => v.data).map((v) => [`${r.id}@${v.version}`, JSON.stringify(v.data)] as const)));

    expect(wrapsOf(await status(env))).toEqual({ 1: wrapped });
    // The active (and only) key cannot be removed.
    const removeActive = await runCli(['master-key', 'remove', '--version', '1'], env);
    expect(removeActive.code).toBe(1);
    expect(removeActive.stderr).toMatch(/still wraps|active/);

    const rotated = await runCli(['master-key', 'rotate', '--json'], env);
    expect(rotated.code, rotated.stderr).toBe(0);
    expect(JSON.parse(rotated.stdout)).toMatchObject({ active: 2, rewrapped: records.length });

    const keyring2 = await readKeyring(keyPath);
    expect(keyring2.active).toBe(2);
    expect(keyring2.versions().map((v) => v.version).sort()).toEqual([1, 2]);
    const s = await status(env);
    expect(wrapsOf(s)).toEqual({ 1: 0, 2: wrapped });
    expect(s.versions.find((v) => v.version === 2)!.active).toBe(true);

    const snapshot = await load(`file:${storePath}`);
    expect(Object.fromEntries(verifyAll(snapshot, keyring2, expected))).toEqual({ 2: wrapped });
    // Only the data keys were re-wrapped: the encrypted fields are byte-identical.
    for (const record of snapshot.credentials.values()) {
      for (const v of record.versions) if (v.data) expect(JSON.stringify(v.data)).toBe(dataBefore.get(`${record.id}@${v.version}`));
    }
    // The store file holds no key material and no secret.
    const storeText = await readFile(storePath, 'utf8');
    expect(storeText).not.toContain('sk_1_v1');

    // Version 2 is active (and wraps everything) now: refused. Version 1 wraps nothing: removed.
    const removeActive2 = await runCli(['master-key', 'remove', '--version', '2'], env);
    expect(removeActive2.code).toBe(1);
    expect((await readKeyring(keyPath)).versions()).toHaveLength(2);
    const remove1 = await runCli(['master-key', 'remove', '--version', '1'], env);
    expect(remove1.code, remove1.stderr).toBe(0);
    const keyring3 = await readKeyring(keyPath);
    expect(keyring3.versions().map((v) => v.version)).toEqual([2]);
    expect(keyring3.get(1)).toBeUndefined();
    verifyAll(await load(`file:${storePath}`), keyring3, expected);
    expect(wrapsOf(await status(env))).toEqual({ 2: wrapped });
    expect((await runCli(['master-key', 'remove', '--version', '1'], env)).code).toBe(1);
    expect((await runCli(['master-key', 'remove'], env)).code).toBe(2);

    // An active key that wraps nothing yet is still refused: it is the one new data keys need.
    await writeKeyring(keyPath, keyring3.withNewKey(new Date()));
    const removeActive3 = await runCli(['master-key', 'remove', '--version', '3'], env);
    expect(removeActive3.code).toBe(1);
    expect(removeActive3.stderr).toContain('key version 3 is the active one and cannot be removed');
    expect((await readKeyring(keyPath)).active).toBe(3);
  });

  it('refuses to remove a key version that still wraps data keys, and rotate --resume finishes the re-wrap', async () => {
    const dir = await tempDir();
    const env = envFor(dir);
    const keyPath = join(dir, 'master.key');
    const storePath = join(dir, 'store.json');
    const keyring1 = await createKeyring(keyPath);
    const { records, expected } = makeRecords(keyring1, 10, true);
    await writeStoreFile(storePath, records);
    // A new active key whose re-wrap never ran (as after a crash right after the keyring write).
    await writeKeyring(keyPath, keyring1.withNewKey(new Date()));

    const refused = await runCli(['master-key', 'remove', '--version', '1'], env);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`still wraps ${expected.size} data keys`);
    expect((await readKeyring(keyPath)).get(1)).toBeDefined();

    const resumed = await runCli(['master-key', 'rotate', '--resume', '--json'], env);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(JSON.parse(resumed.stdout)).toMatchObject({ active: 2, rewrapped: records.length });
    // --resume adds no key.
    expect((await readKeyring(keyPath)).versions()).toHaveLength(2);
    expect(wrapsOf(await status(env))).toEqual({ 1: 0, 2: expected.size });
    expect((await runCli(['master-key', 'remove', '--version', '1'], env)).code).toBe(0);
    verifyAll(await load(`file:${storePath}`), await readKeyring(keyPath), expected);
  });
});

describe('master-key options given to a subcommand that does not take them', () => {
  it('are usage errors (exit 2) that change nothing, not ignored', async () => {
    const dir = await tempDir();
    const env = envFor(dir);
    const keyPath = join(dir, 'master.key');
    const init = await runCli(['master-key', 'init', '--resume'], env);
    expect(init.code, init.stdout).toBe(2);
    expect(init.stderr).toContain('--resume is not an option of "master-key init"');
    expect(existsSync(keyPath)).toBe(false);

    const keyring = await createKeyring(keyPath);
    await writeStoreFile(join(dir, 'store.json'), makeRecords(keyring, 1, false).records);
    // Not "rotate to version 1": rotate takes no version, and would have added version 2.
    const rotate = await runCli(['master-key', 'rotate', '--version', '1'], env);
    expect(rotate.code, rotate.stdout).toBe(2);
    expect(rotate.stderr).toContain('--version is not an option of "master-key rotate"');
    const remove = await runCli(['master-key', 'remove', '--version', '1', '--resume'], env);
    expect(remove.code, remove.stdout).toBe(2);
    expect((await runCli(['master-key', 'status', '--resume'], env)).code).toBe(2);
    expect((await readKeyring(keyPath)).versions().map((v) => v.version)).toEqual([1]);
  });

  it('remove --version takes digits only: "0x2", "2e0", "2.0" and " 2" are usage errors, not version 2', async () => {
    const dir = await tempDir();
    const env = envFor(dir);
    const keyPath = join(dir, 'master.key');
    const keyring = await createKeyring(keyPath);
    await writeStoreFile(join(dir, 'store.json'), makeRecords(keyring, 1, false).records);
    // Version 3 active, version 2 wraps nothing: removable, but only when named as 2.
    await writeKeyring(keyPath, keyring.withNewKey(new Date()).withNewKey(new Date()));
    for (const typed of ['0x2', '2e0', '2.0', ' 2']) {
      const res = await runCli(['master-key', 'remove', '--version', typed], env);
      expect(res.code, `${typed}: ${res.stdout}${res.stderr}`).toBe(2);
    }
    expect((await readKeyring(keyPath)).versions().map((v) => v.version)).toEqual([1, 2, 3]);
  });
});

describe('master-key rotate and remove with a damaged credential record', () => {
  it('does not remove a key version while a damaged record (not read, not re-wrapped) may still need it; once repaired, rotate --resume re-wraps it and the version can go', async () => {
    const dir = await tempDir();
    const env = envFor(dir);
    const keyPath = join(dir, 'master.key');
    const storePath = join(dir, 'store.json');
    const keyring1 = await createKeyring(keyPath);
    const { records, expected } = makeRecords(keyring1, 3, false);
    // One record fails the record format (a field a newer release writes, or a hand edit): it fails
    // closed, but its ciphertext is intact and its data key is wrapped by version 1.
    const [kept, ...rest] = records;
    const damaged = { ...kept!, labels: { team: 'payments' } };
    await writeStoreFile(storePath, rest, { [kept!.id]: damaged });

    const rotated = await runCli(['master-key', 'rotate'], env);
    expect(rotated.code, rotated.stderr).toBe(0);
    expect(rotated.stdout).toContain(`re-wrapped ${rest.length} records`);
    // Version 1 is not offered for removal, and the damaged record is named.
    expect(rotated.stdout).not.toContain('can be removed');
    expect(rotated.stdout).toContain(`credential:${kept!.id}`);
    const shown = await runCli(['master-key', 'status', '--json'], env);
    expect(shown.code).toBe(1);
    expect(JSON.parse(shown.stdout)).toMatchObject({ damaged: [`credential:${kept!.id}`] });

    const refused = await runCli(['master-key', 'remove', '--version', '1'], env);
    expect(refused.code, refused.stdout).toBe(1);
    expect(refused.stderr).toContain(`credential:${kept!.id}`);
    expect((await readKeyring(keyPath)).get(1)).toBeDefined();

    // Repaired (the unknown field taken out), it reads again, with version 1's wrap.
    await writeStoreFile(storePath, [...(await load(`file:${storePath}`)).credentials.values(), kept!]);
    const resumed = await runCli(['master-key', 'rotate', '--resume', '--json'], env);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(JSON.parse(resumed.stdout)).toMatchObject({ active: 2, rewrapped: 1 });
    const removed = await runCli(['master-key', 'remove', '--version', '1'], env);
    expect(removed.code, removed.stderr).toBe(0);
    verifyAll(await load(`file:${storePath}`), await readKeyring(keyPath), expected);
  });
});

describe('a credential changed while master-key rotate re-wraps', () => {
  it('is re-read and re-wrapped: the re-wrap finishes, and the change made meanwhile is kept', async () => {
    const dir = await tempDir();
    const keyPath = join(dir, 'master.key');
    const storePath = join(dir, 'store.json');
    const keyring1 = await createKeyring(keyPath);
    const { records, expected } = makeRecords(keyring1, 4, true);
    await writeStoreFile(storePath, records);
    const keyring2 = keyring1.withNewKey(new Date());
    await writeKeyring(keyPath, keyring2);

    // Another writer (a `keys promote`, a grace sweep on a running proxy) changes cred-002 right
    // after the re-wrap has read the store, before it writes that record.
    const real = new FileStore(storePath);
    let reads = 0;
    const store: StoreBackend = {
      description: real.description,
      load: async () => {
        const snapshot = await real.load();
        if (++reads === 1) await promoteCredential({ store: new FileStore(storePath), actor: 'other' }, 'cred-002', HOUR);
        return snapshot;
      },
      put: (kind, record, revision) => real.put(kind, record, revision),
      raiseKekFloor: (version) => real.raiseKekFloor(version),
      kekFloor: () => real.kekFloor(),
      recordUsage: (entries) => real.recordUsage(entries),
      readUsage: (credential) => real.readUsage(credential),
      watch: (listener) => real.watch(listener),
      close: () => real.close(),
    };
    expect(await rewrapAll({ store, actor: 'test' }, keyring2)).toBe(records.length);

    const snapshot = await load(`file:${storePath}`);
    expect(Object.fromEntries(verifyAll(snapshot, keyring2, expected))).toEqual({ 2: expected.size });
    const promoted = snapshot.credentials.get('cred-002')!;
    expect(promoted.versions.map((v) => v.state)).toEqual(['previous', 'current']);
    expect(promoted.history!.map((h) => h.action).slice(-2)).toEqual(['promote', 'rewrap']);
  });
});

describe('a running proxy during master-key rotate', () => {
  let upstream: Upstream;
  let proxy: TestProxy | undefined;
  beforeAll(async () => {
    upstream = await startUpstream();
  });
  afterEach(async () => {
    await proxy?.close();
    proxy = undefined;
  });
  afterAll(async () => {
    await upstream?.close();
  });

  it('keeps attaching the credential during and after the rotate, and after the old key is removed', async () => {
    const SECRET = 'tok_CANARY_master_key_rotate_1';
    const dir = await tempDir();
    const route = bearerRoute({ upstream: upstream.url, paths: ['/a'] });
    const { tokens } = await seedDataDir(dir, { routes: { api: route }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
    // Filler records, so the re-wrap takes a while; "key" stays first and is re-wrapped first.
    const storePath = join(dir, 'store.json');
    const doc = JSON.parse(await readFile(storePath, 'utf8')) as { credentials: Record<string, CredentialRecord> };
    const { records } = makeRecords(await readKeyring(join(dir, 'master.key')), 150, false);
    for (const r of records) doc.credentials[r.id] = r;
    await writeFile(storePath, JSON.stringify(doc));

    proxy = await startTestProxy({ routes: {}, dir });
    const env = envFor(dir);
    const statuses: number[] = [];
    const failures: string[] = [];
    const get = async () => {
      const res = await fetch(`${proxy!.url}/api/a`, { headers: { 'x-egress-token': tokens.svc! } });
      const body = await res.text();
      statuses.push(res.status);
      if (res.status !== 200) failures.push(`${res.status} ${body}`);
    };
    await get();
    expect(statuses).toEqual([200]);

    let done = false;
    const rotation = runCli(['master-key', 'rotate'], env).finally(() => (done = true));
    let during = 0;
    while (!done) {
      await get();
      during++;
    }
    const result = await rotation;
    expect(result.code, result.stderr).toBe(0);
    expect(during).toBeGreaterThan(5);
    // After: the store is all under key 2, which only the reloaded keyring holds.
    for (let i = 0; i < 15; i++) {
      await get();
      await new Promise((r) => setTimeout(r, 40));
    }
    expect(wrapsOf(await status(env))).toMatchObject({ 1: 0 });
    const removed = await runCli(['master-key', 'remove', '--version', '1'], env);
    expect(removed.code, removed.stderr).toBe(0);
    for (let i = 0; i < 10; i++) {
      await get();
      await new Promise((r) => setTimeout(r, 40));
    }
    expect(failures).toEqual([]);
    expect(statuses.every((s) => s === 200)).toBe(true);
    expect(upstream.requests.length).toBe(statuses.length);
    expect(upstream.requests.every((r) => r.headers.authorization === `Bearer ${SECRET}`)).toBe(true);
    expect(proxy.logs()).toContain('master key file reloaded');

    // A new credential version sealed under the new key is served too.
    const NEXT = 'tok_CANARY_master_key_rotate_2';
    const keyRotate = await runCli(['keys', 'rotate', 'key', '--from-stdin', '--grace', '0'], env, JSON.stringify({ token: NEXT }));
    expect(keyRotate.code, keyRotate.stderr).toBe(0);
    await eventually(async () => {
      await get();
      return upstream.requests.at(-1)!.headers.authorization === `Bearer ${NEXT}`;
    }, 3_000, 'the new version to be served');
    expect(failures).toEqual([]);
  });
});

interface Spawned {
  readonly exit: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
  kill(): void;
}

function spawnCli(args: readonly string[], env: Record<string, string>): Spawned {
  const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stderr }));
  });
  return { exit, kill: () => child.exitCode === null && child.signalCode === null && child.kill('SIGKILL') };
}

const randomIn = (lo: number, hi: number) => lo + Math.floor(Math.random() * (hi - lo));

describe('master-key rotate killed at random moments (file store, 300 credentials)', () => {
  it('leaves a readable keyring and a decryptable store after every SIGKILL; rotate --resume then completes', async () => {
    const dir = await tempDir();
    const env = envFor(dir);
    const keyPath = join(dir, 'master.key');
    const storePath = join(dir, 'store.json');
    const keyring = await createKeyring(keyPath);
    const { records, expected } = makeRecords(keyring, 300, true);
    await writeStoreFile(storePath, records);

    // From before the keyring is written to late in the re-wrap (a full run takes about 3 s here).
    const delays = [randomIn(20, 300), randomIn(300, 700), randomIn(700, 1200), randomIn(1200, 1800), randomIn(1800, 2600)].sort(() => Math.random() - 0.5);
    const log: string[] = [];
    for (const delay of delays) {
      const child = spawnCli(['master-key', 'rotate'], env);
      const timer = setTimeout(() => child.kill(), delay);
      const outcome = await child.exit;
      clearTimeout(timer);
      log.push(`${delay}ms: ${outcome.signal ?? `exit ${outcome.code}`}`);
      if (outcome.signal === null) expect(outcome.code, `rotate finished before the kill but failed: ${outcome.stderr}`).toBe(0);

      const kr = await readKeyring(keyPath);
      expect(kr.active).toBe(Math.max(...kr.versions().map((v) => v.version)));
      const wraps = verifyAll(await load(`file:${storePath}`), kr, expected);
      for (const kek of wraps.keys()) expect(kr.get(kek)).toBeDefined();
    }

    const resumed = await runCli(['master-key', 'rotate', '--resume'], env);
    expect(resumed.code, `rotate --resume after kills (${log.join(', ')}): ${resumed.stderr}`).toBe(0);
    const kr = await readKeyring(keyPath);
    const s = await status(env);
    for (const v of s.versions) expect(v.wraps).toBe(v.version === kr.active ? expected.size : 0);
    expect(s.missing_versions).toEqual([]);
    expect(Object.fromEntries(verifyAll(await load(`file:${storePath}`), kr, expected))).toEqual({ [kr.active]: expected.size });
  }, 60_000);

  it('a rotate killed in the middle of its re-wrap can be resumed at once: the dead writer does not block the store', async () => {
    const dir = await tempDir();
    const env = envFor(dir);
    const keyPath = join(dir, 'master.key');
    const storePath = join(dir, 'store.json');
    const keyring = await createKeyring(keyPath);
    const { records, expected } = makeRecords(keyring, 300, false);
    await writeStoreFile(storePath, records);

    const child = spawnCli(['master-key', 'rotate'], env);
    // Wait until the re-wrap is under way (some records under key 2), then kill it.
    await eventually(async () => {
      const text = await readFile(storePath, 'utf8').catch(() => '');
      return /"kek":\s*2/.test(text);
    }, 10_000, 'the re-wrap to start');
    child.kill();
    const outcome = await child.exit;
    expect(outcome.signal).toBe('SIGKILL');
    const lockLeft = existsSync(`${storePath}.lock`);
    const mid = wrapsOf(await status(env));
    expect(mid[1]! + mid[2]!).toBe(expected.size);
    expect(mid[2]).toBeGreaterThan(0);

    const resumed = await runCli(['master-key', 'rotate', '--resume'], env);
    expect(resumed.code, `resume after a kill mid re-wrap (lock file left behind: ${lockLeft}): ${resumed.stderr}`).toBe(0);
    expect(wrapsOf(await status(env))).toEqual({ 1: 0, 2: expected.size });
    verifyAll(await load(`file:${storePath}`), await readKeyring(keyPath), expected);
  }, 30_000);
});

describe('master-key rotate with a Redis store', () => {
  let redis: TestRedis;
  beforeAll(async () => {
    redis = await TestRedis.create();
  });
  afterAll(async () => {
    await redis?.destroy();
  });

  it('re-wraps every record in Redis; every credential still decrypts; the old key can then be removed', async () => {
    const dir = await tempDir();
    const env = envFor(dir, { EGRESS_STORE: redis.url });
    const keyPath = join(dir, 'master.key');
    const keyring1 = await createKeyring(keyPath);
    const { records, expected } = makeRecords(keyring1, 30, true);
    const store = openStore(redis.url);
    try {
      for (const r of records) await store.put('credential', r, 0);
    } finally {
      await store.close();
    }
    expect(wrapsOf(await status(env))).toEqual({ 1: expected.size });

    const rotated = await runCli(['master-key', 'rotate', '--json'], env);
    expect(rotated.code, rotated.stderr).toBe(0);
    expect(JSON.parse(rotated.stdout)).toMatchObject({ active: 2, rewrapped: records.length });
    expect(wrapsOf(await status(env))).toEqual({ 1: 0, 2: expected.size });
    const keyring2 = await readKeyring(keyPath);
    const snapshot = await load(redis.url);
    expect(Object.fromEntries(verifyAll(snapshot, keyring2, expected))).toEqual({ 2: expected.size });
    for (const r of records) {
      const after = snapshot.credentials.get(r.id)!;
      expect(after.revision).toBe(r.revision + 1);
      expect(after.history!.at(-1)!.action).toBe('rewrap');
      for (const v of r.versions) if (v.data) expect(after.versions.find((x) => x.version === v.version)!.data).toEqual(v.data);
    }

    expect((await runCli(['master-key', 'remove', '--version', '2'], env)).code).toBe(1);
    const removed = await runCli(['master-key', 'remove', '--version', '1'], env);
    expect(removed.code, removed.stderr).toBe(0);
    verifyAll(await load(redis.url), await readKeyring(keyPath), expected);
    // A second rotate re-wraps again; nothing is lost.
    expect((await runCli(['master-key', 'rotate'], env)).code).toBe(0);
    expect(wrapsOf(await status(env))).toEqual({ 2: 0, 3: expected.size });
    verifyAll(await load(redis.url), await readKeyring(keyPath), expected);
  });
});

describe('the store\'s master key floor seen by master-key', () => {
  let redis: TestRedis;
  beforeAll(async () => {
    redis = await TestRedis.create();
  });
  afterAll(async () => {
    await redis?.destroy();
  });

  it('with an older copy of the master key file (the store\'s floor above its newest key): rotate and remove change nothing and say so; status shows the floor and exits 1', async () => {
    const dir = await tempDir();
    const env = envFor(dir);
    const keyPath = join(dir, 'master.key');
    const storePath = join(dir, 'store.json');
    const keyring = await createKeyring(keyPath);
    const { records } = makeRecords(keyring, 3, false);
    await writeStoreFile(storePath, records);
    expect((await runCli(['master-key', 'rotate'], env)).code).toBe(0);
    // A host that still has the file as it was after the first rotation.
    const older = join(dir, 'older.key');
    await writeKeyring(older, await readKeyring(keyPath));
    expect((await runCli(['master-key', 'rotate'], env)).code).toBe(0);
    const olderEnv = envFor(dir, { EGRESS_MASTER_KEY_FILE: older });
    const before = await readFile(older, 'utf8');
    for (const args of [['master-key', 'rotate'], ['master-key', 'remove', '--version', '1']]) {
      const res = await runCli(args, olderEnv);
      expect(res.code, args.join(' ')).toBe(1);
      expect(res.stderr).toContain(`the store takes new data keys from master key version 3 on, but the newest key in ${older} is version 2: this file is an older copy`);
      expect(res.stderr).toContain('nothing was changed');
    }
    // Every attempt used to add a key version that nothing would ever use.
    expect(await readFile(older, 'utf8')).toBe(before);
    const shown = await runCli(['master-key', 'status', '--json'], olderEnv);
    expect(shown.code).toBe(1);
    expect(JSON.parse(shown.stdout)).toMatchObject({ kek_floor: 3 });
    const current = await runCli(['master-key', 'status'], env);
    expect(current.code, current.stderr).toBe(0);
    expect(current.stdout).toContain('the store takes new data keys wrapped by key version 3 or later');
  });

  it('a Redis floor edited by hand into "nan" does not switch the floor off for good: rotate raises it again', async () => {
    const dir = await tempDir();
    const db = 5;
    const store = `${redis.url}/${db}`;
    const env = envFor(dir, { EGRESS_STORE: store });
    const keyring = await createKeyring(join(dir, 'master.key'));
    const admin = redis.client({ db });
    try {
      await admin.flushdb();
      const backend = openStore(store);
      try {
        for (const r of makeRecords(keyring, 2, false).records) await backend.put('credential', r, 0);
      } finally {
        await backend.close();
      }
      await admin.set('egress:{egress}:kek-floor', 'nan');
      expect((await runCli(['master-key', 'rotate'], env)).code).toBe(0);
      expect(await admin.get('egress:{egress}:kek-floor')).toBe('2');
      expect(JSON.parse((await runCli(['master-key', 'status', '--json'], env)).stdout)).toMatchObject({ kek_floor: 2 });
    } finally {
      admin.disconnect();
    }
  });
});
