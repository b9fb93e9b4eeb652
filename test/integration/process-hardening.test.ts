import { readFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { runCli, startServe } from '../helpers/cli.ts';
import { envFor, makeTempDir, seedDataDir } from '../helpers/proxy.ts';

/** The process runs without the inspector signal and never with the insecure HTTP parser. */
async function dataDir(): Promise<string> {
  const dir = await makeTempDir('egress-proc-');
  await seedDataDir(dir, { routes: {}, callers: ['svc'] });
  return dir;
}

describe('process hardening', () => {
  it('refuses to serve with --insecure-http-parser (NODE_OPTIONS)', async () => {
    const dir = await dataDir();
    const res = await runCli(['serve'], { ...envFor(dir), NODE_OPTIONS: '--insecure-http-parser' });
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('insecure-http-parser');
  });

  it('SIGUSR1 opens no inspector and does not end the process (--disable-sigusr1)', async () => {
    const serve = await startServe(envFor(await dataDir()));
    try {
      serve.child.kill('SIGUSR1');
      await new Promise((r) => setTimeout(r, 1_000));
      expect(serve.output()).not.toContain('Debugger listening');
      expect(serve.child.exitCode).toBeNull();
      expect((await fetch(`${serve.admin}/healthz`)).status).toBe(200);
    } finally {
      expect(await serve.stop('SIGTERM')).toBe(0);
    }
  });

  it('npm start and the Docker image start Node with the same flags (no inspector signal, the bounded young generation)', async () => {
    const pkg = JSON.parse(await readFile('package.json', 'utf8')) as { scripts: { start: string } };
    const start = pkg.scripts.start.split(/\s+/);
    expect(start.slice(-2)).toEqual(['bin/egress.js', 'serve']);
    const startFlags = start.slice(1, -2);
    const entrypoint = /^ENTRYPOINT (\[.*\])$/m.exec(await readFile('Dockerfile', 'utf8'))?.[1];
    const image = JSON.parse(entrypoint ?? '[]') as string[];
    expect(image.at(-1)).toBe('bin/egress.js');
    expect(image.slice(1, -1)).toEqual(startFlags);
    expect(startFlags).toContain('--disable-sigusr1');
    expect(startFlags.some((f) => f.startsWith('--max-semi-space-size='))).toBe(true);
  });
});
