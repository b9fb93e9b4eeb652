import { readFile, writeFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, makeTempDir } from '../helpers/proxy.ts';
import { rawRequest } from '../helpers/raw.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * A whole session through the real CLI and the real `egress serve` process: set-up, good traffic,
 * every kind of refusal and failure, an upstream that echoes the key, a rejected reload, a
 * shutdown. Afterwards every log line, audit line, response, metric and CLI output is searched
 * for the secret in each form it could take.
 */
const SECRET = 'sk_test_CANARY_7f3a9c';
const CLIENT = 'client_CANARY_0b1d';

function forms(value: string): string[] {
  return [value, encodeURIComponent(value), JSON.stringify(value).slice(1, -1), Buffer.from(value).toString('base64'), Buffer.from(value).toString('base64url'), Buffer.from(value).toString('hex')];
}

let upstream: Upstream;
let serve: ServeProcess;
let dir: string;
const seen: string[] = [];

beforeAll(async () => {
  upstream = await startUpstream((req, res) => {
    const key = String(req.headers['plaid-secret']);
    if (req.url === '/echo') {
      res.writeHead(400, { 'content-type': 'application/json', 'x-debug': `got ${key}` });
      res.end(JSON.stringify({ error_code: 'INVALID_API_KEYS', echoed: key, b64: Buffer.from(key).toString('base64') }));
    } else if (req.url === '/gz') {
      res.writeHead(500, { 'content-encoding': 'gzip' });
      res.end(gzipSync(`boom ${key}`));
    } else {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"accounts":[]}');
    }
  });
  dir = await makeTempDir('egress-leak-');
  const env = envFor(dir, { EGRESS_LOG_LEVEL: 'trace' });
  await (await import('node:fs/promises')).mkdir(join(dir, 'routes'));
  await writeFile(join(dir, 'routes', 'plaid.yaml'), `name: plaid
prefix: /plaid
upstream: ${upstream.url}
allow_private_addresses: true
credential: plaid-sandbox
inject:
  scheme: headers
  headers:
    PLAID-CLIENT-ID: "{client_id}"
    PLAID-SECRET: "{secret}"
max_body: 1kb
allow:
  - caller: sync-worker
    methods: [POST]
    paths: [/accounts/get, /echo, /gz]
`);
  const cli = async (args: string[], input?: string) => {
    const r = await runCli(args, env, input);
    seen.push(r.stdout, r.stderr);
    return r;
  };
  await cli(['master-key', 'init']);
  const credFile = join(dir, 'cred.json');
  await writeFile(credFile, JSON.stringify({ client_id: CLIENT, secret: SECRET }));
  expect((await cli(['keys', 'put', 'plaid-sandbox', '--from-file', credFile])).code).toBe(0);
  const token = (JSON.parse((await cli(['callers', 'add', 'sync-worker', '--json'])).stdout) as { token: string }).token;
  serve = await startServe(env);

  const call = async (path: string, init: RequestInit = {}) => {
    const res = await fetch(`${serve.url}${path}`, { method: 'POST', ...init, headers: { 'x-egress-token': token, ...(init.headers as Record<string, string>) } });
    seen.push(JSON.stringify([...res.headers]), await res.text());
    return res.status;
  };
  expect(await call('/plaid/accounts/get', { body: '{}' })).toBe(200);
  expect(await call('/plaid/echo', { body: '{}' })).toBe(400);
  expect(await call('/plaid/gz', { body: '{}' })).toBe(500);
  expect(await call('/plaid/accounts/get', { method: 'GET' })).toBe(403);
  expect(await call('/plaid/item/remove', { body: '{}' })).toBe(403);
  expect(await call('/nowhere', { body: '{}' })).toBe(404);
  expect(await call('/plaid/accounts/get', { body: 'x'.repeat(5000) })).toBe(413);
  expect(await call('/plaid/accounts/get', { headers: { 'x-egress-token': 'egt_wrong' } })).toBe(401);
  seen.push(await rawRequest(Number(new URL(serve.url).port), `POST /plaid/%2e%2e/x HTTP/1.1\r\nHost: p\r\nX-Egress-Token: ${token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`));
  seen.push(await (await fetch(`${serve.admin}/metrics`)).text());
  seen.push(await (await fetch(`${serve.admin}/readyz`)).text());
  await writeFile(join(dir, 'routes', 'broken.yaml'), `name: broken\nsecret: ${SECRET}\n`);
  serve.child.kill('SIGHUP');
  await new Promise((r) => setTimeout(r, 500));
  for (const args of [['keys', 'list'], ['keys', 'show', 'plaid-sandbox', '--json'], ['master-key', 'status'], ['callers', 'list', '--json'], ['audit', 'verify']]) await cli(args);
  expect(await serve.stop('SIGTERM')).toBe(0);
}, 60_000);

afterAll(async () => {
  await serve?.stop('SIGKILL');
  await upstream?.close();
});

describe('no secret anywhere', () => {
  it('the upstream did get the credential (the session was real)', () => {
    expect(upstream.requests.filter((r) => r.headers['plaid-secret'] === SECRET)).toHaveLength(3);
  });

  it('not in the operational log (stdout and stderr of serve, at trace level)', () => {
    const out = serve.output();
    expect(out).toContain('egress-proxy listening');
    for (const f of [...forms(SECRET), ...forms(CLIENT)]) expect(out).not.toContain(f);
  });

  it('not in the audit log, which has a line for every request', async () => {
    const audit = await readFile(join(dir, 'audit.log'), 'utf8');
    expect(audit.trim().split('\n').length).toBeGreaterThanOrEqual(9);
    for (const f of [...forms(SECRET), ...forms(CLIENT)]) expect(audit).not.toContain(f);
  });

  it('not in any response, metric, readiness detail or CLI output', () => {
    const all = seen.join('\n');
    expect(all).toContain('[REDACTED]');
    for (const f of [...forms(SECRET), ...forms(CLIENT)]) expect(all).not.toContain(f);
  });

  it('not in plaintext in any file the proxy wrote', async () => {
    for (const name of await readdir(dir)) {
      if (name === 'cred.json' || name === 'routes') continue;
      const text = await readFile(join(dir, name), 'utf8');
      for (const f of [...forms(SECRET), ...forms(CLIENT)]) expect(text, name).not.toContain(f);
    }
  });
});
