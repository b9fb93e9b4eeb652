import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** `egress serve` under repeated and mixed signals while it drains. */

let upstream: Upstream;
beforeAll(async () => {
  upstream = await startUpstream((_req, res) => void setTimeout(() => res.end('slow ok'), 800));
});
afterAll(async () => {
  await upstream?.close();
});

describe('signals while draining', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    serve?.child.kill('SIGKILL');
    serve = undefined;
  });

  // `npm start` under a process-group kill (docker stop, systemd KillMode=control-group) delivers
  // SIGTERM twice: once from the group, once forwarded by npm.
  it('a second SIGTERM during the drain neither kills the process nor loses the in-flight request or its audit line', async () => {
    const dir = await makeTempDir('egress-shutdown-');
    const { tokens } = await seedDataDir(dir, { routes: { api: bearerRoute({ upstream: upstream.url, paths: ['/slow'] }) }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const inflight = fetch(`${serve.url}/api/slow`, { headers: { 'x-egress-token': tokens.svc! } });
    await new Promise((r) => setTimeout(r, 200));
    const exited = serve.stop('SIGTERM');
    await new Promise((r) => setTimeout(r, 100));
    serve.child.kill('SIGTERM');
    serve.child.kill('SIGINT');
    serve.child.kill('SIGHUP');
    const res = await inflight;
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('slow ok');
    expect(await exited).toBe(0);
    const audit = await readFile(join(dir, 'audit.log'), 'utf8');
    expect(audit).toContain('/slow');
  }, 20_000);
});
