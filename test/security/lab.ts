import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { startUpstream, type Handler, type Upstream } from '../helpers/upstream.ts';

/**
 * The security lab (../shared/reference/security.md §0): a real `egress serve` child process; U, a
 * recording upstream (the configured provider); E, a recording "evil" origin; callers a and b; a
 * canary credential. After every case, g0() checks the global invariants: the process is alive,
 * the canary appears nowhere (raw, base64, URL-encoded, JSON-escaped, hex), and U got only what
 * the case allows.
 */
export const CANARY = 'sk_test_CANARY_7f3a9c';
export const CLIENT_ID = 'client_CANARY_a11ce';

export interface Lab {
  readonly url: string;
  readonly admin: string;
  readonly port: number;
  readonly u: Upstream;
  readonly e: Upstream;
  readonly tokens: { readonly a: string; readonly b: string };
  readonly serve: ServeProcess;
  readonly dir: string;
  /** Record a caller-visible response (body and headers) for the leak scan. */
  seen(text: string): void;
  /** Every place the canary was found (empty when clean). */
  leakScan(): Promise<string[]>;
  /** The global invariants G0; `allowedAtU` is how many requests U may have received since `mark`. */
  g0(mark?: number, allowedAtU?: number): Promise<void>;
  close(): Promise<void>;
}

export function forms(value: string): string[] {
  return [value, encodeURIComponent(value), JSON.stringify(value).slice(1, -1), Buffer.from(value).toString('base64'), Buffer.from(value).toString('base64url'), Buffer.from(value).toString('hex')];
}

export interface LabOptions {
  /** Handler for U (default: 200 JSON echo of method and url only, never the headers). */
  readonly upstream?: Handler;
  /** Extra route files (name -> YAML) beside the standard `plaid` route. */
  readonly routes?: (u: Upstream, e: Upstream) => Record<string, string>;
  readonly env?: Record<string, string>;
}

export async function startLab(options: LabOptions = {}): Promise<Lab> {
  const u = await startUpstream(options.upstream ?? ((req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ method: req.method, url: req.url }));
  }));
  const e = await startUpstream();
  const dir = await makeTempDir('egress-lab-');
  const plaid = `name: plaid
prefix: /plaid
upstream: ${u.url}
allow_private_addresses: true
credential: plaid
inject:
  scheme: headers
  headers:
    PLAID-CLIENT-ID: "{client_id}"
    PLAID-SECRET: "{secret}"
max_body: 64kb
timeouts: { connect: 2s, response: 3s }
allow:
  - caller: a
    methods: [POST]
    paths: [/transactions/get, /accounts/get]
  - caller: b
    methods: [GET]
    paths: [/institutions/*]
`;
  const { tokens } = await seedDataDir(dir, {
    routes: { plaid, ...(options.routes?.(u, e) ?? {}) },
    credentials: { plaid: { client_id: CLIENT_ID, secret: CANARY } },
    callers: ['a', 'b'],
  });
  const serve = await startServe(envFor(dir, { EGRESS_LOG_LEVEL: 'debug', ...options.env }));
  const port = Number(new URL(serve.url).port);
  const responses: string[] = [];
  const lab: Lab = {
    url: serve.url,
    admin: serve.admin,
    port,
    u,
    e,
    tokens: { a: tokens.a!, b: tokens.b! },
    serve,
    dir,
    seen: (text) => void responses.push(text),
    async leakScan() {
      // Audit lines reach the file in batches, at most 10 ms after the request: scan what the last one wrote too.
      await new Promise((r) => setTimeout(r, 30));
      const places: [string, string][] = [
        ['operational log', serve.output()],
        ['audit log', await readFile(join(dir, 'audit.log'), 'utf8').catch(() => '')],
        ['responses', responses.join('\n')],
        ['metrics', await fetch(`${serve.admin}/metrics`).then((r) => r.text()).catch(() => '')],
        ['evil origin', e.requests.map((r) => JSON.stringify(r.headers) + r.url + r.body.toString('latin1')).join('\n')],
      ];
      const found: string[] = [];
      for (const [where, text] of places) for (const f of [...forms(CANARY), ...forms(CLIENT_ID)]) if (text.includes(f)) found.push(`${where}: ${f}`);
      return found;
    },
    async g0(mark, allowedAtU) {
      expect((await fetch(`${serve.admin}/healthz`)).status, 'process alive').toBe(200);
      expect(serve.child.exitCode, 'process alive').toBeNull();
      expect(await lab.leakScan(), 'no canary anywhere').toEqual([]);
      if (mark !== undefined && allowedAtU !== undefined) expect(u.requests.length - mark, 'requests that reached U').toBeLessThanOrEqual(allowedAtU);
      const status = await readFile(`/proc/${serve.child.pid}/status`, 'utf8');
      const rssKb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
      expect(rssKb, 'RSS bounded').toBeLessThan(512 * 1024);
    },
    async close() {
      await serve.stop('SIGTERM');
      await u.close();
      await e.close();
    },
  };
  return lab;
}

/** Raw bytes to the proxy's plain listener; everything it answered until it closed or went quiet. */
export { rawRequest, statuses } from '../helpers/raw.ts';

/** Standard headers for caller a's POST. */
export function asA(lab: Lab, extra: Record<string, string> = {}): Record<string, string> {
  return { 'x-egress-token': lab.tokens.a, 'content-type': 'application/json', ...extra };
}
