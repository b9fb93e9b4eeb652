import { execFileSync, spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BIN, watchServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';

describe('SIGHUP while serve is starting', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    await serve?.stop();
  });

  // A deploy that writes a route file and signals the pid (or `systemctl reload`) can land while the
  // proxy is still starting (a slow store, a slow disk): it must not kill it, as SIGHUP's default
  // action would.
  it('does not kill the process: it starts and stops with 0', async () => {
    const dir = await makeTempDir();
    await seedDataDir(dir, { routes: { api: bearerRoute({ upstream: 'http://127.0.0.1:9', paths: ['/a'] }) }, callers: ['svc'] });
    // Start-up reads EGRESS_ALERTS early; a FIFO holds it there until the test writes to it.
    const fifo = join(dir, 'alerts.fifo');
    execFileSync('mkfifo', [fifo]);
    const child = spawn(process.execPath, ['--disable-sigusr1', BIN, 'serve'], { env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...envFor(dir, { EGRESS_ALERTS: fifo }) }, stdio: ['ignore', 'pipe', 'pipe'] });
    const started = watchServe(child);
    started.catch(() => {});
    await new Promise((r) => setTimeout(r, 1500));
    child.kill('SIGHUP');
    await new Promise((r) => setTimeout(r, 100));
    expect(child.signalCode).toBeNull();
    await writeFile(fifo, '{}\n');
    serve = await started;
    expect(child.exitCode).toBeNull();
    // The held signal still reloads, once start-up is done.
    await eventually(() => /"trigger":"SIGHUP".*routes reloaded/.test(serve!.output()), 5_000, 'the held SIGHUP to reload');
    expect(await serve.stop('SIGTERM')).toBe(0);
    serve = undefined;
  }, 20_000);
});
