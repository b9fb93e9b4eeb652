import { spawn } from 'node:child_process';
import { copyFile, mkdir, readFile, readdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BIN, ROOT, runCli, startServe, watchServe } from '../helpers/cli.ts';
import { startCommand } from '../../bench/targets.ts';
import { SERVE_ENV, SERVE_NODE_FLAGS, inspectorSignalOff } from '../../src/cli/serve-flags.ts';
import { imageEnv, only, readDockerfile } from '../helpers/dockerfile.ts';
import { envFor, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { startUpstream } from '../helpers/upstream.ts';

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

  it('refuses to serve with an inspector or heap snapshots on (NODE_OPTIONS or Node flags): either reads every decrypted credential', async () => {
    const dir = await dataDir();
    const attempts: [string[], string][] = [
      [[], '--inspect=127.0.0.1:0'],
      [[], '--heapsnapshot-signal=SIGUSR2'],
      [[], '--heapsnapshot-near-heap-limit=1'],
      [['--inspect=127.0.0.1:0'], ''],
      [['--heapsnapshot-signal=SIGUSR2'], ''],
    ];
    for (const [nodeFlags, nodeOptions] of attempts) {
      const child = spawn(process.execPath, [...nodeFlags, BIN, 'serve'], { cwd: ROOT, env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...envFor(dir), ...(nodeOptions ? { NODE_OPTIONS: nodeOptions } : {}) }, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      const timer = setTimeout(() => child.kill('SIGKILL'), 8_000);
      const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
      clearTimeout(timer);
      const what = [...nodeFlags, nodeOptions].join(' ');
      expect(code, `${what}:\n${out}`).toBe(1);
      expect(out, what).toMatch(/refusing to serve with --(inspect|heapsnapshot)/);
      expect(out, what).not.toContain('egress-proxy listening');
    }
  });

  it('a diagnostic report (here --report-on-signal) leaves out the environment, which may hold the Redis or webhook password', async () => {
    const dir = await dataDir();
    const reports = join(dir, 'reports');
    await mkdir(reports);
    await writeFile(join(dir, 'hook.secret'), 'whsec_0123456789abcdef', { mode: 0o600 });
    const serve = await startServe({
      ...envFor(dir),
      EGRESS_ALERT_WEBHOOK: 'http://alerts:pw_CANARY_report@127.0.0.1:9/hook',
      EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'hook.secret'),
      NODE_OPTIONS: `--report-on-signal --report-signal=SIGUSR2 --report-directory=${reports}`,
    });
    try {
      serve.child.kill('SIGUSR2');
      let files: string[] = [];
      for (let i = 0; i < 50 && files.length === 0; i++) {
        await new Promise((r) => setTimeout(r, 100));
        files = (await readdir(reports)).filter((f) => f.endsWith('.json'));
      }
      expect(files).toHaveLength(1);
      const report = await readFile(join(reports, files[0]!), 'utf8');
      expect(report).toContain('"header"');
      expect(report).not.toContain('CANARY');
    } finally {
      await serve.stop('SIGTERM');
    }
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

  it('a serve started without its flags (node bin/egress.js serve) replaces itself with one that has them: same pid, the flags and malloc settings added, the caller\'s own kept and winning, no inspector on SIGUSR1', async () => {
    const dir = await dataDir();
    const child = spawn(process.execPath, ['--max-semi-space-size=8', BIN, 'serve'], { cwd: ROOT, env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...envFor(dir), MALLOC_ARENA_MAX: '4' }, stdio: ['ignore', 'pipe', 'pipe'] });
    const serve = await watchServe(child);
    try {
      const cmdline = (await readFile(`/proc/${child.pid}/cmdline`, 'utf8')).split('\0').filter(Boolean);
      // The user's --max-semi-space-size comes after serve's, so V8 takes the user's.
      expect(cmdline).toEqual([process.execPath, ...SERVE_NODE_FLAGS, '--max-semi-space-size=8', BIN, 'serve']);
      const environ = (await readFile(`/proc/${child.pid}/environ`, 'utf8')).split('\0');
      expect(environ).toContain('MALLOC_ARENA_MAX=4');
      expect(environ).toContain(`MALLOC_MMAP_THRESHOLD_=${SERVE_ENV.MALLOC_MMAP_THRESHOLD_}`);
      child.kill('SIGUSR1');
      await new Promise((r) => setTimeout(r, 1_000));
      expect(serve.output()).not.toContain('Debugger listening');
      await expect(fetch('http://127.0.0.1:9229/json/list')).rejects.toThrow();
      expect(child.exitCode).toBeNull();
      expect((await fetch(`${serve.admin}/healthz`)).status).toBe(200);
    } finally {
      expect(await serve.stop('SIGTERM')).toBe(0);
    }
  });

  it('the inspector signal counts as off when --disable-sigusr1 is a Node flag or in NODE_OPTIONS, and only then', () => {
    expect(inspectorSignalOff(['--disable-sigusr1'], '')).toBe(true);
    expect(inspectorSignalOff([], '--max-old-space-size=100 --disable-sigusr1')).toBe(true);
    expect(inspectorSignalOff([], '--disable-sigusr1x')).toBe(false);
    expect(inspectorSignalOff(['--inspect'], '')).toBe(false);
  });

  it('npm start and the Docker image start Node with the same flags and malloc settings (no inspector signal, the bounded young generation and old-generation growth, optimisation on the main thread, two malloc arenas, a fixed mmap threshold)', async () => {
    const pkg = JSON.parse(await readFile('package.json', 'utf8')) as { scripts: { start: string } };
    expect(pkg.scripts.start.endsWith(' bin/egress.js serve')).toBe(true);
    // Read as the bench reads it ("[NAME=value ...] node <flags> bin/egress.js serve", or it throws).
    const start = await startCommand();
    // The environment npm start sets (NAME=value before node) is the image's too.
    expect(start.env).toEqual(SERVE_ENV);
    // The flags a serve started without them restarts with.
    expect(start.flags).toEqual(SERVE_NODE_FLAGS);
    const final = (await readDockerfile()).at(-1)!;
    const env = imageEnv(final);
    for (const [name, value] of Object.entries(start.env)) expect(env).toHaveProperty(name, value);
    const startFlags = start.flags;
    const image = JSON.parse(only(final, 'ENTRYPOINT')) as string[];
    expect(image.at(-1)).toBe('bin/egress.js');
    expect(image.slice(1, -1)).toEqual(startFlags);
    expect(startFlags).toContain('--disable-sigusr1');
    expect(startFlags.some((f) => f.startsWith('--max-semi-space-size='))).toBe(true);
    expect(startFlags.some((f) => f.startsWith('--heap-growing-percent='))).toBe(true);
    expect(startFlags).toContain('--no-concurrent-recompilation');
    // The image compiles its modules at build time with the same flags: the cache is kept per flag set.
    const warm = final.instructions.filter((i) => i.keyword === 'RUN').map((i) => /^node (.*?) --input-type=module -e .*enableCompileCache\('\/app\/node_modules\/\.cache\/egress-compile'\)/.exec(i.args)).find(Boolean);
    expect(warm?.[1]?.split(' ')).toEqual(startFlags);
  });

  it('a proxy on the file store, without a CA, loads neither ioredis, node-forge, undici\'s index nor Node\'s bundled undici (memory it would never use)', async () => {
    const upstream = await startUpstream((_req, res) => res.end('ok'));
    const dir = await makeTempDir('egress-footprint-');
    const { tokens } = await seedDataDir(dir, {
      routes: { api: `name: api\nprefix: /api\nupstream: ${upstream.url}\nallow_private_addresses: true\ncredential: api\ninject:\n  scheme: bearer\n  token: "{token}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/x]\n` },
      credentials: { api: { token: 'tok_CANARY_footprint' } },
      callers: ['svc'],
    });
    // Lists the CommonJS modules and Node's own internal modules the process loaded, when it exits.
    const probe = `import Module from 'node:module'; process.on('exit', () => process.stderr.write('LOADED ' + JSON.stringify(Object.keys(Module._cache)) + '\\nINTERNAL ' + JSON.stringify(process.moduleLoadList) + '\\n'));`;
    const serve = await startServe({ ...envFor(dir), NODE_OPTIONS: `--import=data:text/javascript,${encodeURIComponent(probe)}` });
    try {
      expect((await fetch(`${serve.url}/api/x`, { headers: { 'x-egress-token': tokens.svc! } })).status).toBe(200);
    } finally {
      expect(await serve.stop('SIGTERM')).toBe(0);
      await upstream.close();
    }
    const loaded = JSON.parse(/^LOADED (.*)$/m.exec(serve.output())?.[1] ?? 'null') as string[];
    expect(loaded.some((f) => f.includes('/undici/lib/dispatcher/pool.js'))).toBe(true);
    expect(loaded.filter((f) => /\/node_modules\/(ioredis|node-forge)\/|\/undici\/index\.js$/.test(f))).toEqual([]);
    // Node's fetch and WebSocket (its bundled undici), which an ES import of node:http would load.
    const internal = JSON.parse(/^INTERNAL (.*)$/m.exec(serve.output())?.[1] ?? 'null') as string[];
    expect(internal).toContain('NativeModule internal/http');
    expect(internal.filter((m) => m.includes('internal/deps/undici'))).toEqual([]);
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
