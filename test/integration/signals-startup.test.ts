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

  // The proxy's modules take a while to load (longer on a busy machine), and until serve's own
  // handler is in, SIGHUP's default action would end the process. The signals start as soon as the
  // CLI imports the first module of the proxy's own (src/cli/main.ts; a resolve hook given to the
  // child with --import says when, on stderr) and go on every few ms until it listens. Before the
  // CLI runs at all, Node itself is still starting, and nothing written in JavaScript can catch a
  // signal.
  const reportImport = `data:text/javascript,${encodeURIComponent("import { registerHooks } from 'node:module'; registerHooks({ resolve(specifier, context, next) { const found = next(specifier, context); if (found.url.endsWith('/src/cli/main.ts')) process.stderr.write('importing src/cli/main.ts\\n'); return found; } });")}`;

  it('from the moment the CLI imports its modules until it listens, repeated SIGHUPs do not end it; then it serves', async () => {
    const dir = await makeTempDir();
    await seedDataDir(dir, { routes: { api: bearerRoute({ upstream: 'http://127.0.0.1:9', paths: ['/a'] }) }, callers: ['svc'] });
    for (let run = 0; run < 3; run++) {
      const child = spawn(process.execPath, ['--disable-sigusr1', `--import=${reportImport}`, BIN, 'serve'], { env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...envFor(dir) }, stdio: ['ignore', 'pipe', 'pipe'] });
      const importing = new Promise<void>((resolveImporting) => {
        let err = '';
        const onData = (d: Buffer) => {
          err += d.toString();
          if (!err.includes('importing src/cli/main.ts')) return;
          child.stderr!.off('data', onData);
          resolveImporting();
        };
        child.stderr!.on('data', onData);
      });
      const started = watchServe(child);
      let listening = false;
      started.then(() => (listening = true), () => {});
      let sent = 0;
      const signals = (async () => {
        await importing;
        while (!listening && child.exitCode === null && child.signalCode === null) {
          child.kill('SIGHUP');
          sent++;
          await new Promise((r) => setTimeout(r, 5));
        }
      })();
      serve = await started;
      await signals;
      expect(sent).toBeGreaterThan(0);
      expect(child.signalCode).toBeNull();
      expect((await fetch(`${serve.admin}/readyz`)).status).toBe(200);
      expect(await serve.stop('SIGTERM')).toBe(0);
      serve = undefined;
    }
  }, 60_000);
});
