import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { readFile, rename, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { lineHash } from '../../src/observe/audit.ts';
import { runCli, startServe } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** The audit file as it is on disk after the things that happen to files: a crash mid-line, logrotate, rm, a write refused. */
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

/** Three requests, and their lines in the file at `path` (nothing else written there yet); their ids are added to `ids`. */
async function threeLogged(base: string, token: string, path: string, ids: string[]): Promise<void> {
  for (let i = 0; i < 3; i++) ids.push(await call(base, token));
  await eventually(async () => (await lines(path)).length === 3, 3_000, 'the first lines');
}

/**
 * Keep calling until a line of one of the requests made here is in the file at `path` (lines are
 * written in batches a few ms after the request: any of them will do). Their ids are added to `ids`.
 */
async function callUntilLogged(base: string, token: string, path: string, ids: string[], ms: number, what: string): Promise<void> {
  const since = ids.length;
  await eventually(async () => {
    ids.push(await call(base, token));
    const text = await readFile(path, 'utf8').catch(() => '');
    return ids.slice(since).some((id) => text.includes(id));
  }, ms, what);
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

describe('the audit file moved or removed under a running proxy', () => {
  it('renamed away with a fresh file in its place (logrotate "create"), then deleted: new lines go to a new file at EGRESS_AUDIT_LOG within a second, and the chain continues', async () => {
    const { dir, token } = await dataDir('egress-audit-moved-');
    const path = join(dir, 'audit.log');
    const serve = await startServe(envFor(dir));
    const ids: string[] = [];
    try {
      await threeLogged(serve.url, token, path, ids);
      // logrotate without copytruncate: rename, then a fresh empty file in its place ("create").
      await rename(path, `${path}.1`);
      await writeFile(path, '', { mode: 0o600 });
      await callUntilLogged(serve.url, token, path, ids, 5_000, 'lines in the new file after the rename');
      // Removed outright: a new file is created at the path.
      await rm(path);
      await callUntilLogged(serve.url, token, path, ids, 5_000, 'lines in a new file after the removal');
      expect((await stat(path)).mode & 0o777).toBe(0o600);
    } finally {
      expect(await serve.stop()).toBe(0);
    }
    // The last requests are in the file that replaced the removed one, not in a file nobody can open.
    expect(await readFile(path, 'utf8')).toContain(ids.at(-1)!);
    // The new file continues the chain of the removed one: checked from its first line as a segment.
    const partial = await runCli(['audit', 'verify', '--partial', path], envFor(dir));
    expect(partial.code, partial.stdout).toBe(0);
    expect(serve.output()).not.toContain(SECRET);
  }, 30_000);

  it('renamed away: audit.log.1 and the new audit.log verify as one chain', async () => {
    const { dir, token } = await dataDir('egress-audit-renamed-');
    const path = join(dir, 'audit.log');
    const serve = await startServe(envFor(dir));
    const ids: string[] = [];
    try {
      await threeLogged(serve.url, token, path, ids);
      await rename(path, `${path}.1`);
      await callUntilLogged(serve.url, token, path, ids, 5_000, 'lines in a new file after the rename');
    } finally {
      expect(await serve.stop()).toBe(0);
    }
    const all = [...(await lines(`${path}.1`)), ...(await lines(path))].join('\n');
    for (const id of ids) expect(all).toContain(id);
    const ok = await runCli(['audit', 'verify'], envFor(dir));
    expect(ok.code, ok.stdout).toBe(0);
    expect(ok.stdout).toContain(`audit chain intact: ${ids.length} lines`);
  }, 30_000);
});

describe('the audit folder removed under a running proxy', () => {
  it('is made again (0700), and the lines continue in a new file there', async () => {
    const { dir, token } = await dataDir('egress-audit-folder-');
    const folder = join(dir, 'audit');
    const path = join(folder, 'audit.log');
    const serve = await startServe(envFor(dir, { EGRESS_AUDIT_LOG: path }));
    const ids: string[] = [];
    try {
      await threeLogged(serve.url, token, path, ids);
      await rm(folder, { recursive: true });
      await callUntilLogged(serve.url, token, path, ids, 8_000, 'lines in a new file in the folder made again');
      expect((await stat(folder)).mode & 0o777).toBe(0o700);
    } finally {
      expect(await serve.stop()).toBe(0);
    }
    expect(await readFile(path, 'utf8')).toContain(ids.at(-1)!);
    const partial = await runCli(['audit', 'verify', '--partial', path], envFor(dir));
    expect(partial.code, partial.stdout).toBe(0);
  }, 30_000);
});

describe('writes refused for a while (a full disk, a file size limit), then taken again', () => {
  it('the lines written afterwards continue a chain verify accepts: a recovery line ends the torn write and counts the lines lost', async () => {
    const { dir, token } = await dataDir('egress-audit-efbig-');
    const path = join(dir, 'audit.log');
    // The alert reaches the webhook as well as the log: whoever watches alerts hears of it.
    const hooks: string[] = [];
    const receiver = createServer((req, res) => {
      let body = '';
      req.on('data', (d: Buffer) => (body += d.toString()));
      req.on('end', () => {
        hooks.push(body);
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
    await writeFile(join(dir, 'webhook.secret'), 'whsec_audit_file_test_0123456789abcdef', { mode: 0o600 });
    const serve = await startServe(envFor(dir, { EGRESS_ALERT_WEBHOOK: `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hook`, EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'webhook.secret') }));
    const pid = String(serve.child.pid);
    const before: string[] = [];
    const during: string[] = [];
    const after: string[] = [];
    try {
      await threeLogged(serve.url, token, path, before);
      const size = (await stat(path)).size;
      // The file may grow by a line and a half more: a later write is cut short, then refused with
      // EFBIG, as a full disk refuses it (Node ignores SIGXFSZ). prlimit changes the running process's limit.
      expect(spawnSync('prlimit', ['--pid', pid, `--fsize=${size + Math.floor((size / 3) * 1.5)}:unlimited`]).status).toBe(0);
      for (let i = 0; i < 5; i++) {
        during.push(await call(serve.url, token));
        await new Promise((r) => setTimeout(r, 30));
      }
      await eventually(() => serve.output().includes('audit_write_failed'), 3_000, 'the write failure');
      await eventually(() => hooks.some((b) => (JSON.parse(b) as { id?: string }).id === 'audit_write_failed'), 5_000, 'the alert at the webhook');
      expect(spawnSync('prlimit', ['--pid', pid, '--fsize=unlimited:unlimited']).status).toBe(0);
      for (let i = 0; i < 3; i++) {
        after.push(await call(serve.url, token));
        await new Promise((r) => setTimeout(r, 30));
      }
      await eventually(async () => after.every((id) => readFileSync(path, 'utf8').includes(`"${id}"`)), 5_000, 'the lines after the failure');
    } finally {
      spawnSync('prlimit', ['--pid', pid, '--fsize=unlimited:unlimited']);
      expect(await serve.stop()).toBe(0);
      await new Promise<void>((r) => receiver.close(() => r()));
    }
    const written = await lines(path);
    const text = written.join('\n');
    for (const id of [...before, ...after]) expect(text).toContain(`"${id}"`);
    // Nothing was lost silently: the recovery line counts the requests whose lines never reached the file.
    const recoveries = written.filter((l) => l.includes('"kind":"recovery"')).map((l) => JSON.parse(l) as { reason: string; lost_lines: number });
    expect(recoveries.length).toBeGreaterThanOrEqual(1);
    const lost = during.filter((id) => !written.some((l) => l.startsWith('{') && l.endsWith('}') && l.includes(`"${id}"`))).length;
    expect(lost).toBeGreaterThan(0);
    expect(recoveries.reduce((n, r) => n + r.lost_lines, 0)).toBe(lost);
    const ok = await runCli(['audit', 'verify'], envFor(dir));
    expect(ok.stdout + ok.stderr).toContain('audit chain intact');
    expect(ok.code).toBe(0);
    expect(serve.output()).not.toContain(SECRET);
  }, 30_000);
});

describe('a head recorded outside the file (GET /v1/audit/head) and verify --head', () => {
  /** The head from the admin API, once it is a line of `file` from index `from` on; that index. */
  async function headIn(admin: string, adminToken: string, file: string, from: number): Promise<{ hash: string; lines_written: number; index: number }> {
    let found: { hash: string; lines_written: number; index: number } | undefined;
    await eventually(async () => {
      const res = await fetch(`${admin}/v1/audit/head`, { headers: { authorization: `Bearer ${adminToken}` } });
      expect(res.status).toBe(200);
      const head = (await res.json()) as { hash: string; lines_written: number; file: string };
      expect(head.file).toBe(file.replace(/\.1$/, ''));
      const index = (await lines(file)).findIndex((l) => lineHash(l) === head.hash);
      if (index >= from) found = { ...head, index };
      return found !== undefined;
    }, 3_000, 'a head among the lines written');
    return found!;
  }
  const upTo = (all: readonly string[], n: number) => (n === 0 ? '' : `${all.slice(0, n).join('\n')}\n`);

  it('the log cut back to before the head\'s line fails verify --head (exit 1) though its chain is intact; the whole log passes, across a logrotate rename', async () => {
    const { dir, token } = await dataDir('egress-audit-head-');
    const path = join(dir, 'audit.log');
    const env = envFor(dir);
    const created = await runCli(['admin-token', 'create', 'head-recorder', '--json'], env);
    expect(created.code, created.stderr).toBe(0);
    const adminToken = (JSON.parse(created.stdout) as { token: string }).token;
    const serve = await startServe(env);
    const ids: string[] = [];
    let before: Awaited<ReturnType<typeof headIn>>;
    let after: Awaited<ReturnType<typeof headIn>>;
    try {
      await threeLogged(serve.url, token, path, ids);
      before = await headIn(serve.admin, adminToken, path, 2);
      await callUntilLogged(serve.url, token, path, ids, 5_000, 'lines after the first head');
      // logrotate without copytruncate: the head's line now lives in audit.log.1.
      await rename(path, `${path}.1`);
      await callUntilLogged(serve.url, token, path, ids, 5_000, 'lines in the new file after the rename');
      after = await headIn(serve.admin, adminToken, path, 0);
      expect(after.lines_written).toBeGreaterThan(before.lines_written);
      await callUntilLogged(serve.url, token, path, ids, 5_000, 'lines after the second head');
    } finally {
      expect(await serve.stop()).toBe(0);
    }
    const rotated = await lines(`${path}.1`);
    const current = await lines(path);
    expect(lineHash(rotated[before.index]!)).toBe(before.hash);

    // The whole log reaches both heads: each is named where it is.
    const whole = await runCli(['audit', 'verify', '--head', before.hash], env);
    expect(whole.code, whole.stdout + whole.stderr).toBe(0);
    expect(whole.stdout).toContain(`${path}.1:${before.index + 1}: the recorded head`);
    const wholeLater = await runCli(['audit', 'verify', `--head=${after.hash.toUpperCase()}`], env);
    expect(wholeLater.code, wholeLater.stdout).toBe(0);
    expect(wholeLater.stdout).toContain(`${path}:${after.index + 1}: the recorded head`);

    // Cut back to just before the first head's line (the rest of audit.log.1 and all of audit.log gone).
    await writeFile(`${path}.1`, upTo(rotated, before.index));
    await writeFile(path, '');
    const plain = await runCli(['audit', 'verify'], env);
    expect(plain.code, 'without a head the cut cannot be seen').toBe(0);
    const cut = await runCli(['audit', 'verify', '--head', before.hash], env);
    expect(cut.code).toBe(1);
    expect(cut.stdout).toContain(`audit log does not reach the recorded head ${before.hash}`);
    expect(cut.stdout).toContain('the file ends before it');
    const cutJson = await runCli(['audit', 'verify', '--head', before.hash, '--json'], env);
    expect(cutJson.code).toBe(1);
    expect(JSON.parse(cutJson.stdout)).toMatchObject({ ok: false, lines: before.index, head: { hash: before.hash, found: false } });

    // The second head, in the file written after the rename: cut back to just before its line.
    await writeFile(`${path}.1`, upTo(rotated, rotated.length));
    await writeFile(path, upTo(current, after.index));
    expect((await runCli(['audit', 'verify', '--head', before.hash], env)).code).toBe(0);
    const cutLater = await runCli(['audit', 'verify', '--head', after.hash], env);
    expect(cutLater.code).toBe(1);
    expect(cutLater.stdout).toContain(`does not reach the recorded head ${after.hash}`);
    // The same through the explicit-file and stdin forms.
    expect((await runCli(['audit', 'verify', '--head', after.hash, `${path}.1`, path], env)).code).toBe(1);
    const stdinCut = await runCli(['audit', 'verify', '--head', after.hash, '-'], env, upTo(rotated, rotated.length) + upTo(current, after.index));
    expect(stdinCut.code).toBe(1);
    expect(stdinCut.stdout).toContain('does not reach the recorded head');
    const stdinWhole = await runCli(['audit', 'verify', '--head', after.hash, '-'], env, upTo(rotated, rotated.length) + upTo(current, current.length));
    expect(stdinWhole.code, stdinWhole.stdout).toBe(0);
    await writeFile(path, upTo(current, current.length));
    expect((await runCli(['audit', 'verify', '--head', after.hash], env)).code).toBe(0);

    // A head that is not a SHA-256 is a usage error, and is not echoed back.
    for (const bad of ['abc', `${after.hash}0`, `${after.hash.slice(0, 63)}g`, SECRET]) {
      const refused = await runCli(['audit', 'verify', '--head', bad], env);
      expect(refused.code, bad).toBe(2);
      expect(refused.stderr).toContain('--head takes the "hash" of GET /v1/audit/head');
      expect(refused.stdout + refused.stderr).not.toContain(SECRET);
    }
    expect(serve.output()).not.toContain(SECRET);
  }, 40_000);
});

describe('the head with EGRESS_AUDIT_LOG=- (stdout)', () => {
  it('is the hash of the last audit line written to stdout by this run, and verify --head on the captured lines reaches it', async () => {
    const { dir, token } = await dataDir('egress-audit-head-stdout-');
    const env = envFor(dir, { EGRESS_AUDIT_LOG: '-' });
    const created = await runCli(['admin-token', 'create', 'head-recorder', '--json'], env);
    const adminToken = (JSON.parse(created.stdout) as { token: string }).token;
    const serve = await startServe(env);
    const auditLines = () => serve.output().split('\n').filter((l) => l.includes('"prev":"'));
    let head = { hash: '', lines_written: 0, file: '' };
    try {
      for (let i = 0; i < 3; i++) await call(serve.url, token);
      await eventually(async () => {
        const res = await fetch(`${serve.admin}/v1/audit/head`, { headers: { authorization: `Bearer ${adminToken}` } });
        head = (await res.json()) as typeof head;
        const written = auditLines();
        return head.lines_written >= 3 && written.length === head.lines_written && lineHash(written.at(-1)!) === head.hash;
      }, 3_000, 'the head to be the last line on stdout');
      expect(head.file).toBe('-');
      await call(serve.url, token);
      await eventually(() => auditLines().length > head.lines_written + 1, 3_000, 'lines after the head');
    } finally {
      expect(await serve.stop()).toBe(0);
    }
    const captured = `${auditLines().join('\n')}\n`;
    const reached = await runCli(['audit', 'verify', '--head', head.hash, '-'], envFor(dir), captured);
    expect(reached.code, reached.stdout).toBe(0);
    const cut = await runCli(['audit', 'verify', '--head', head.hash, '-'], envFor(dir), `${auditLines().slice(0, head.lines_written - 1).join('\n')}\n`);
    expect(cut.code).toBe(1);
    expect(cut.stdout).toContain('does not reach the recorded head');
  }, 30_000);
});
