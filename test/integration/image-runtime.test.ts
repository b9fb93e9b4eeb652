import { spawn } from 'node:child_process';
import { chmod, chown, copyFile, cp, link, mkdir, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, collect, watchServe, type CliResult } from '../helpers/cli.ts';
import { readDockerfile, imageEnv, only, type Stage } from '../helpers/dockerfile.ts';
import { makeTempDir } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * The image as `docker run --read-only --user node -v data:/data` runs it, without Docker (there is
 * no daemon on the machines this is built on): the Dockerfile's own steps are carried out into a
 * temporary root (its deps stage's `npm ci --omit=dev`, its COPY lines, its compile-cache RUN, its
 * /data), then the CLI and `serve` run with its ENTRYPOINT flags, its ENV, as an unprivileged user
 * (nobody stands in for the image's node user) in a mount namespace where every path is read-only
 * but the data folder. Anything the proxy would write outside /data, a runtime import of a
 * devDependency, or a file only root can read fails here.
 *
 * Needs root (for the mount namespace and the uid switch) and util-linux's unshare and setpriv; CI
 * runs as root.
 */

const NOBODY = 65534;

/** Mount / read-only, the data folder read-write, drop to NOBODY, exec the command ("$@"). */
const READ_ONLY_RUN = [
  'set -e',
  'mount -o remount,bind,ro /',
  'mount --bind "$1" "$1"',
  'mount -o remount,bind,rw "$1"',
  'shift',
  `exec setpriv --reuid=${NOBODY} --regid=${NOBODY} --clear-groups "$@"`,
].join('\n');

interface Image {
  readonly root: string;
  readonly app: string;
  readonly data: string;
  readonly env: Record<string, string>;
  /** node and the ENTRYPOINT's flags and script. */
  readonly entrypoint: readonly string[];
  /** The HEALTHCHECK command, its port made the admin port of the running proxy by the caller. */
  readonly healthcheck: readonly string[];
}

function sh(command: string, cwd: string, env: NodeJS.ProcessEnv): Promise<CliResult> {
  return collect(spawn('sh', ['-c', command], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] }));
}

/** Where the image has a path (/app, /data) and a user (node), the laid-out root has its own. */
function localise(text: string, root: string): string {
  return text.replaceAll('/app', join(root, 'app')).replaceAll('/data', join(root, 'data')).replaceAll('node:node', `${NOBODY}:${NOBODY}`);
}

async function runStage(stage: Stage, root: string, dir: string, env: NodeJS.ProcessEnv, stages: ReadonlyMap<string, string>): Promise<void> {
  for (const { keyword, args } of stage.instructions) {
    if (keyword === 'WORKDIR') {
      if (args !== '/app') throw new Error(`WORKDIR ${args}: the layout knows /app only`);
    } else if (keyword === 'COPY') {
      const words = args.split(/\s+/);
      const from = words[0]!.startsWith('--from=') ? stages.get(words.shift()!.slice('--from='.length)) : undefined;
      const destination = words.pop()!;
      // As Docker reads it: a destination ending in / (or several sources) is a folder to copy into;
      // otherwise the one source becomes the destination (a folder's contents, or a file).
      const into = destination.endsWith('/') || words.length > 1;
      const dest = join(dir, destination);
      await mkdir(into ? dest : dirname(dest), { recursive: true });
      for (const source of words) {
        const path = from ? join(from, source.replace(/^\/app\/?/, '')) : join(ROOT, source);
        const target = into ? join(dest, basename(source)) : dest;
        if (from) await rename(path, target);
        else await cp(path, target, { recursive: true });
      }
    } else if (keyword === 'RUN') {
      // From the npm cache that `npm ci` filled (the network only for what it lacks).
      const command = localise(args, root).replace(/^npm ci /, 'npm ci --prefer-offline ');
      const run = await sh(command, dir, env);
      if (run.code !== 0) throw new Error(`RUN ${args} exited ${run.code}:\n${run.stdout}${run.stderr}`);
    } else if (!['ENV', 'VOLUME', 'USER', 'EXPOSE', 'HEALTHCHECK', 'ENTRYPOINT', 'CMD'].includes(keyword)) {
      throw new Error(`Dockerfile: ${keyword} is not laid out by this test; teach it`);
    }
  }
}

/** Carry out the Dockerfile into `root`: root/app as its /app, root/data as its /data, root/bin/node as its Node. */
async function layOut(root: string): Promise<Image> {
  const stages = await readDockerfile();
  const final = stages.at(-1)!;
  // Node is the base image's (node:24-bookworm-slim): this test's own Node 24, as the image's /usr/local/bin/node.
  const bin = join(root, 'bin');
  await mkdir(bin);
  await link(process.execPath, join(bin, 'node')).catch(() => copyFile(process.execPath, join(bin, 'node')));
  await chmod(join(bin, 'node'), 0o755);
  const buildEnv: NodeJS.ProcessEnv = { PATH: `${bin}:${process.env.PATH ?? '/usr/bin:/bin'}`, HOME: process.env.HOME ?? '/root', npm_config_update_notifier: 'false' };
  const built = new Map<string, string>();
  for (const stage of stages.slice(0, -1)) {
    const name = /\bAS\s+(\S+)$/i.exec(stage.from)?.[1];
    if (!name) throw new Error(`Dockerfile: FROM ${stage.from} has no AS name`);
    const dir = join(root, `stage-${name}`, 'app');
    await mkdir(dir, { recursive: true });
    await runStage(stage, root, dir, buildEnv, built);
    built.set(name, dir);
  }
  const env: Record<string, string> = { PATH: `${bin}:/usr/bin:/bin`, HOME: '/nonexistent' };
  for (const [name, value] of Object.entries(imageEnv(final))) env[name] = localise(value, root);
  const app = join(root, 'app');
  await mkdir(app);
  await runStage(final, root, app, { ...buildEnv, ...env, PATH: buildEnv.PATH }, built);
  for (const dir of [root, app]) await chmod(dir, 0o755);

  if (only(final, 'USER') !== 'node') throw new Error(`Dockerfile: USER ${only(final, 'USER')}; this test runs the image's node user as nobody`);
  const exec = (json: string) => (JSON.parse(json) as string[]).map((w) => (w === 'node' ? join(bin, 'node') : w));
  const healthcheck = /\bCMD\s+(\[.*\])$/.exec(only(final, 'HEALTHCHECK'))?.[1];
  if (!healthcheck) throw new Error('Dockerfile: HEALTHCHECK has no CMD [...]');
  return { root, app, data: join(root, 'data'), env, entrypoint: exec(only(final, 'ENTRYPOINT')), healthcheck: exec(healthcheck) };
}

/** A command as the image's user, in a namespace where only the data folder is writable. */
function readOnlySpawn(image: Image, command: readonly string[], env: Record<string, string>) {
  return spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', READ_ONLY_RUN, 'read-only-run', image.data, ...command], {
    cwd: image.app,
    env,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
}

function cli(image: Image, env: Record<string, string>, args: readonly string[], input?: string): Promise<CliResult> {
  return collect(readOnlySpawn(image, [...image.entrypoint, ...args], env), input);
}

describe('the image at run time: non-root, read-only root filesystem, production dependencies only', () => {
  let image: Image;
  let upstream: Upstream;

  beforeAll(async () => {
    if (process.getuid?.() !== 0) throw new Error('this test needs root: it runs the image in a mount namespace of its own and switches to an unprivileged user');
    for (const tool of ['unshare', 'setpriv']) {
      const found = await sh(`command -v ${tool}`, '/', process.env);
      if (found.code !== 0) throw new Error(`${tool} (util-linux) is not on PATH`);
    }
    upstream = await startUpstream();
    image = await layOut(await makeTempDir('egress-image-'));
    // The operator's own route file, as a volume over /app/routes would bring it.
    await writeFile(join(image.app, 'routes', 'local.yaml'), [
      'name: local',
      'prefix: /local',
      `upstream: ${upstream.url}`,
      'allow_private_addresses: true',
      'credential: local-cred',
      'inject:',
      '  scheme: headers',
      '  headers:',
      '    X-Api-Key: "{api_key}"',
      'allow:',
      '  - caller: svc',
      '    methods: [GET]',
      '    paths: [/ping]',
      '',
    ].join('\n'));
  }, 120_000);

  afterAll(async () => {
    await upstream?.close();
    if (image) await rm(image.root, { recursive: true, force: true });
  });

  it('holds production dependencies only, and a /data only its user can open', async () => {
    const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { devDependencies: Record<string, string> };
    const installed = await readdir(join(image.app, 'node_modules'));
    expect(installed).toContain('undici');
    for (const dev of Object.keys(pkg.devDependencies)) expect(installed).not.toContain(dev);
    const data = await stat(image.data);
    expect(data.uid).toBe(NOBODY);
    expect(data.mode & 0o777).toBe(0o700);
  });

  it('sets up its keys and serves a request as nobody with nothing writable but /data, then stops cleanly on SIGTERM', async () => {
    const env = { ...image.env, EGRESS_LISTEN: '127.0.0.1:0', EGRESS_ADMIN_LISTEN: '127.0.0.1:0' };
    const init = await cli(image, env, ['master-key', 'init']);
    expect(init.code, init.stderr).toBe(0);
    const secret = 'image-test-secret-4f1c9a';
    const put = await cli(image, env, ['keys', 'put', 'local-cred', '--from-stdin'], JSON.stringify({ api_key: secret }));
    expect(put.code, put.stderr).toBe(0);
    const added = await cli(image, env, ['callers', 'add', 'svc', '--json']);
    expect(added.code, added.stderr).toBe(0);
    const token = (JSON.parse(added.stdout) as { token: string }).token;
    for (const file of ['master.key', 'store.json']) expect((await stat(join(image.data, file))).uid).toBe(NOBODY);

    const child = readOnlySpawn(image, [...image.entrypoint, 'serve'], env);
    const serve = await watchServe(child).catch((err: unknown) => {
      child.kill('SIGKILL');
      throw err;
    });
    let stopped: number | null = null;
    try {
      // The process itself: the unprivileged user, and a root filesystem it cannot write.
      const status = await readFile(`/proc/${child.pid}/status`, 'utf8');
      expect(/^Uid:\s+(.*)$/m.exec(status)?.[1]?.split(/\s+/)).toEqual([`${NOBODY}`, `${NOBODY}`, `${NOBODY}`, `${NOBODY}`]);
      const mounts = (await readFile(`/proc/${child.pid}/mountinfo`, 'utf8')).split('\n').map((l) => l.split(' '));
      expect(mounts.find((m) => m[4] === '/')?.[5]?.split(',')).toContain('ro');
      expect(mounts.find((m) => m[4] === image.data)?.[5]?.split(',')).toContain('rw');

      const res = await fetch(`${serve.url}/local/ping`, { headers: { 'x-egress-token': token } });
      expect(res.status).toBe(200);
      expect(upstream.requests.at(-1)?.headers['x-api-key']).toBe(secret);

      // The image's HEALTHCHECK, unchanged, asks the admin listener EGRESS_ADMIN_LISTEN names (an
      // operator who moves it off 9090 must not get an unhealthy container), that of all
      // interfaces on the loopback address.
      const adminPort = serve.admin.split(':').at(-1)!;
      for (const adminListen of [`127.0.0.1:${adminPort}`, `0.0.0.0:${adminPort}`]) {
        const health = await collect(readOnlySpawn(image, image.healthcheck, { ...env, EGRESS_ADMIN_LISTEN: adminListen }));
        expect(health.code, `${adminListen}: ${health.stderr}`).toBe(0);
      }
      const unhealthy = await collect(readOnlySpawn(image, image.healthcheck, { ...env, EGRESS_ADMIN_LISTEN: `127.0.0.1:${serve.url.split(':').at(-1)!}` }));
      expect(unhealthy.code).toBe(1);
    } finally {
      stopped = await serve.stop('SIGTERM');
    }
    const output = serve.output();
    expect(stopped, output).toBe(0);
    expect(output).not.toMatch(/EROFS|EACCES|read-only file system|permission denied/i);
    expect(output).not.toContain(secret);
    const audit = await readFile(join(image.data, 'audit.log'), 'utf8');
    expect(audit).toContain('"route":"local"');
    expect(audit).not.toContain(secret);
    expect((await stat(join(image.data, 'audit.log'))).uid).toBe(NOBODY);
  });
});
