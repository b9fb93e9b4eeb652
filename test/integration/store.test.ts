import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FileStore } from '../../src/store/file-store.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { apiKeyRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

const SECRET_A = 'sk_live_CANARY_aaaa1111';
const SECRET_B = 'sk_live_CANARY_bbbb2222';
let upstream: Upstream;
let proxy: TestProxy;

const route = (name: string, credential: string) => apiKeyRoute({ upstream: upstream.url, name, credential, callers: ['svc', 'late'] });

beforeAll(async () => {
  upstream = await startUpstream();
});
afterAll(async () => {
  await upstream?.close();
});
afterEach(async () => {
  await proxy?.close();
});

async function start(): Promise<void> {
  proxy = await startTestProxy({
    routes: { a: route('a', 'cred-a'), b: route('b', 'cred-b'), c: route('c', 'cred-c') },
    credentials: { 'cred-a': { secret: SECRET_A }, 'cred-b': { secret: SECRET_B } },
    callers: ['svc'],
  });
}

const get = (path: string, token: string) => fetch(`${proxy.url}${path}`, { headers: { 'x-egress-token': token } });

type StoreFile = { credentials: Record<string, { versions: { data: { ct: string; tag: string; nonce: string }; dek: { ct: string } }[] }> };

async function editStore(edit: (doc: StoreFile) => void): Promise<void> {
  const doc = JSON.parse(await readFile(proxy.storePath, 'utf8')) as StoreFile;
  edit(doc);
  await writeFile(proxy.storePath, JSON.stringify(doc));
}

function flip(b64: string): string {
  const buf = Buffer.from(b64, 'base64');
  buf[0] = buf[0]! ^ 1;
  return buf.toString('base64');
}

describe('the encrypted store', () => {
  it('keeps only ciphertext on disk, with mode 0600', async () => {
    await start();
    const text = await readFile(proxy.storePath, 'utf8');
    expect(text).not.toContain(SECRET_A);
    expect(text).not.toContain(Buffer.from(SECRET_A).toString('base64'));
    const { stat } = await import('node:fs/promises');
    expect((await stat(proxy.storePath)).mode & 0o777).toBe(0o600);
  });

  it.each([
    ['ciphertext', (d: StoreFile) => { d.credentials['cred-a']!.versions[0]!.data.ct = flip(d.credentials['cred-a']!.versions[0]!.data.ct); }],
    ['tag', (d: StoreFile) => { d.credentials['cred-a']!.versions[0]!.data.tag = flip(d.credentials['cred-a']!.versions[0]!.data.tag); }],
    ['nonce', (d: StoreFile) => { d.credentials['cred-a']!.versions[0]!.data.nonce = flip(d.credentials['cred-a']!.versions[0]!.data.nonce); }],
    ['wrapped data key', (d: StoreFile) => { d.credentials['cred-a']!.versions[0]!.dek.ct = flip(d.credentials['cred-a']!.versions[0]!.dek.ct); }],
    ['short tag', (d: StoreFile) => { const v = d.credentials['cred-a']!.versions[0]!; v.data.tag = Buffer.from(v.data.tag, 'base64').subarray(0, 12).toString('base64'); }],
    ['ciphertext swapped in from another credential', (d: StoreFile) => { d.credentials['cred-a']!.versions[0] = d.credentials['cred-b']!.versions[0]!; }],
  ])('a tampered record (%s) fails closed with 503, logged without its contents; others keep working', async (_what, edit) => {
    await start();
    expect((await get('/a/x', proxy.tokens.svc!)).status).toBe(200);
    const before = upstream.requests.length;
    await editStore(edit);
    await eventually(async () => (await get('/a/x', proxy.tokens.svc!)).status === 503, 3_000, 'the tampered record to fail closed');
    const res = await get('/a/x', proxy.tokens.svc!);
    expect(res.headers.get('x-egress-error')).toBe('credential_unavailable');
    expect(await res.text()).not.toContain(SECRET_B);
    expect(upstream.requests.slice(before).some((r) => r.headers['x-api-key'] === SECRET_B && r.url === '/x' && r.headers.host)).toBe(false);
    expect((await get('/b/x', proxy.tokens.svc!)).status).toBe(200);
    const logs = proxy.logs();
    expect(logs).toMatch(/integrity check|damaged/);
    expect(logs).not.toContain(SECRET_A);
    expect(logs).not.toContain(SECRET_B);
  });

  it('a record that is not even the right shape fails closed on its own', async () => {
    await start();
    await editStore((d) => {
      (d.credentials as Record<string, unknown>)['cred-a'] = { id: 'cred-a', garbage: true };
    });
    await eventually(async () => (await get('/a/x', proxy.tokens.svc!)).status === 503, 3_000, 'the damaged record to fail closed');
    expect((await get('/b/x', proxy.tokens.svc!)).status).toBe(200);
  });
});

describe('changes made with the CLI reach a running proxy within a second', () => {
  it('callers add, keys put and callers revoke', async () => {
    await start();
    const env = envFor(proxy.dir);

    const added = await runCli(['callers', 'add', 'late', '--json'], env);
    expect(added.code).toBe(0);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    const t1 = await eventually(async () => (await get('/a/x', token)).status === 200, 1_000, 'the new caller to work');
    expect(t1).toBeLessThan(1_000);

    expect((await get('/c/x', token)).status).toBe(503);
    const put = await runCli(['keys', 'put', 'cred-c', '--from-stdin'], env, JSON.stringify({ secret: 'sk_live_CANARY_cccc3333' }));
    expect(put.code).toBe(0);
    await eventually(async () => (await get('/c/x', token)).status === 200, 1_000, 'the new credential to be used');
    expect(upstream.requests.at(-1)!.headers['x-api-key']).toBe('sk_live_CANARY_cccc3333');

    const revoked = await runCli(['callers', 'revoke', 'late'], env);
    expect(revoked.code).toBe(0);
    await eventually(async () => (await get('/a/x', token)).status === 401, 1_000, 'the revoked caller to be refused');
  });
});

describe('a proxy started before its store file exists (a first run)', () => {
  it('the first CLI change, the one that creates the file, reaches it within a second', async () => {
    // No credentials and no callers: nothing writes store.json before the proxy starts.
    proxy = await startTestProxy({ routes: { a: route('a', 'cred-a') } });
    const env = envFor(proxy.dir);
    await expect(readFile(proxy.storePath)).rejects.toThrow(/ENOENT/);
    const added = await runCli(['callers', 'add', 'svc', '--json'], env);
    expect(added.code, added.stderr).toBe(0);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    // Known to the proxy: the route's credential is missing (503), not the caller (401).
    const waited = await eventually(async () => (await get('/a/x', token)).status === 503, 1_500, 'the new caller to be known');
    expect(waited).toBeLessThan(1_000);
    const put = await runCli(['keys', 'put', 'cred-a', '--from-stdin'], env, JSON.stringify({ secret: SECRET_A }));
    expect(put.code, put.stderr).toBe(0);
    await eventually(async () => (await get('/a/x', token)).status === 200, 1_000, 'the new credential to be used');
  });
});

describe('the file store\'s usage table, damaged by hand', () => {
  it.each([
    ['null', null],
    ['a string', 'garbage'],
    ['an array', ['x']],
  ])('a credential\'s usage entry that is %s: keys show still describes the credential, and the next usage write replaces it', async (_what, damaged) => {
    const dir = await makeTempDir('egress-usage-damaged-');
    try {
      await seedDataDir(dir, { routes: {}, credentials: { k: { secret: SECRET_A } } });
      const path = join(dir, 'store.json');
      const doc = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
      await writeFile(path, JSON.stringify({ ...doc, usage: { k: damaged } }), { mode: 0o600 });

      const shown = await runCli(['keys', 'show', 'k', '--json'], envFor(dir));
      expect(shown.code, shown.stderr).toBe(0);
      expect(JSON.parse(shown.stdout).versions[0].last_used).toEqual([]);

      const store = new FileStore(path);
      const at = new Date().toISOString();
      await store.recordUsage([{ credential: 'k', version: 1, caller: 'svc', at }]);
      expect(await store.readUsage('k')).toEqual([{ credential: 'k', version: 1, caller: 'svc', at }]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
