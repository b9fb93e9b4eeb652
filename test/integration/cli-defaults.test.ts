import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { runCli, startServe } from '../helpers/cli.ts';
import { envFor, makeTempDir } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { startUpstream } from '../helpers/upstream.ts';

/** The documented defaults of the CLI's flags and the settings every command takes as flags. */

const DAY = 86_400_000;
let dir: string;
let env: Record<string, string>;

beforeEach(async () => {
  dir = await makeTempDir('egress-cli-defaults-');
  env = envFor(dir);
  await mkdir(join(dir, 'routes'));
});

interface StoreDoc {
  credentials: Record<string, { versions: { version: number; state: string; grace_until?: string }[]; history?: { actor: string; action: string }[] }>;
  callers: Record<string, { tokens: { expires_at?: string }[]; history?: { actor: string }[] }>;
}
const storeDoc = async () => JSON.parse(await readFile(join(dir, 'store.json'), 'utf8')) as StoreDoc;

/** How far from now + 24 h a grace end is, in ms. */
const offDay = (iso: string | undefined) => Math.abs(Date.parse(iso ?? '') - (Date.now() + DAY));

describe('--grace defaults to 24h', () => {
  it('keys rotate and keys promote keep the previous version usable for 24 hours when no --grace is given', async () => {
    expect((await runCli(['master-key', 'init'], env)).code).toBe(0);
    expect((await runCli(['keys', 'put', 'k', '--from-stdin'], env, '{"token":"tok_v1_aaaaaaaa"}')).code).toBe(0);
    expect((await runCli(['keys', 'rotate', 'k', '--from-stdin'], env, '{"token":"tok_v2_bbbbbbbb"}')).code).toBe(0);
    let previous = (await storeDoc()).credentials.k!.versions.find((v) => v.state === 'previous');
    expect(previous?.version).toBe(1);
    expect(offDay(previous?.grace_until)).toBeLessThan(60_000);

    expect((await runCli(['keys', 'rotate', 'k', '--from-stdin', '--stage'], env, '{"token":"tok_v3_cccccccc"}')).code).toBe(0);
    expect((await runCli(['keys', 'promote', 'k'], env)).code).toBe(0);
    previous = (await storeDoc()).credentials.k!.versions.find((v) => v.state === 'previous');
    expect(previous?.version).toBe(2);
    expect(offDay(previous?.grace_until)).toBeLessThan(60_000);
  });

  it('callers rotate keeps the old token working for 24 hours when no --grace is given', async () => {
    expect((await runCli(['callers', 'add', 'svc'], env)).code).toBe(0);
    const rotated = await runCli(['callers', 'rotate', 'svc', '--json'], env);
    expect(rotated.code).toBe(0);
    expect(JSON.parse(rotated.stdout)).toMatchObject({ caller: 'svc', grace_ms: DAY });
    const tokens = (await storeDoc()).callers.svc!.tokens;
    expect(tokens).toHaveLength(2);
    expect(offDay(tokens.find((t) => t.expires_at)?.expires_at)).toBeLessThan(60_000);
  });
});

describe('EGRESS_ACTOR', () => {
  it('names who made a change in the record\'s history (which running proxies audit), instead of the OS user', async () => {
    const who = { ...env, EGRESS_ACTOR: 'rotation-job-17' };
    expect((await runCli(['master-key', 'init'], who)).code).toBe(0);
    expect((await runCli(['keys', 'put', 'k', '--from-stdin'], who, '{"token":"tok_v1_aaaaaaaa"}')).code).toBe(0);
    expect((await runCli(['callers', 'add', 'svc'], who)).code).toBe(0);
    const doc = await storeDoc();
    expect(doc.credentials.k!.history?.map((h) => h.actor)).toContain('cli:rotation-job-17');
    expect(doc.callers.svc!.history?.map((h) => h.actor)).toContain('cli:rotation-job-17');
  });
});

describe('egress serve takes every setting as a flag', () => {
  it('flags win over the environment: --listen, --admin-listen, --routes, --store, --master-key-file, --audit-log, --log-level', async () => {
    const upstream = await startUpstream();
    const real = await makeTempDir('egress-cli-flags-');
    try {
      const realEnv = envFor(real);
      await mkdir(join(real, 'routes'));
      expect((await runCli(['master-key', 'init'], realEnv)).code).toBe(0);
      expect((await runCli(['keys', 'put', 'key', '--from-stdin'], realEnv, '{"token":"tok_flags_secret_1"}')).code).toBe(0);
      const token = (JSON.parse((await runCli(['callers', 'add', 'svc', '--json'], realEnv)).stdout) as { token: string }).token;
      await writeFile(join(real, 'routes', 'api.yaml'), bearerRoute({ upstream: upstream.url, paths: ['/x'] }));
      // The environment names places that do not exist; only the flags make this proxy work.
      const wrong = { ...envFor(dir), EGRESS_LISTEN: '127.0.0.1:1', EGRESS_ADMIN_LISTEN: '127.0.0.1:1', EGRESS_LOG_LEVEL: 'silent' };
      const serve = await startServe(wrong, undefined, [
        '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--routes', realEnv.EGRESS_ROUTES!, '--store', realEnv.EGRESS_STORE!,
        '--master-key-file', realEnv.EGRESS_MASTER_KEY_FILE!, '--audit-log', realEnv.EGRESS_AUDIT_LOG!, '--log-level', 'info',
      ]);
      try {
        const res = await fetch(`${serve.url}/api/x`, { headers: { 'x-egress-token': token } });
        expect(res.status).toBe(200);
        await res.text();
        expect(upstream.requests.at(-1)?.headers.authorization).toBe('Bearer tok_flags_secret_1');
        expect((await fetch(`${serve.admin}/readyz`)).status).toBe(200);
        await new Promise((r) => setTimeout(r, 100));
        expect(await readFile(realEnv.EGRESS_AUDIT_LOG!, 'utf8')).toContain('"caller":"svc"');
      } finally {
        expect(await serve.stop()).toBe(0);
      }
    } finally {
      await upstream.close();
    }
  });
});
