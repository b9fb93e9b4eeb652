/** Where and how a bench ran: recorded at the top of every report and in its JSON (bench/run.ts, bench/soak.ts). */
import { readFile } from 'node:fs/promises';
import { availableParallelism, cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { runCommand } from './proc.ts';
import { REPO_ROOT } from './targets.ts';

export interface Environment {
  readonly command: string;
  readonly argv: readonly string[];
  readonly node: string;
  readonly execPath: string;
  readonly v8: string;
  readonly platform: string;
  readonly cpuCount: number;
  readonly availableParallelism: number;
  readonly cpuModel: string;
  readonly loadavg: readonly number[];
  readonly versions: { readonly autocannon: string; readonly undici: string; readonly 'http-proxy-3': string };
  readonly git: string;
  readonly benchEnv: Record<string, string>;
}

export async function environment(): Promise<Environment> {
  const version = async (pkg: string) => {
    try {
      return (JSON.parse(await readFile(join(REPO_ROOT, 'node_modules', pkg, 'package.json'), 'utf8')) as { version: string }).version;
    } catch {
      return 'unknown';
    }
  };
  const git = await runCommand('git', ['describe', '--always', '--dirty'], { cwd: REPO_ROOT, timeoutMs: 5000 }).then((r) => r.stdout.trim() || 'unknown', () => 'unknown');
  const benchEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => k.startsWith('BENCH_')).map(([k, v]) => [k, v ?? '']));
  const direct = [process.execPath, ...process.argv.slice(1)].join(' ');
  const viaNpm = process.env.npm_lifecycle_event ? `npm run ${process.env.npm_lifecycle_event} (${process.env.npm_lifecycle_script ?? ''}) -> ` : '';
  const envPrefix = Object.entries(benchEnv).map(([k, v]) => `${k}=${/^[\w.,:/=@+-]*$/.test(v) ? v : `'${v.replaceAll("'", "'\\''")}'`} `).join('');
  return {
    command: `${envPrefix}${viaNpm}${direct}`,
    argv: process.argv,
    node: process.version,
    execPath: process.execPath,
    v8: process.versions.v8,
    platform: `${process.platform} ${process.arch}`,
    cpuCount: cpus().length,
    availableParallelism: availableParallelism(),
    cpuModel: cpus()[0]?.model ?? 'unknown',
    loadavg: loadavg().map((n) => Math.round(n * 100) / 100),
    versions: { autocannon: await version('autocannon'), undici: await version('undici'), 'http-proxy-3': await version('http-proxy-3') },
    git,
    benchEnv,
  };
}
