/**
 * How `serve` runs, wherever it is started from: npm start and the image's ENTRYPOINT put these on
 * the command line, and a `serve` started without them (`npx egress serve`, a process manager's
 * `node bin/egress.js serve`) replaces itself with a process that has them (see bin/egress.js).
 * - `--disable-sigusr1`: no inspector by signal. An inspector attached to the proxy reads every
 *   decrypted credential; nothing may open one from outside.
 * - A young generation of 4 MB, slow old-generation growth, one V8 helper thread and optimisation
 *   on the main thread: RSS under load (see README, Performance).
 */
export const SERVE_NODE_FLAGS: readonly string[] = ['--disable-sigusr1', '--max-semi-space-size=4', '--heap-growing-percent=10', '--v8-pool-size=1', '--no-concurrent-recompilation'];

/** glibc's malloc settings: two arenas, and its default 128 KiB mmap threshold kept fixed (it otherwise rises for good after large blocks are freed). Read by glibc at start, so only the environment can set them. */
export const SERVE_ENV: Readonly<Record<string, string>> = { MALLOC_ARENA_MAX: '2', MALLOC_MMAP_THRESHOLD_: '131072' };

/** Is the inspector signal off in this process (on the command line or in NODE_OPTIONS)? */
export function inspectorSignalOff(execArgv: readonly string[] = process.execArgv, nodeOptions = process.env.NODE_OPTIONS ?? ''): boolean {
  return execArgv.includes('--disable-sigusr1') || /(^|\s)--disable-sigusr1(\s|$)/.test(nodeOptions);
}

/**
 * Replace this process (same pid, same stdio and signals; execve) with `node <SERVE_NODE_FLAGS>
 * <this process's own Node flags> script args`, SERVE_ENV added to the environment. Flags and
 * variables the process already had win over these (for V8 the last of a flag counts).
 */
export function restartWithServeFlags(script: string, args: readonly string[]): never {
  const env = { ...SERVE_ENV, ...process.env };
  if (typeof process.execve !== 'function') throw new Error('process.execve is not available');
  return process.execve(process.execPath, [process.execPath, ...SERVE_NODE_FLAGS, ...process.execArgv, script, ...args], env);
}
