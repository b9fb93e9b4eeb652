import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { loadSettings } from '../../src/config/settings.ts';
import { startProxy, type RunningProxy } from '../../src/main.ts';
import { generateToken, hashToken, newTokenId } from '../../src/store/callers.ts';
import { newCredentialRecord } from '../../src/store/credentials.ts';
import { openStore } from '../../src/store/open-store.ts';
import { createKeyring } from '../../src/store/keyring.ts';

export interface TestProxyOptions {
  /** Route files by name (without .yaml). */
  readonly routes: Record<string, string>;
  readonly credentials?: Record<string, Record<string, string>>;
  readonly callers?: readonly string[];
  /** Extra files to write into the routes folder (e.g. an upstream CA). */
  readonly files?: Record<string, string>;
  /** EGRESS_STORE: the data folder's store.json unless given (e.g. a redis:// URL). */
  readonly store?: string;
  /** More EGRESS_* settings. */
  readonly env?: Record<string, string>;
  /** Use this data folder (its keyring and routes) instead of making and seeding a new one. */
  readonly dir?: string;
}

export interface TestProxy {
  readonly url: string;
  readonly admin: string;
  readonly dir: string;
  readonly routesDir: string;
  readonly storePath: string;
  readonly tokens: Readonly<Record<string, string>>;
  readonly proxy: RunningProxy;
  services(): RunningProxy['services'];
  /** Everything the operational log printed so far. */
  logs(): string;
  auditText(): Promise<string>;
  close(): Promise<void>;
}

export async function makeTempDir(prefix = 'egress-test-'): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

/** Lay out a data folder the way the CLI would: keyring, store with credentials and callers, routes. */
export async function seedDataDir(dir: string, options: TestProxyOptions): Promise<{ tokens: Record<string, string> }> {
  const routesDir = join(dir, 'routes');
  await mkdir(routesDir, { recursive: true });
  for (const [name, text] of Object.entries(options.routes)) await writeFile(join(routesDir, `${name}.yaml`), text);
  for (const [name, text] of Object.entries(options.files ?? {})) await writeFile(join(routesDir, name), text);
  const keyring = await createKeyring(join(dir, 'master.key'));
  const store = openStore(options.store ?? `file:${join(dir, 'store.json')}`);
  const now = new Date();
  for (const [id, fields] of Object.entries(options.credentials ?? {})) {
    await store.put('credential', newCredentialRecord(keyring, id, fields, now), 0);
  }
  const tokens: Record<string, string> = {};
  for (const name of options.callers ?? []) {
    const token = generateToken();
    tokens[name] = token;
    await store.put('caller', { name, revision: 1, created_at: now.toISOString(), updated_at: now.toISOString(), tokens: [{ id: newTokenId(), hash: hashToken(token), created_at: now.toISOString() }] }, 0);
  }
  await store.close();
  return { tokens };
}

export function envFor(dir: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    EGRESS_MASTER_KEY_FILE: join(dir, 'master.key'),
    EGRESS_STORE: `file:${join(dir, 'store.json')}`,
    EGRESS_ROUTES: join(dir, 'routes'),
    EGRESS_AUDIT_LOG: join(dir, 'audit.log'),
    EGRESS_LISTEN: '127.0.0.1:0',
    EGRESS_ADMIN_LISTEN: '127.0.0.1:0',
    EGRESS_LOG_LEVEL: 'info',
    ...extra,
  };
}

/** An in-process proxy on ephemeral ports with its own data folder; its log is captured. */
export async function startTestProxy(options: TestProxyOptions): Promise<TestProxy> {
  const dir = options.dir ?? (await makeTempDir());
  const { tokens } = options.dir ? { tokens: {} } : await seedDataDir(dir, options);
  const lines: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(chunk.toString('utf8'));
      done();
    },
  });
  const settings = loadSettings(envFor(dir, { ...(options.store ? { EGRESS_STORE: options.store } : {}), ...options.env }));
  const proxy = await startProxy(settings, { logDestination: destination });
  return {
    url: `http://127.0.0.1:${proxy.proxyAddress.port}`,
    admin: `http://127.0.0.1:${proxy.adminAddress.port}`,
    dir,
    routesDir: join(dir, 'routes'),
    storePath: join(dir, 'store.json'),
    tokens,
    proxy,
    services: () => proxy.services,
    logs: () => lines.join(''),
    auditText: async () => {
      // Audit lines are written asynchronously; give the stream a moment to flush.
      await new Promise((r) => setTimeout(r, 50));
      return readFile(join(dir, 'audit.log'), 'utf8').catch(() => '');
    },
    close: async () => {
      await proxy.close(2_000);
      if (!options.dir) await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Poll until `check` returns true, or fail after `timeoutMs`. */
export async function eventually(check: () => boolean | Promise<boolean>, timeoutMs = 3_000, what = 'condition'): Promise<number> {
  const start = Date.now();
  for (;;) {
    if (await check()) return Date.now() - start;
    if (Date.now() - start > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
