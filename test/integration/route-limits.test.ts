import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/** Limits written in route files (timeouts, sizes) on a real `egress serve` and `egress routes check`. */

let upstream: Upstream;
beforeAll(async () => {
  // Answers after 300 ms: well inside any sane response timeout.
  upstream = await startUpstream((_req, res) => void setTimeout(() => res.end('late but fine'), 300));
});
afterAll(async () => {
  await upstream?.close();
});

const withTimeouts = (timeouts: string) => bearerRoute({ upstream: upstream.url, paths: ['/a'] }).replace('credential: key\n', `credential: key\ntimeouts: ${timeouts}\n`);

async function check(text: string) {
  const dir = await makeTempDir();
  await mkdir(join(dir, 'routes'));
  await writeFile(join(dir, 'routes', 'api.yaml'), text);
  return runCli(['routes', 'check', join(dir, 'routes')], {});
}

describe('route timeouts', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    await serve?.stop();
    serve = undefined;
  });

  it('a timeout longer than a timer can hold is refused at its line (a Node timer past 2^31-1 ms fires at once)', async () => {
    const result = await check(withTimeouts('{ connect: 5s, response: 30d }'));
    expect(result.code).toBe(1);
    expect(result.stdout + result.stderr).toMatch(/api\.yaml:\d+:\d+: timeouts\.response: .*at most/);
  });

  it('a zero timeout is refused: it would mean no deadline at all', async () => {
    for (const t of ['{ response: "0" }', '{ connect: 0.1ms }']) {
      const result = await check(withTimeouts(t));
      expect(result.code, t).toBe(1);
      expect(result.stdout + result.stderr, t).toMatch(/api\.yaml:\d+:\d+: timeouts\.(response|connect): /);
    }
  });

  it('a long but valid response timeout lets a slow upstream answer', async () => {
    const dir = await makeTempDir();
    const { tokens } = await seedDataDir(dir, { routes: { api: withTimeouts('{ connect: 5s, response: 24h }') }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const res = await fetch(`${serve.url}/api/a`, { headers: { 'x-egress-token': tokens.svc! } });
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('late but fine');
  });
});

describe('route sizes', () => {
  it('a max_body beyond what can be counted exactly is refused at its line', async () => {
    const text = bearerRoute({ upstream: upstream.url, paths: ['/a'] }).replace('credential: key\n', 'credential: key\nmax_body: 99999999999999999999gb\n');
    const result = await check(text);
    expect(result.code).toBe(1);
    expect(result.stdout + result.stderr).toMatch(/api\.yaml:\d+:\d+: max_body: /);
  });
});

describe('route file names', () => {
  it('a file ending in .YAML or .Yml is reported, not silently skipped', async () => {
    const dir = await makeTempDir();
    await mkdir(join(dir, 'routes'));
    await writeFile(join(dir, 'routes', 'api.YAML'), bearerRoute({ upstream: upstream.url, paths: ['/a'] }));
    const result = await runCli(['routes', 'check', join(dir, 'routes')], {});
    expect(result.code).toBe(1);
    expect(result.stdout + result.stderr).toMatch(/api\.YAML:0:0: route files end in \.yaml or \.yml/);
  });
});
