/**
 * Child processes of the bench: start them, talk to them, measure them, and make sure every one of
 * them is gone when the bench ends, however it ends.
 *
 * - Node children are forked with an IPC channel and exit when it closes (the bench died).
 * - Other programs (egress-proxy's `serve`, nginx) run in their own process group, so the group
 *   signal reaches nginx's workers too, and under `setpriv --pdeathsig SIGKILL` when setpriv is
 *   available, so they die with the bench even if it is SIGKILLed.
 * - stopAll() signals, waits (bounded), then SIGKILLs whatever is left, descendants included;
 *   killAllSync() is the last resort from process.on('exit').
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { connect, createServer } from 'node:net';
import { delimiter, join } from 'node:path';
import { sleep, type BenchSettings, type LoadJob, type LoadReply, type LoadResult } from './common.ts';

const TAIL_BYTES = 16 * 1024;

export interface Managed {
  readonly name: string;
  readonly child: ChildProcess;
  readonly pid: number;
  /** Own process group (signals go to -pid). */
  readonly group: boolean;
  readonly stopSignal: NodeJS.Signals;
  /** The last bytes of the child's stdout and stderr. */
  output(): string;
  /** Lines the child wrote to stdout/stderr so far. */
  lines(): number;
  readonly exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  exited: boolean;
  /** Set once the bench asked it to stop: any exit before that is unexpected. */
  stopping: boolean;
  /** Stopped only after every other child is gone (a server the others depend on, like redis-server). */
  readonly stopLate: boolean;
}

const registry: Managed[] = [];
const exitListeners: ((m: Managed, code: number | null, signal: NodeJS.Signals | null) => void)[] = [];

/** Called when a child exits before the bench asked it to. */
export function onUnexpectedExit(listener: (m: Managed, code: number | null, signal: NodeJS.Signals | null) => void): void {
  exitListeners.push(listener);
}

function manage(name: string, child: ChildProcess, group: boolean, stopSignal: NodeJS.Signals, stopLate = false): Managed {
  if (child.pid === undefined) throw new Error(`${name}: could not start`);
  let tail = '';
  let lines = 0;
  const collect = (chunk: Buffer) => {
    const text = chunk.toString('utf8');
    for (let i = text.indexOf('\n'); i !== -1; i = text.indexOf('\n', i + 1)) lines++;
    tail = (tail + text).slice(-TAIL_BYTES);
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  const managed: Managed = {
    name,
    child,
    pid: child.pid,
    group,
    stopSignal,
    output: () => tail,
    lines: () => lines,
    exited: false,
    stopping: false,
    stopLate,
    exit: new Promise((resolveExit) => {
      child.once('exit', (code, signal) => {
        managed.exited = true;
        if (!managed.stopping) for (const listener of exitListeners) listener(managed, code, signal);
        resolveExit({ code, signal });
      });
    }),
  };
  child.on('error', (err) => collect(Buffer.from(`\n[spawn error] ${err.message}\n`)));
  registry.push(managed);
  return managed;
}

/** Fork a TypeScript entry point under this same Node (type stripping), with IPC. */
export function forkChild(name: string, file: string, env: Record<string, string> = {}): Managed {
  const child = fork(file, [], {
    execPath: process.execPath,
    execArgv: [],
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
  });
  return manage(name, child, false, 'SIGTERM');
}

let setprivPath: string | null | undefined;
function setpriv(): string | null {
  if (setprivPath === undefined) setprivPath = which('setpriv');
  return setprivPath;
}

/** Start a program in its own process group, killed with the bench when setpriv is available. */
export function spawnChild(name: string, command: string, args: readonly string[], options: { env?: NodeJS.ProcessEnv; cwd?: string; stopSignal?: NodeJS.Signals; stopLate?: boolean } = {}): Managed {
  const wrapper = setpriv();
  const [cmd, argv] = wrapper ? [wrapper, ['--pdeathsig', 'SIGKILL', '--', command, ...args]] : [command, [...args]];
  const child = spawn(cmd, argv, {
    env: options.env ?? process.env,
    cwd: options.cwd,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  return manage(name, child, true, options.stopSignal ?? 'SIGTERM', options.stopLate ?? false);
}

/** `command` on PATH (then the sbin folders, where nginx lives), or null. */
export function which(command: string): string | null {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/local/sbin', '/usr/sbin', '/sbin'];
  for (const dir of dirs) {
    if (!dir) continue;
    const candidate = join(dir, command);
    if (existsSync(candidate)) return candidate;
  }
  return null;
}

/**
 * The saturation runs' load generator: BENCH_LOAD when set (an error when it names wrk and wrk is not
 * on PATH), else wrk when it is on PATH (it leaves the target more of the shared CPUs), else autocannon.
 */
export function saturationGenerator(load: BenchSettings['load']): 'wrk' | 'autocannon' {
  const haveWrk = which('wrk') !== null;
  if (load === 'wrk' && !haveWrk) throw new Error('BENCH_LOAD=wrk: wrk is not on PATH (apt-get install wrk)');
  return load ?? (haveWrk ? 'wrk' : 'autocannon');
}

/** Resolve with the port from the child's first `{type:'ready', port}` IPC message. */
export function waitReady(m: Managed, timeoutMs: number): Promise<number> {
  return new Promise((resolveReady, reject) => {
    const timer = setTimeout(() => fail(new Error(`${m.name}: not ready within ${timeoutMs / 1000} s\n${m.output()}`)), timeoutMs);
    const onMessage = (message: { type?: string; port?: number }) => {
      if (message?.type !== 'ready' || typeof message.port !== 'number') return;
      cleanup();
      resolveReady(message.port);
    };
    const onExit = (code: number | null, signal: NodeJS.Signals | null) => fail(new Error(`${m.name}: exited (${signal ?? code}) before it was ready\n${m.output()}`));
    const cleanup = () => {
      clearTimeout(timer);
      m.child.off('message', onMessage);
      m.child.off('exit', onExit);
    };
    const fail = (err: Error) => {
      cleanup();
      reject(err);
    };
    m.child.on('message', onMessage);
    m.child.once('exit', onExit);
  });
}

let nextRequestId = 1;

/** Send `{type, id}` and resolve with the child's reply carrying the same type and id. */
export function ipcRequest<T extends { type: string; id: number }>(m: Managed, type: string, extra: Record<string, unknown>, timeoutMs: number): Promise<T> {
  const id = nextRequestId++;
  return new Promise((resolveReply, reject) => {
    const timer = setTimeout(() => fail(new Error(`${m.name}: no "${type}" reply within ${Math.round(timeoutMs / 1000)} s`)), timeoutMs);
    const onMessage = (message: { type?: string; id?: number }) => {
      if (message?.id !== id) return;
      cleanup();
      resolveReply(message as T);
    };
    const onExit = (code: number | null, signal: NodeJS.Signals | null) => fail(new Error(`${m.name}: exited (${signal ?? code}) while handling "${type}"\n${m.output()}`));
    const cleanup = () => {
      clearTimeout(timer);
      m.child.off('message', onMessage);
      m.child.off('exit', onExit);
    };
    const fail = (err: Error) => {
      cleanup();
      reject(err);
    };
    m.child.on('message', onMessage);
    m.child.once('exit', onExit);
    m.child.send({ type, id, ...extra });
  });
}

// ---- /proc ------------------------------------------------------------------------------------

/** The pid and all its descendants (Linux /proc). */
export function processTree(pid: number): number[] {
  const out: number[] = [];
  const visit = (p: number) => {
    out.push(p);
    let tasks: string[] = [];
    try {
      tasks = readdirSync(`/proc/${p}/task`);
    } catch {
      return;
    }
    for (const tid of tasks) {
      let children = '';
      try {
        children = readFileSync(`/proc/${p}/task/${tid}/children`, 'utf8');
      } catch {
        continue;
      }
      for (const c of children.split(' ')) if (c.trim()) visit(Number(c));
    }
  };
  visit(pid);
  return out;
}

export interface Memory {
  /** VmRSS, summed over the process tree, kB. */
  readonly rssKb: number;
  /** VmHWM (peak RSS), summed over the process tree, kB. */
  readonly hwmKb: number;
  readonly processes: number;
}

/** Resident memory of the process and its descendants, from /proc/<pid>/status. */
export function memory(pid: number): Memory | undefined {
  let rssKb = 0;
  let hwmKb = 0;
  let processes = 0;
  for (const p of processTree(pid)) {
    let status: string;
    try {
      status = readFileSync(`/proc/${p}/status`, 'utf8');
    } catch {
      continue;
    }
    rssKb += Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? 0);
    hwmKb += Number(/^VmHWM:\s+(\d+)/m.exec(status)?.[1] ?? 0);
    processes++;
  }
  return processes ? { rssKb, hwmKb, processes } : undefined;
}

/** memory() summed over several processes (a target made of several, like egress-x2), trees included. */
export function memoryOf(pids: readonly number[]): Memory | undefined {
  const parts = pids.map(memory).filter((m): m is Memory => m !== undefined);
  if (parts.length === 0) return undefined;
  return parts.reduce((a, b) => ({ rssKb: a.rssKb + b.rssKb, hwmKb: a.hwmKb + b.hwmKb, processes: a.processes + b.processes }));
}

/** CPU time (user + system) used so far by the process tree, children it has reaped included (wrk under the load generator), in clock ticks (USER_HZ). */
export function cpuTicks(pid: number): number {
  let ticks = 0;
  for (const p of processTree(pid)) ticks += ownTicks(p);
  return ticks;
}

function ownTicks(pid: number): number {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return 0;
  }
  // Fields after the command name (which may contain spaces): state is field 3, utime 14, stime 15,
  // cutime 16 and cstime 17 (children waited for).
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]) + Number(fields[13]) + Number(fields[14]);
}

/** Machine-wide busy CPU time (all CPUs, everything but idle and iowait), in clock ticks. */
export function machineBusyTicks(): number {
  const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
  const values = line.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = values;
  return user + nice + system + irq + softirq + steal;
}

/** CPU time of every child the bench started (trees included), in clock ticks. */
export function benchTicks(): number {
  let ticks = 0;
  for (const m of registry) if (!m.exited) ticks += cpuTicks(m.pid);
  return ticks;
}

/** TCP ports the process is listening on (its sockets matched against /proc/<pid>/net/tcp{,6}). */
export function listeningPorts(pid: number): number[] {
  const inodes = new Set<string>();
  let fds: string[] = [];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return [];
  }
  for (const fd of fds) {
    try {
      const link = readlinkSync(`/proc/${pid}/fd/${fd}`);
      const match = /^socket:\[(\d+)\]$/.exec(link);
      if (match) inodes.add(match[1]!);
    } catch {
      // closed meanwhile
    }
  }
  const ports = new Set<number>();
  for (const table of ['tcp', 'tcp6']) {
    let text = '';
    try {
      text = readFileSync(`/proc/${pid}/net/${table}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length < 10 || cols[3] !== '0A') continue; // 0A: LISTEN
      if (!inodes.has(cols[9]!)) continue;
      ports.add(Number.parseInt(cols[1]!.split(':').pop()!, 16));
    }
  }
  return [...ports];
}

/** A port that was free a moment ago (for programs that cannot listen on port 0, like nginx). */
export function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolvePort(port));
    });
  });
}

/** True when nothing accepts connections on 127.0.0.1:port. */
export function portClosed(port: number): Promise<boolean> {
  return new Promise((resolveClosed) => {
    const socket = connect({ port, host: '127.0.0.1' });
    socket.setTimeout(1000);
    socket.once('connect', () => {
      socket.destroy();
      resolveClosed(false);
    });
    socket.once('timeout', () => {
      socket.destroy();
      resolveClosed(false);
    });
    socket.once('error', () => resolveClosed(true));
  });
}

// ---- stopping ---------------------------------------------------------------------------------

function signal(m: Managed, sig: NodeJS.Signals): void {
  try {
    if (m.group) process.kill(-m.pid, sig);
    else process.kill(m.pid, sig);
  } catch {
    // already gone
  }
}

function killPids(pids: readonly number[]): void {
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Stop every child, newest first: its stop signal, up to `graceMs` to exit, then SIGKILL for it
 * and any descendant still alive. Children marked stopLate (redis-server) are stopped the same way
 * once all the others are gone, so no proxy loses its store while it shuts down. Returns what had
 * to be killed.
 */
export async function stopAll(graceMs: number): Promise<string[]> {
  const running = [...registry].reverse().filter((m) => !m.exited);
  return [
    ...await stopGroup(running.filter((m) => !m.stopLate), graceMs),
    ...await stopGroup(running.filter((m) => m.stopLate), graceMs),
  ];
}

/** Stop these children now (stopAll's way: the stop signal, then SIGKILL for what is left); what had to be killed. */
export function stopProcesses(processes: readonly Managed[], graceMs: number): Promise<string[]> {
  return stopGroup(processes.filter((m) => !m.exited), graceMs);
}

async function stopGroup(running: readonly Managed[], graceMs: number): Promise<string[]> {
  const killed: string[] = [];
  if (running.length === 0) return killed;
  const trees = new Map(running.map((m) => [m, processTree(m.pid)]));
  for (const m of running) {
    m.stopping = true;
    signal(m, m.stopSignal);
  }
  await Promise.race([Promise.all(running.map((m) => m.exit)), sleep(graceMs)]);
  for (const m of running) {
    const leftovers = (trees.get(m) ?? [m.pid]).filter(alive);
    if (leftovers.length === 0) continue;
    killed.push(`${m.name} (pid ${leftovers.join(', ')})`);
    if (!m.exited) signal(m, 'SIGKILL');
    killPids(leftovers);
  }
  await Promise.race([Promise.all(running.map((m) => m.exit)), sleep(2000)]);
  return killed;
}

/** Synchronous last resort (process 'exit'): SIGKILL every child still running, with descendants. */
export function killAllSync(): void {
  for (const m of registry) {
    if (m.exited) continue;
    m.stopping = true;
    const tree = processTree(m.pid);
    signal(m, 'SIGKILL');
    killPids(tree);
  }
}

/** One job on the load generator child (bench/load.ts); its failure is thrown. */
export async function runLoad(load: Managed, job: LoadJob): Promise<LoadResult> {
  const reply = await ipcRequest<LoadReply>(load, 'run', { job }, (job.durationSec + 30) * 1000);
  if (reply.type === 'error') throw new Error(`load generator: ${reply.message}`);
  return reply.result;
}

/** Clock ticks per second (USER_HZ), the unit of cpuTicks; 100 when getconf cannot tell. */
export function clockTicksPerSecond(): Promise<number> {
  return runCommand('getconf', ['CLK_TCK'], { timeoutMs: 5000 }).then((r) => Number(r.stdout.trim()) || 100, () => 100);
}

/** Run a command to completion (bounded), optionally feeding stdin. */
export function runCommand(command: string, args: readonly string[], options: { env?: NodeJS.ProcessEnv; cwd?: string; input?: string; timeoutMs: number }): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(command, [...args], { env: options.env ?? process.env, cwd: options.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command} ${args.join(' ')}: still running after ${options.timeoutMs / 1000} s`));
    }, options.timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      resolveRun({ code, stdout, stderr });
    });
    child.stdin.on('error', () => {});
    child.stdin.end(options.input ?? '');
  });
}

/**
 * The life of a bench script (bench/run.ts, bench/soak.ts): every child process is stopped and the
 * temp folder removed on every way out (success, a failure, the time budget, a signal), and a child
 * that dies mid-run is recorded as a failure. `what` names the script in its messages.
 */
export class BenchRun {
  /** Problems that make the run fail (exit 1). */
  readonly failures: string[] = [];
  readonly #what: string;
  #tmpRoot: string | undefined;
  #shuttingDown: Promise<string[]> | undefined;
  #interrupted: NodeJS.Signals | undefined;

  constructor(what: string) {
    this.#what = what;
    process.on('exit', () => killAllSync());
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
      process.once(sig, () => {
        this.#interrupted = sig;
        process.stderr.write(`\n${sig}: stopping the ${what} and its child processes\n`);
        void this.#stopAndExit(sig === 'SIGINT' ? 130 : 143);
      });
    }
    onUnexpectedExit((m, code, signal) => {
      this.failures.push(`${m.name} (pid ${m.pid}) exited during the ${what} (${signal ?? `code ${code}`}); its last output:\n${indent(m.output().slice(-4000))}`);
    });
  }

  /** A fresh temp folder under the system's, removed when the run ends (kept with BENCH_KEEP_TMP=1). */
  async makeTmp(prefix: string): Promise<string> {
    this.#tmpRoot = await mkdtemp(join(tmpdir(), prefix));
    return this.#tmpRoot;
  }

  /** Stop every child (once); the names of those that had to be SIGKILLed. */
  shutdown(): Promise<string[]> {
    this.#shuttingDown ??= stopAll(8000);
    return this.#shuttingDown;
  }

  async removeTmp(): Promise<void> {
    if (!this.#tmpRoot) return;
    if (process.env.BENCH_KEEP_TMP === '1') {
      process.stdout.write(`kept the temp folder (BENCH_KEEP_TMP=1): ${this.#tmpRoot}\n`);
      return;
    }
    await rm(this.#tmpRoot, { recursive: true, force: true }).catch(() => {});
  }

  /** The whole run is bounded: past `seconds`, stop everything and exit 1. Returns the timer to clear. */
  budget(seconds: number): NodeJS.Timeout {
    return setTimeout(() => {
      process.stderr.write(`\nthe ${this.#what} did not finish within ${seconds} s: stopping\n`);
      void this.#stopAndExit(1);
    }, seconds * 1000);
  }

  /** Run `main` and exit with its code; a failure prints what went wrong, stops everything and exits 1. */
  async exit(main: () => Promise<number>): Promise<never> {
    let exitCode = 1;
    try {
      exitCode = await main();
    } catch (err) {
      if (this.#interrupted) {
        // The signal handler is stopping everything and exits; children dying meanwhile is expected.
        await new Promise(() => {});
      }
      process.stderr.write(`\n${this.#what} failed: ${(err as Error)?.stack ?? String(err)}\n`);
      for (const f of this.failures) process.stderr.write(`  FAIL: ${f}\n`);
      await this.shutdown();
      await this.removeTmp();
      exitCode = 1;
    }
    process.exit(exitCode);
  }

  async #stopAndExit(code: number): Promise<never> {
    await this.shutdown().catch(() => []);
    await this.removeTmp();
    process.exit(code);
  }
}

export function indent(text: string): string {
  return text.trimEnd().split('\n').map((l) => `    ${l}`).join('\n');
}
