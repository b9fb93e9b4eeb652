import { readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { oauth2Route } from '../helpers/routes.ts';
import { TestRedis } from '../helpers/redis.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * The store loses its data while instances run (Redis restarted without persistence, a FLUSHALL by
 * mistake, a store file replaced by a fresh one). The instances keep the records they had; the
 * records ops then create again start over at revision 1, and must still reach every instance:
 * a caller added again and then revoked has to stop working everywhere.
 */
const OLD = 'sk-old-incarnation-1111';
const NEW = 'sk-new-incarnation-2222';
const NEWER = 'sk-new-incarnation-3333';

let redis: TestRedis | undefined;
let upstream: Upstream | undefined;
let serves: ServeProcess[] = [];
let dir: string | undefined;

afterEach(async () => {
  await Promise.all(serves.map((s) => s.stop()));
  serves = [];
  await upstream?.close();
  await redis?.destroy();
  redis = undefined;
  if (dir) await rm(dir, { recursive: true, force: true });
  dir = undefined;
});

async function call(serve: ServeProcess, token: string): Promise<{ status: number; key?: string }> {
  const res = await fetch(`${serve.url}/a/x`, { headers: { 'x-egress-token': token } });
  const text = await res.text();
  return res.status === 200 ? { status: 200, key: (JSON.parse(text) as { headers: Record<string, string> }).headers['x-api-key'] } : { status: res.status };
}

/** Every instance answers `token` as `expected` (status and, for 200, the key sent upstream). */
async function everywhere(token: string, expected: { status: number; key?: string }, what: string): Promise<void> {
  for (const [i, serve] of serves.entries()) {
    await eventually(async () => {
      const got = await call(serve, token);
      return got.status === expected.status && got.key === expected.key;
    }, 5_000, `instance ${i + 1}: ${what}`);
  }
}

describe.each(['redis', 'file'] as const)('%s store: data lost while instances run', (backend) => {
  it('records created again afterwards reach every running instance: a re-added caller is revoked everywhere, a re-put key and its rotation are sent', async () => {
    upstream = await startUpstream();
    dir = await makeTempDir('egress-data-loss-');
    if (backend === 'redis') redis = await TestRedis.create();
    const store = redis ? redis.url : `file:${join(dir, 'store.json')}`;
    const route = `name: a
prefix: /a
upstream: ${upstream.url}
allow_private_addresses: true
credential: cred-a
inject:
  scheme: headers
  headers:
    X-Api-Key: "{secret}"
allow:
  - caller: svc
    methods: [GET]
    paths: [/x]
`;
    const { tokens } = await seedDataDir(dir, { routes: { a: route }, credentials: { 'cred-a': { secret: OLD } }, callers: ['svc'], store });
    const env = envFor(dir, { EGRESS_STORE: store });
    // Records created in the same millisecond as the seeded ones would be the same incarnation.
    await new Promise((r) => setTimeout(r, 5));
    for (const n of [1, 2]) serves.push(await startServe({ ...env, EGRESS_AUDIT_LOG: join(dir, `audit-${n}.log`) }));
    // Some history first: the records the instances keep are at revision 3.
    for (const n of [2, 3]) {
      expect((await runCli(['keys', 'rotate', 'cred-a', '--from-stdin'], env, JSON.stringify({ secret: `${OLD}-${n}` }))).code).toBe(0);
      expect((await runCli(['callers', 'rotate', 'svc', '--grace', '1h'], env)).code).toBe(0);
    }
    await everywhere(tokens.svc!, { status: 200, key: `${OLD}-3` }, 'the seeded caller and the rotated key');

    // The data goes.
    if (redis) {
      const c = redis.client();
      await c.flushall();
      c.disconnect();
    } else {
      await writeFile(join(dir, 'fresh-store.json'), JSON.stringify({ format: 'egress-store/1', credentials: {}, callers: {}, admins: {} }));
      await rename(join(dir, 'fresh-store.json'), join(dir, 'store.json'));
    }
    // Every instance notices and keeps what it had (a vanished record is not taken as a revocation).
    for (const serve of serves) await eventually(() => serve.output().includes('store_rollback'), 5_000, 'the records seen gone');
    await everywhere(tokens.svc!, { status: 200, key: `${OLD}-3` }, 'the kept records still serving');

    // Ops create the records again: revision 1 once more.
    expect((await runCli(['keys', 'put', 'cred-a', '--from-stdin'], env, JSON.stringify({ secret: NEW }))).code).toBe(0);
    const added = await runCli(['callers', 'add', 'svc', '--json'], env);
    expect(added.code, added.stderr).toBe(0);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    await everywhere(token, { status: 200, key: NEW }, 'the new caller token and the re-put key');
    await everywhere(tokens.svc!, { status: 401 }, 'the old incarnation\'s token gone');

    expect((await runCli(['keys', 'rotate', 'cred-a', '--from-stdin'], env, JSON.stringify({ secret: NEWER }))).code).toBe(0);
    await everywhere(token, { status: 200, key: NEWER }, 'the rotated key');
    expect((await runCli(['callers', 'revoke', 'svc'], env)).code).toBe(0);
    await everywhere(token, { status: 401 }, 'the revocation');

    for (const [i, serve] of serves.entries()) {
      const out = serve.output();
      expect(out).toContain('store_new_incarnation');
      for (const secret of [OLD, NEW, NEWER, token, tokens.svc!]) expect(out).not.toContain(secret);
      // The changes made to the new records are audited on every instance, as any other change.
      const audit = join(dir, `audit-${i + 1}.log`);
      for (const action of ['credential.put', 'caller.add', 'credential.rotate', 'caller.revoke']) {
        await eventually(async () => (await readFile(audit, 'utf8')).includes(`"${action}"`), 5_000, `instance ${i + 1} audits ${action}`);
      }
    }
  }, 60_000);

  /**
   * An OAuth2 route on a token endpoint that says which client secret minted each token (`gate`
   * may hold a mint's answer), an API that echoes it, and one `serve` on the `backend` store.
   */
  async function startMintLab(backend: 'redis' | 'file', gate: (answer: () => void) => void = (answer) => answer()) {
    const mintedWith = new Map<string, string>();
    upstream = await startUpstream((req, res) => {
      const json = (doc: unknown) => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(doc));
      };
      if (req.url === '/connect/token') {
        const secret = Buffer.from(String(req.headers.authorization).replace(/^Basic /, ''), 'base64').toString().split(':').map(decodeURIComponent)[1]!;
        return gate(() => {
          const token = `at_${mintedWith.size + 1}`;
          mintedWith.set(token, secret);
          json({ access_token: token, token_type: 'Bearer', expires_in: 3600 });
        });
      }
      json({ minted_with: mintedWith.get(String(req.headers.authorization).replace(/^Bearer /, '')) ?? null });
    });
    const folder = await makeTempDir('egress-data-loss-');
    dir = folder;
    if (backend === 'redis') redis = await TestRedis.create();
    const store = redis ? redis.url : `file:${join(folder, 'store.json')}`;
    const route = oauth2Route(upstream.url);
    const { tokens } = await seedDataDir(folder, { routes: { bank: route }, credentials: { bank: { client_id: 'client-1', client_secret: OLD } }, callers: ['svc'], store });
    const env = envFor(folder, { EGRESS_STORE: store });
    await new Promise((r) => setTimeout(r, 5));
    const serve = await startServe(env);
    serves.push(serve);
    /** Which secret minted the token the proxy sends now. */
    const mintedWithNow = async () => {
      const res = await fetch(`${serve.url}/bank/accounts`, { headers: { 'x-egress-token': tokens.svc! } });
      expect(res.status).toBe(200);
      return ((await res.json()) as { minted_with: string | null }).minted_with;
    };
    /** The store loses its data (FLUSHALL, or a fresh store file); the instance keeps what it saw. */
    const loseData = async () => {
      if (redis) {
        const c = redis.client();
        await c.flushall();
        c.disconnect();
      } else {
        await writeFile(join(folder, 'fresh-store.json'), JSON.stringify({ format: 'egress-store/1', credentials: {}, callers: {}, admins: {} }));
        await rename(join(folder, 'fresh-store.json'), join(folder, 'store.json'));
      }
      await eventually(() => serve.output().includes('store_rollback'), 5_000, 'the records seen gone');
    };
    const putAgain = async () => expect((await runCli(['keys', 'put', 'bank', '--from-stdin'], env, JSON.stringify({ client_id: 'client-1', client_secret: NEW }))).code).toBe(0);
    return { mintedWith, serve, mintedWithNow, loseData, putAgain };
  }

  it('a key put again is not mistaken for the lost one: OAuth2 tokens minted with the lost key\'s version 1 are not sent for the new version 1', async () => {
    const lab = await startMintLab(backend);
    expect(await lab.mintedWithNow()).toBe(OLD);
    await lab.loseData();
    await lab.putAgain();
    await eventually(async () => (await lab.mintedWithNow()) === NEW, 5_000, 'a token minted with the key put again');
    for (const secret of [OLD, NEW, ...lab.mintedWith.keys()]) expect(lab.serve.output()).not.toContain(secret);
  }, 60_000);

  it('a token minted with the lost key while the key is put again is not kept for the new version 1', async () => {
    // The token endpoint holds its answers while `held` is set.
    let held: (() => void)[] | undefined;
    let minting = 0;
    const lab = await startMintLab(backend, (answer) => {
      minting++;
      if (held) held.push(answer);
      else answer();
    });
    await lab.loseData();
    // A request on the kept record is minting with the lost secret when the key is put again.
    held = [];
    const inFlight = lab.mintedWithNow();
    await eventually(() => minting === 1, 5_000, 'the mint with the lost secret under way');
    await lab.putAgain();
    await eventually(() => lab.serve.output().includes('store_new_incarnation'), 5_000, 'the key put again seen');
    const answers = held;
    held = undefined;
    for (const answer of answers) answer();
    expect(await inFlight).toBe(OLD);
    expect(await lab.mintedWithNow()).toBe(NEW);
    for (const secret of [OLD, NEW, ...lab.mintedWith.keys()]) expect(lab.serve.output()).not.toContain(secret);
  }, 60_000);
});
