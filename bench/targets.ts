/**
 * The upstream and the targets, each started as its own process (egress-x2: two):
 *   direct        the upstream itself (the limit)
 *   egress        egress-proxy, run like a user runs it: CLI setup, route file, `egress serve`, file store
 *   egress-redis  the same, with EGRESS_STORE=redis://… on a private redis-server the bench starts
 *   egress-x2     two `egress serve` on one port (EGRESS_REUSE_PORT=1), one file store (opt-in)
 *   bare    node:http + undici Pool, headers added, nothing else (the floor)
 *   min     node:http + undici Pool.dispatch, the response sent in one end (opt-in: the least a Node proxy does)
 *   hp3     http-proxy-3 with a keep-alive agent and the same headers
 *   nginx   nginx with proxy_set_header and upstream keepalive (when nginx is installed)
 */
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CALLER, CLIENT_ID, PROXY_PREFIX, SECRET, UPSTREAM_PATH, sleep, type BenchSettings, type StatsReply, type UpstreamStats } from './common.ts';
import { httpRequest } from './http.ts';
import { forkChild, freePort, ipcRequest, listeningPorts, runCommand, spawnChild, waitReady, which, type Managed } from './proc.ts';

export const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = resolve(BENCH_DIR, '..');

export type TargetName = 'direct' | 'egress' | 'egress-redis' | 'egress-x2' | 'bare' | 'min' | 'hp3' | 'nginx';
/** Every target, in the order they are measured. */
export const TARGET_NAMES: readonly TargetName[] = ['direct', 'egress', 'egress-redis', 'egress-x2', 'bare', 'min', 'hp3', 'nginx'];
/**
 * What runs without BENCH_TARGETS. egress-x2 is opt-in: it is a scaling figure, and on a machine
 * with few cores (the load generator, the upstream and two proxies sharing them) it mostly measures
 * contention; it also adds about a minute to a run that already takes several. min is opt-in too:
 * it answers one question (how much of egress-proxy's cost is Node's HTTP stack and undici's), not
 * a comparison users make.
 */
export const DEFAULT_TARGETS: readonly TargetName[] = TARGET_NAMES.filter((n) => n !== 'egress-x2' && n !== 'min');

export const LABELS: Readonly<Record<TargetName, string>> = {
  direct: 'direct',
  egress: 'egress-proxy',
  'egress-redis': 'egress-redis',
  'egress-x2': 'egress x2',
  bare: 'bare undici',
  min: 'min dispatch',
  hp3: 'http-proxy-3',
  nginx: 'nginx',
};

export interface Target {
  readonly name: TargetName;
  readonly label: string;
  readonly description: string;
  /** Full URL the load generator calls (GET and POST alike). */
  readonly url: string;
  /** The target's (first) process: its pid is the one shown. */
  readonly process: Managed;
  /** Every process of the target (egress-x2 has two): RSS and CPU are their trees' sum. */
  readonly processes: readonly Managed[];
  /** Ports to verify closed after shutdown. */
  readonly ports: readonly number[];
}

export interface Upstream {
  readonly process: Managed;
  readonly port: number;
  readonly origin: string;
  stats(): Promise<UpstreamStats>;
}

const START_TIMEOUT_MS = 20_000;

export async function startUpstream(settings: BenchSettings): Promise<Upstream> {
  const child = forkChild('upstream', join(BENCH_DIR, 'upstream.ts'), { BENCH_BODY_BYTES: String(settings.bodyBytes) });
  const port = await waitReady(child, START_TIMEOUT_MS);
  return {
    process: child,
    port,
    origin: `http://127.0.0.1:${port}`,
    stats: async () => (await ipcRequest<StatsReply>(child, 'stats', {}, 10_000)).stats,
  };
}

export function directTarget(upstream: Upstream): Target {
  return {
    name: 'direct',
    label: LABELS.direct,
    description: `the upstream itself (node:http, own process), client sends the credential headers; RSS is the upstream's`,
    url: `${upstream.origin}${UPSTREAM_PATH}`,
    process: upstream.process,
    processes: [upstream.process],
    ports: [upstream.port],
  };
}

/** A pass-through proxy of bench/ (bare, min, hp3) in its own process, in front of `upstream`. */
export async function startNodeProxy(name: 'bare' | 'min' | 'hp3', upstream: Upstream): Promise<Target> {
  const { script, description } = NODE_PROXIES[name];
  const child = forkChild(LABELS[name], join(BENCH_DIR, script), { BENCH_UPSTREAM: upstream.origin });
  const port = await waitReady(child, START_TIMEOUT_MS);
  return {
    name,
    label: LABELS[name],
    description,
    url: `http://127.0.0.1:${port}${PROXY_PREFIX}${UPSTREAM_PATH}`,
    process: child,
    processes: [child],
    ports: [port],
  };
}

const NODE_PROXIES = {
  bare: { script: 'bare-proxy.ts', description: 'node:http + undici Pool.request (256 connections) + stream pipe, adds the two headers, no checks' },
  min: { script: 'min-proxy.ts', description: 'node:http + undici Pool.dispatch (256 connections), response collected and sent in one end, adds the two headers, no checks' },
  hp3: { script: 'hp3-proxy.ts', description: 'http-proxy-3 web() on node:http, keep-alive http.Agent (maxSockets 256), `headers` option adds the two headers, no checks' },
} as const;

// ---- egress-proxy -----------------------------------------------------------------------------

export type EgressName = 'egress' | 'egress-redis' | 'egress-x2';

/** One `egress serve` process. */
export interface EgressInstance {
  readonly process: Managed;
  readonly adminPort: number;
  readonly auditLog: string;
}

export interface EgressTarget extends Target {
  readonly name: EgressName;
  readonly token: string;
  /** The environment of the CLI and of `serve` (store, master key, routes); each instance adds its own listeners and audit log. */
  readonly env: NodeJS.ProcessEnv;
  /** One, or two for egress-x2 (sharing the proxy port, each with its own admin port and audit log). */
  readonly instances: readonly EgressInstance[];
}

export interface EgressOptions {
  /** Store on this redis-server (egress-redis) instead of a file. */
  readonly redis?: RedisServer;
  /** 2: two `serve` processes on one port with EGRESS_REUSE_PORT=1 (egress-x2). */
  readonly instances?: 1 | 2;
  /** More EGRESS_* settings for `serve` (the soak raises EGRESS_AUDIT_KEEP, for one). */
  readonly serveEnv?: Readonly<Record<string, string>>;
}

/**
 * egress-proxy exactly as a user runs it: `master-key init`, `keys put`, `callers add`, a route file, `serve`.
 * With `redis`, every one of those (CLI and `serve`) runs with EGRESS_STORE set to that Redis URL
 * instead of a file store; the rest is the same. With `instances: 2`, two `serve` processes share
 * the proxy port (EGRESS_REUSE_PORT=1) and the file store, as an operator would run them on one
 * machine: each with its own admin listener and audit log (one writer per audit file).
 */
export async function startEgress(upstream: Upstream, root: string, options: EgressOptions = {}): Promise<EgressTarget> {
  const { redis } = options;
  const count = options.instances ?? 1;
  if (redis && count > 1) throw new Error('startEgress: several instances are measured with the file store only');
  const name: EgressName = redis ? 'egress-redis' : count > 1 ? 'egress-x2' : 'egress';
  const dir = join(root, name);
  const routes = join(dir, 'routes');
  // The bench's temp root is opened up for nginx's workers; this folder (master key, store) is not.
  await mkdir(dir, { mode: 0o700 });
  await mkdir(routes);
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith('EGRESS_')) env[key] = value;
  Object.assign(env, {
    EGRESS_MASTER_KEY_FILE: join(dir, 'master.key'),
    EGRESS_STORE: redis ? redis.url : `file:${join(dir, 'store.json')}`,
    EGRESS_ROUTES: routes,
    EGRESS_AUDIT_LOG: join(dir, 'audit.log'),
    EGRESS_LISTEN: '127.0.0.1:0',
    EGRESS_ADMIN_LISTEN: '127.0.0.1:0',
    EGRESS_LOG_LEVEL: 'warn',
  });

  const cli = async (args: string[], input?: string) => {
    const result = await runCommand(process.execPath, ['bin/egress.js', ...args], { env, cwd: REPO_ROOT, timeoutMs: 30_000, ...(input !== undefined ? { input } : {}) });
    if (result.code !== 0) throw new Error(`egress ${args.join(' ')} exited ${result.code}\n${result.stdout}${result.stderr}`);
    return result.stdout;
  };
  await cli(['master-key', 'init']);
  await cli(['keys', 'put', 'bench', '--from-stdin'], JSON.stringify({ client_id: CLIENT_ID, secret: SECRET }));
  const added = JSON.parse(await cli(['callers', 'add', CALLER, '--json'])) as { token?: unknown };
  if (typeof added.token !== 'string') throw new Error('egress callers add --json: no token in the output');
  const token = added.token;

  await writeFile(join(routes, 'bench.yaml'), [
    'name: bench',
    `prefix: ${PROXY_PREFIX}`,
    `upstream: ${upstream.origin}`,
    'allow_private_addresses: true',
    'credential: bench',
    'inject:',
    '  scheme: headers',
    '  headers:',
    '    PLAID-CLIENT-ID: "{client_id}"',
    '    PLAID-SECRET: "{secret}"',
    'max_body: 1mb',
    'upstream_rate: { rate: 10000000/s }',
    'allow:',
    `  - caller: ${CALLER}`,
    '    methods: [GET, POST]',
    `    paths: [${UPSTREAM_PATH}, /echo]`,
    '    rate: { rate: 10000000/s }',
    '',
  ].join('\n'));

  const serveEnv = { ...env, ...options.serveEnv };
  let instances: EgressInstance[];
  let proxyPort: number;
  if (count === 1) {
    const started = await startServe(LABELS[name], serveEnv);
    instances = [started.instance];
    proxyPort = started.proxyPort;
  } else {
    // SO_REUSEPORT needs a fixed port: take a free one, and another if it was taken meanwhile.
    ({ instances, proxyPort } = await startSharing(name, serveEnv, dir, count));
  }
  return {
    name,
    label: LABELS[name],
    description: redis
      ? `egress-proxy \`serve\` as egress-proxy, but EGRESS_STORE=${redis.url} (redis-server ${redis.version}, pid ${redis.process.pid}, no persistence): store cache + pub/sub, rate limits as one script call per route on the way at a time, with every check that arrived meanwhile; RSS and CPU are the proxy's only`
      : count > 1
        ? `${count} egress-proxy \`serve\` processes on one port with EGRESS_REUSE_PORT=1 (SO_REUSEPORT: the kernel spreads connections), one file store, each its own admin port and audit log (rate limits per process); RSS and CPU are the processes summed`
        : 'egress-proxy `serve` (file store, caller token, allowlist, caller + upstream rate limits, audit log on, log level warn)',
    url: `http://127.0.0.1:${proxyPort}${PROXY_PREFIX}${UPSTREAM_PATH}`,
    process: instances[0]!.process,
    processes: instances.map((i) => i.process),
    ports: [proxyPort, ...instances.map((i) => i.adminPort)],
    token,
    env,
    instances,
  };
}

/** `count` serve processes on one free port with EGRESS_REUSE_PORT=1, each with its own audit log and admin port. */
async function startSharing(name: EgressName, env: NodeJS.ProcessEnv, dir: string, count: number): Promise<{ instances: EgressInstance[]; proxyPort: number }> {
  let lastError: unknown;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const instances: EgressInstance[] = [];
    try {
      for (let i = 1; i <= count; i++) {
        const started = await startServe(`${LABELS[name]} #${i}`, {
          ...env,
          EGRESS_LISTEN: `127.0.0.1:${port}`,
          EGRESS_REUSE_PORT: '1',
          EGRESS_AUDIT_LOG: join(dir, `audit-${i}.log`),
        });
        if (started.proxyPort !== port) throw new Error(`${LABELS[name]} #${i} listens on ${started.proxyPort}, not on the shared port ${port}`);
        instances.push(started.instance);
      }
      return { instances, proxyPort: port };
    } catch (err) {
      lastError = err;
      // Another program took the port between freePort() and the first listen: stop what started, try another.
      for (const instance of instances) {
        instance.process.stopping = true;
        try {
          process.kill(-instance.process.pid, 'SIGKILL');
        } catch {
          // gone
        }
        await instance.process.exit;
      }
      if (!/address already in use/.test((err as Error).message) || instances.length > 0) throw err;
    }
  }
  throw lastError;
}

/**
 * The environment and Node flags of `npm start` (package.json), so that the bench runs `serve`
 * exactly as users are told to: `[NAME=value ...] node <flags> bin/egress.js serve`.
 */
export async function startCommand(): Promise<{ env: Record<string, string>; flags: string[] }> {
  const pkg = JSON.parse(await readFile(join(REPO_ROOT, 'package.json'), 'utf8')) as { scripts?: { start?: string } };
  const words = (pkg.scripts?.start ?? '').split(/\s+/).filter(Boolean);
  const env: Record<string, string> = {};
  while (words.length > 0 && /^[A-Z_][A-Z0-9_]*=/.test(words[0]!)) {
    const word = words.shift()!;
    const eq = word.indexOf('=');
    env[word.slice(0, eq)] = word.slice(eq + 1);
  }
  const bin = words.indexOf('bin/egress.js');
  if (words[0] !== 'node' || bin < 0 || words[bin + 1] !== 'serve') throw new Error(`package.json "start" is not "[NAME=value ...] node <flags> bin/egress.js serve": ${pkg.scripts?.start}`);
  return { env, flags: words.slice(1, bin) };
}

/**
 * Compile every module into bin/egress.js's compile cache with serve's flags (the cache is kept per
 * Node version and V8 flags), as the image does when it is built. Otherwise the first `serve` after
 * a code change strips types itself and keeps the type stripper resident: about 14 MiB more RSS for
 * that process's whole life, which a bench or soak would report as the proxy's own.
 */
async function warmCompileCache(nodeArgs: readonly string[]): Promise<void> {
  const dir = process.env.NODE_COMPILE_CACHE || join(REPO_ROOT, 'node_modules', '.cache', 'egress-compile');
  const script = `import { enableCompileCache } from 'node:module'; import { globSync } from 'node:fs'; enableCompileCache(${JSON.stringify(dir)}); for (const f of globSync('src/**/*.ts', { cwd: ${JSON.stringify(REPO_ROOT)} })) await import(${JSON.stringify(`${REPO_ROOT}/`)} + f);`;
  // Profiling flags would leave a profile of this step beside the proxy's.
  const flags = nodeArgs.filter((a) => !/^--(cpu-prof|heap-prof|prof)/.test(a));
  const result = await runCommand(process.execPath, [...flags, '--input-type=module', '-e', script], { cwd: REPO_ROOT, timeoutMs: 60_000 });
  if (result.code !== 0) throw new Error(`warming the compile cache failed (exit ${result.code}):\n${result.stdout}${result.stderr}`);
}

/** One `egress serve`, started and ready; its ports are found in /proc (the admin one is always port 0). */
async function startServe(label: string, env: NodeJS.ProcessEnv): Promise<{ instance: EgressInstance; proxyPort: number }> {
  // BENCH_EGRESS_NODE_ARGS: extra Node flags for `serve`, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof".
  const start = await startCommand();
  const nodeArgs = [...(process.env.BENCH_EGRESS_NODE_ARGS ?? '').split(' ').filter(Boolean), ...start.flags];
  await warmCompileCache(nodeArgs);
  const proxy = spawnChild(label, process.execPath, [...nodeArgs, 'bin/egress.js', 'serve'], { env: { ...env, ...start.env }, cwd: REPO_ROOT, stopSignal: 'SIGTERM' });
  // Find the listening ports in /proc, then tell them apart by asking /readyz (the proxy listener
  // answers it with an X-Egress-Error; the admin listener does not).
  const deadline = Date.now() + START_TIMEOUT_MS;
  let ports: number[] = [];
  while (ports.length < 2) {
    if (proxy.exited) {
      await proxy.exit;
      throw new Error(`${label}: egress serve exited before listening\n${proxy.output()}`);
    }
    if (Date.now() > deadline) throw new Error(`${label}: egress serve not listening on two ports within ${START_TIMEOUT_MS / 1000} s\n${proxy.output()}`);
    await sleep(50);
    ports = listeningPorts(proxy.pid);
  }
  if (ports.length !== 2) throw new Error(`${label}: egress serve listens on ${ports.length} ports (${ports.join(', ')}); expected 2`);
  let adminPort: number | undefined;
  let proxyPort: number | undefined;
  for (const port of ports) {
    const res = await httpRequest(`http://127.0.0.1:${port}/readyz`);
    if (res.headers['x-egress-error'] !== undefined) proxyPort = port;
    else adminPort = port;
  }
  if (adminPort === undefined || proxyPort === undefined) throw new Error(`${label}: cannot tell the admin port from the proxy port among ${ports.join(', ')}`);
  for (;;) {
    const res = await httpRequest(`http://127.0.0.1:${adminPort}/readyz`);
    if (res.status === 200) break;
    if (proxy.exited) throw new Error(`${label}: egress serve exited before ready\n${proxy.output()}`);
    if (Date.now() > deadline) throw new Error(`${label}: /readyz still ${res.status} after ${START_TIMEOUT_MS / 1000} s: ${res.body}\n${proxy.output()}`);
    await sleep(100);
  }
  return { instance: { process: proxy, adminPort, auditLog: env.EGRESS_AUDIT_LOG! }, proxyPort };
}

// ---- redis-server (egress-redis's store) ------------------------------------------------------

export interface RedisServer {
  readonly process: Managed;
  readonly port: number;
  readonly url: string;
  readonly version: string;
}

/**
 * A private redis-server on a free port, no persistence (the bench's data is thrown away), in its
 * own process group under pdeathsig like nginx, stopped after the proxies (stopLate) on every
 * exit path of the bench: stopAll on success, failure, budget and signals, killAllSync on exit.
 */
export async function startRedis(root: string): Promise<RedisServer | { readonly skipped: string }> {
  const server = which('redis-server');
  if (!server) return { skipped: 'redis-server not found on PATH: egress-redis skipped (install it with `apt-get install redis-server`, then run again)' };
  const version = /v=(\S+)/.exec((await runCommand(server, ['--version'], { timeoutMs: 10_000 })).stdout)?.[1] ?? 'unknown';
  const dir = join(root, 'redis');
  await mkdir(dir, { mode: 0o700 });
  let lastError = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const child = spawnChild('redis-server', server, [
      '--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no',
      '--protected-mode', 'no', '--loglevel', 'warning', '--daemonize', 'no',
    ], { stopSignal: 'SIGTERM', stopLate: true });
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (!child.exited && Date.now() < deadline && !listeningPorts(child.pid).includes(port)) await sleep(50);
    if (!child.exited && listeningPorts(child.pid).includes(port)) {
      const pong = await redisPing(port);
      if (pong !== '+PONG') throw new Error(`redis-server on ${port} answered PING with ${JSON.stringify(pong)}\n${child.output()}`);
      return { process: child, port, url: `redis://127.0.0.1:${port}/0`, version };
    }
    if (!child.exited) {
      child.stopping = true;
      process.kill(-child.pid, 'SIGKILL');
      await child.exit;
      throw new Error(`redis-server did not listen on ${port} within ${START_TIMEOUT_MS / 1000} s\n${child.output()}`);
    }
    await child.exit;
    lastError = child.output();
    if (!/Address already in use/i.test(lastError)) break;
  }
  throw new Error(`redis-server failed to start\n${lastError}`);
}

/** One inline PING over a plain socket (no client library needed in the orchestrator). */
function redisPing(port: number): Promise<string> {
  return new Promise((resolvePing, reject) => {
    const socket = connect({ port, host: '127.0.0.1' });
    let reply = '';
    socket.setTimeout(5000, () => {
      socket.destroy();
      reject(new Error(`redis-server on ${port}: no answer to PING within 5 s`));
    });
    socket.once('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk: Buffer) => {
      reply += chunk.toString('latin1');
      if (reply.includes('\r\n')) {
        socket.end();
        resolvePing(reply.split('\r\n')[0]!);
      }
    });
    socket.once('error', reject);
  });
}

// ---- nginx ------------------------------------------------------------------------------------

export type NginxStart = { readonly target: Target; readonly version: string } | { readonly skipped: string };

export async function startNginx(upstream: Upstream, root: string): Promise<NginxStart> {
  const nginx = which('nginx');
  if (!nginx) return { skipped: 'nginx not found on PATH: skipped (install it with `apt-get install nginx`, then run again)' };
  const version = (await runCommand(nginx, ['-v'], { timeoutMs: 10_000 })).stderr.trim();
  const dir = join(root, 'nginx');
  await mkdir(dir, { recursive: true });
  // Workers may run as an unprivileged user (nobody): they need to reach the temp folders.
  await chmod(root, 0o755);
  await chmod(dir, 0o755);
  const errorLog = join(dir, 'error.log');
  const conf = join(dir, 'nginx.conf');

  // nginx cannot listen on port 0: take a free port, and try another if it was taken meanwhile.
  let lastError = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    await writeFile(conf, nginxConfig(dir, port, upstream.port));
    const master = spawnChild('nginx', nginx, ['-e', errorLog, '-p', `${dir}/`, '-c', conf], { stopSignal: 'SIGTERM' });
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (!master.exited && Date.now() < deadline && !listeningPorts(master.pid).includes(port)) await sleep(50);
    if (!master.exited && listeningPorts(master.pid).includes(port)) {
      return {
        version,
        target: {
          name: 'nginx',
          label: LABELS.nginx,
          description: `${version}: master + 1 worker, proxy_set_header for both headers, upstream keepalive 64, keepalive_requests 1000000; RSS is master + worker`,
          url: `http://127.0.0.1:${port}${PROXY_PREFIX}${UPSTREAM_PATH}`,
          process: master,
          processes: [master],
          ports: [port],
        },
      };
    }
    if (!master.exited) {
      master.stopping = true;
      process.kill(-master.pid, 'SIGKILL');
      await master.exit;
      throw new Error(`nginx did not listen on ${port} within ${START_TIMEOUT_MS / 1000} s\n${master.output()}`);
    }
    await master.exit;
    lastError = master.output();
    if (!/Address already in use/.test(lastError)) break;
  }
  throw new Error(`nginx failed to start\n${lastError}`);
}

function nginxConfig(dir: string, port: number, upstreamPort: number): string {
  return `# generated by bench/targets.ts
daemon off;
master_process on;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;

events {
  worker_connections 4096;
}

http {
  access_log off;
  client_body_temp_path ${dir}/client_body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  client_max_body_size 1m;

  upstream bench_upstream {
    server 127.0.0.1:${upstreamPort};
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }

  server {
    listen 127.0.0.1:${port};

    location ${PROXY_PREFIX}/ {
      proxy_pass http://bench_upstream/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $proxy_host;
      proxy_set_header PLAID-CLIENT-ID "${CLIENT_ID}";
      proxy_set_header PLAID-SECRET "${SECRET}";
    }
  }
}
`;
}
