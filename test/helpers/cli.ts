import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const BIN = fileURLToPath(new URL('../../bin/egress.js', import.meta.url));

export interface CliResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Run the real CLI as a child process with the test's environment (and Node 24: process.execPath). */
export function runCli(args: readonly string[], env: Record<string, string>, input?: string, cwd = ROOT): Promise<CliResult> {
  return collect(spawn(process.execPath, [BIN, ...args], { cwd, env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env }, stdio: ['pipe', 'pipe', 'pipe'] }), input);
}

/** A child's exit code and everything it printed; `input` goes to its stdin (which is then closed) when it has one. */
export function collect(child: ChildProcess, input?: string): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin?.end(input ?? '');
  });
}

export interface ServeProcess {
  readonly child: ChildProcess;
  readonly url: string;
  readonly admin: string;
  output(): string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Start `egress serve` as a child process and wait for its listening line (ports are ephemeral). */
export function startServe(env: Record<string, string>, cwd = ROOT, extraArgs: readonly string[] = []): Promise<ServeProcess> {
  return watchServe(spawn(process.execPath, ['--disable-sigusr1', BIN, 'serve', ...extraArgs], { cwd, env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env }, stdio: ['ignore', 'pipe', 'pipe'] }));
}

/** An `egress serve` started some other way (another Node command line, a namespace): its output, its addresses once it listens. */
export async function watchServe(child: ChildProcess): Promise<ServeProcess> {
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const addresses = await new Promise<{ listen: string; admin: string }>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve did not start:\n${out}`)), 15_000);
    const onData = () => {
      for (const line of out.split('\n')) {
        if (!line.includes('egress-proxy listening')) continue;
        const parsed = JSON.parse(line) as { listen: string; admin: string };
        clearTimeout(timer);
        child.stdout!.off('data', onData);
        resolve(parsed);
        return;
      }
    };
    child.stdout!.on('data', onData);
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`serve exited with ${code}:\n${out}`));
    });
  });
  return {
    child,
    url: `http://${addresses.listen}`,
    admin: `http://${addresses.admin}`,
    output: () => out,
    stop: (signal: NodeJS.Signals = 'SIGTERM') =>
      new Promise((resolve) => {
        if (child.exitCode !== null) return resolve(child.exitCode);
        child.once('exit', (code) => resolve(code));
        child.kill(signal);
      }),
  };
}
