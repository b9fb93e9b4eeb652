import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis, type RedisOptions } from 'ioredis';

/**
 * A private redis-server on a free port, so a test can stop, freeze (SIGSTOP) and restart it.
 * Append-only persistence with an fsync per write is on, so a restart (even after SIGKILL) keeps
 * every write, as production Redis must.
 */
export class TestRedis {
  readonly port: number;
  readonly dir: string;
  /** More redis-server arguments (e.g. a renamed command). */
  readonly #args: readonly string[];
  #child: ChildProcess | undefined;

  private constructor(port: number, dir: string, args: readonly string[]) {
    this.port = port;
    this.dir = dir;
    this.#args = args;
  }

  static async create(options: { start?: boolean; args?: readonly string[] } = {}): Promise<TestRedis> {
    const redis = new TestRedis(await freePort(), await mkdtemp(join(tmpdir(), 'egress-redis-')), options.args ?? []);
    if (options.start !== false) await redis.start();
    return redis;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    const child = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--dir', this.dir, '--appendonly', 'yes', '--appendfsync', 'always', '--save', '', '--protected-mode', 'no', '--loglevel', 'warning', ...this.#args], { stdio: 'ignore' });
    this.#child = child;
    const deadline = Date.now() + 10_000;
    for (;;) {
      const client = this.client({ retryStrategy: () => null, lazyConnect: true });
      client.on('error', () => {});
      try {
        await client.connect();
        await client.ping();
        client.disconnect();
        return;
      } catch {
        client.disconnect();
        if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`);
        if (Date.now() > deadline) throw new Error('redis-server did not start');
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /** Stop the server (SIGKILL: a crash, not a clean shutdown). */
  async stop(): Promise<void> {
    const child = this.#child;
    this.#child = undefined;
    if (!child || child.exitCode !== null) return;
    child.kill('SIGCONT');
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
  }

  /** Stop the server and throw its data away: the next start is empty, as a restart without persistence is. */
  async wipe(): Promise<void> {
    await this.stop();
    await rm(this.dir, { recursive: true, force: true });
    await mkdir(this.dir);
  }

  freeze(): void {
    this.#child?.kill('SIGSTOP');
  }

  thaw(): void {
    this.#child?.kill('SIGCONT');
  }

  /** A plain client for the test itself to read and damage keys. */
  client(options: RedisOptions = {}): Redis {
    return new Redis(this.port, '127.0.0.1', { maxRetriesPerRequest: 1, ...options });
  }

  async destroy(): Promise<void> {
    await this.stop();
    await rm(this.dir, { recursive: true, force: true });
  }
}

/**
 * A port for a server a test starts itself later (redis-server, a listener named in a setting).
 * Chosen below the kernel's ephemeral range where it can: a port the kernel handed out for a bind
 * to port 0 was free when checked, and could be handed to another socket of a test running beside
 * (an outgoing connection's, another port-0 bind) before the server bound it: "address already in
 * use". Below that range only another explicit bind takes a port, and these are picked at random.
 */
export async function freePort(): Promise<number> {
  const low = await ephemeralLow();
  if (low > FIRST_FIXED_PORT + 1_000) {
    for (let attempt = 0; attempt < 50; attempt++) {
      const port = FIRST_FIXED_PORT + Math.floor(Math.random() * (low - FIRST_FIXED_PORT));
      if (await bindable(port)) return port;
    }
  }
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

/** Above the ports services on this machine listen on (PostgreSQL, Redis, RabbitMQ, NATS…). */
const FIRST_FIXED_PORT = 20_000;

async function ephemeralLow(): Promise<number> {
  const range = await readFile('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').catch(() => '');
  const low = Number(range.trim().split(/\s+/)[0]);
  return Number.isInteger(low) ? low : 0;
}

function bindable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}
