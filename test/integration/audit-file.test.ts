import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** The audit file as it is on disk after the things that happen to files: a crash mid-line. */
const SECRET = 'sk_audit_file_CANARY_6061';
let upstream: Upstream;

beforeAll(async () => {
  upstream = await startUpstream((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{}');
  });
});
afterAll(async () => {
  await upstream?.close();
});

async function dataDir(prefix: string): Promise<{ dir: string; token: string }> {
  const dir = await makeTempDir(prefix);
  const { tokens } = await seedDataDir(dir, { routes: { api: bearerRoute({ upstream: upstream.url, paths: ['/ok'] }) }, credentials: { key: { token: SECRET } }, callers: ['svc'] });
  return { dir, token: tokens.svc! };
}

/** One request through the proxy; its request id (the audit line names it). */
async function call(base: string, token: string): Promise<string> {
  const res = await fetch(`${base}/api/ok`, { headers: { 'x-egress-token': token } });
  await res.text();
  expect(res.status).toBe(200);
  return res.headers.get('x-request-id')!;
}

const lines = async (path: string) => (await readFile(path, 'utf8').catch(() => '')).split('\n').filter((l) => l !== '');

describe('a torn last line (the process died in the middle of writing it)', () => {
  it('a proxy restarted on it keeps the chain verifiable: verify names the torn line and still checks every line after it', async () => {
    const { dir, token } = await dataDir('egress-audit-torn-');
    const path = join(dir, 'audit.log');
    let proxy = await startTestProxy({ routes: {}, dir });
    for (let i = 0; i < 3; i++) await call(proxy.url, token);
    await proxy.close();
    // What a SIGKILL or a power cut during the last write leaves on disk: the last line cut short.
    const before = await readFile(path, 'utf8');
    const cut = before.length - Math.floor((before.length - before.lastIndexOf('\n', before.length - 2)) / 2);
    await truncate(path, Buffer.byteLength(before.slice(0, cut)));
    expect((await readFile(path, 'utf8')).endsWith('\n')).toBe(false);
    // Before a restart the tear is the end of the file: reported there, after every line before it was checked.
    const torn = await runCli(['audit', 'verify'], envFor(dir));
    expect(torn.code).toBe(1);
    expect(torn.stdout).toContain(`${path}:3: the last line is incomplete`);

    proxy = await startTestProxy({ routes: {}, dir });
    const after = [];
    for (let i = 0; i < 3; i++) after.push(await call(proxy.url, token));
    await proxy.close();
    const written = await lines(path);
    // The torn fragment is kept on a line of its own; the lines after it are whole JSON lines.
    expect(written[2]!.endsWith('}')).toBe(false);
    for (const line of written.slice(3)) expect(() => JSON.parse(line) as unknown).not.toThrow();
    for (const id of after) expect(written.join('\n')).toContain(id);

    const ok = await runCli(['audit', 'verify'], envFor(dir));
    expect(ok.stdout + ok.stderr).toContain('audit chain intact');
    expect(ok.stdout).toContain(`${path}:3`);
    expect(ok.code).toBe(0);

    // Verify is still useful after the tear: an edit to a later line is found, where it is.
    const edited = [...written];
    edited[5] = edited[5]!.replace('"decision":"allow"', '"decision":"deny"');
    await writeFile(path, `${edited.join('\n')}\n`);
    const bad = await runCli(['audit', 'verify'], envFor(dir));
    expect(bad.code).toBe(1);
    expect(bad.stdout).toContain(`${path}:7`);

    // The torn fragment is covered by the chain too: it cannot be swapped for another one.
    const swapped = [...written];
    swapped[2] = `${swapped[2]!.slice(0, -3)}xyz`;
    await writeFile(path, `${swapped.join('\n')}\n`);
    const badFragment = await runCli(['audit', 'verify'], envFor(dir));
    expect(badFragment.code).toBe(1);
    expect(badFragment.stdout).toContain(`${path}:3`);
  }, 30_000);
});
