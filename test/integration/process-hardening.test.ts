import { spawn } from 'node:child_process';
import { copyFile, mkdir, readFile, readdir, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BIN, ROOT, runCli, startServe } from '../helpers/cli.ts';
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

  it('npm start and the Docker image start Node with the same flags (no inspector signal, the bounded young generation and old-generation growth)', async () => {
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
    expect(startFlags.some((f) => f.startsWith('--heap-growing-percent='))).toBe(true);
    // The image compiles its modules at build time with the same flags: the cache is kept per flag set.
    const warm = /^RUN node (.*?) --input-type=module -e .*enableCompileCache\('\/app\/node_modules\/\.cache\/egress-compile'\)/m.exec(await readFile('Dockerfile', 'utf8'));
    expect(warm?.[1]?.split(' ')).toEqual(startFlags);
  });

  it('keeps compiled modules in node_modules/.cache/egress-compile beside bin/, or in NODE_COMPILE_CACHE; NODE_DISABLE_COMPILE_CACHE turns it off', async () => {
    // A copy of the project's layout: its own bin/egress.js and an empty node_modules, the sources linked.
    const project = await makeTempDir('egress-compile-');
    await mkdir(join(project, 'bin'));
    await mkdir(join(project, 'node_modules'));
    await copyFile(BIN, join(project, 'bin', 'egress.js'));
    await symlink(join(ROOT, 'src'), join(project, 'src'));
    const files = async (dir: string) => (await readdir(dir, { recursive: true, withFileTypes: true })).filter((e) => e.isFile()).length;
    const run = (env: Record<string, string>) => new Promise<number | null>((resolve, reject) => {
      const child = spawn(process.execPath, [join(project, 'bin', 'egress.js'), '--help'], { env: { PATH: process.env.PATH ?? '', ...env }, stdio: 'ignore' });
      child.on('error', reject);
      child.on('exit', resolve);
    });

    expect(await run({})).toBe(0);
    expect(await files(join(project, 'node_modules', '.cache', 'egress-compile'))).toBeGreaterThan(2);

    const chosen = await makeTempDir('egress-compile-env-');
    expect(await run({ NODE_COMPILE_CACHE: chosen })).toBe(0);
    expect(await files(chosen)).toBeGreaterThan(2);

    const off = await makeTempDir('egress-compile-off-');
    expect(await run({ NODE_COMPILE_CACHE: off, NODE_DISABLE_COMPILE_CACHE: '1' })).toBe(0);
    expect(await readdir(off)).toEqual([]);
  });
});
