import { readFile, writeFile, readdir } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, makeTempDir } from '../helpers/proxy.ts';
import { rawRequest } from '../helpers/raw.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * A whole session through the real CLI and the real `egress serve` process: set-up, good traffic,
 * every kind of refusal and failure, an upstream that echoes the key, an OAuth2 credential rotated
 * to a secret its token endpoint refuses (and quotes back), a store that cannot be read for a
 * while, the status page, alerts to a webhook, a rejected reload, a shutdown. Afterwards every
 * log line, audit line, response, metric, webhook body and CLI output is searched for each secret
 * in each form it could take.
 */
const SECRET = 'sk_test_CANARY_7f3a9c';
const CLIENT = 'client_CANARY_0b1d';
const BANK_SECRET = 'cs_CANARY_bank_v1_5e21';
const BANK_SECRET_NEW = 'cs_CANARY_bank_v2_90af';
const ACCESS_TOKEN = 'at_CANARY_minted_77c4';
const ALL = [SECRET, CLIENT, BANK_SECRET, BANK_SECRET_NEW, ACCESS_TOKEN];

function forms(value: string): string[] {
  return [value, encodeURIComponent(value), JSON.stringify(value).slice(1, -1), Buffer.from(value).toString('base64'), Buffer.from(value).toString('base64url'), Buffer.from(value).toString('hex')];
}

let upstream: Upstream;
let serve: ServeProcess;
let dir: string;
let receiver: Server;
const seen: string[] = [];
const hooks: string[] = [];

beforeAll(async () => {
  upstream = await startUpstream((req, res, body) => {
    const key = String(req.headers['plaid-secret']);
    if (req.url === '/connect/token') {
      // The token endpoint knows only the first client secret, and quotes what it was sent.
      const ok = body.toString().includes(encodeURIComponent(BANK_SECRET)) || String(req.headers.authorization).includes(Buffer.from(`bank-client:${BANK_SECRET}`).toString('base64'));
      res.writeHead(ok ? 200 : 401, { 'content-type': 'application/json', ...(ok ? {} : { 'x-debug': `got ${req.headers.authorization}` }) });
      res.end(JSON.stringify(ok ? { access_token: ACCESS_TOKEN, token_type: 'Bearer', expires_in: 3600 } : { error: 'invalid_client', error_description: `bad client ${req.headers.authorization} ${body}` }));
    } else if (req.url === '/accounts') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"accounts":[]}');
    } else if (req.url === '/echo') {
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
  receiver = createServer((req, res) => {
    let text = '';
    req.on('data', (d: Buffer) => (text += d.toString()));
    req.on('end', () => {
      hooks.push(text);
      res.writeHead(204);
      res.end();
    });
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
  dir = await makeTempDir('egress-leak-');
  await writeFile(join(dir, 'webhook.secret'), 'whsec_leak_0123456789abcdef', { mode: 0o600 });
  const env = envFor(dir, { EGRESS_LOG_LEVEL: 'trace', EGRESS_ALERT_WEBHOOK: `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hook`, EGRESS_ALERT_WEBHOOK_SECRET_FILE: join(dir, 'webhook.secret') });
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
  await writeFile(join(dir, 'routes', 'bank.yaml'), `name: bank
prefix: /bank
upstream: ${upstream.url}
allow_private_addresses: true
credential: bank
inject:
  scheme: oauth2_client_credentials
  token_url: ${upstream.url}/connect/token
allow:
  - caller: sync-worker
    methods: [GET]
    paths: [/accounts]
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
  expect((await cli(['keys', 'put', 'bank', '--from-stdin'], JSON.stringify({ client_id: 'bank-client', client_secret: BANK_SECRET }))).code).toBe(0);
  const token = (JSON.parse((await cli(['callers', 'add', 'sync-worker', '--json'])).stdout) as { token: string }).token;
  const admin = (JSON.parse((await cli(['admin-token', 'create', 'ops', '--json'])).stdout) as { token: string }).token;
  serve = await startServe(env);
  const page = async () => {
    const res = await fetch(`${serve.admin}/`, { headers: { authorization: `Bearer ${admin}` } });
    seen.push(await res.text());
    return res.status;
  };

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
  expect(await call('/bank/accounts', { method: 'GET' })).toBe(200);
  // Rotated to a secret the token endpoint refuses: the mint falls back to version 1 (the token
  // endpoint's refusal quotes the secret it was sent), and later requests carry that token.
  expect((await cli(['keys', 'rotate', 'bank', '--from-stdin', '--grace', '1h'], JSON.stringify({ client_id: 'bank-client', client_secret: BANK_SECRET_NEW }))).code).toBe(0);
  await new Promise((r) => setTimeout(r, 1000));
  for (let i = 0; i < 2; i++) expect(await call('/bank/accounts', { method: 'GET' })).toBe(200);
  expect(await page()).toBe(200);
  // The store cannot be read for a while: cached records serve, and the page and /readyz say why.
  const store = await readFile(join(dir, 'store.json'), 'utf8');
  await writeFile(join(dir, 'store.json'), store.slice(0, store.length / 2));
  await new Promise((r) => setTimeout(r, 1500));
  expect(await call('/plaid/accounts/get', { body: '{}' })).toBe(200);
  expect(await page()).toBe(200);
  seen.push(await (await fetch(`${serve.admin}/readyz`)).text());
  await writeFile(join(dir, 'store.json'), store);
  await new Promise((r) => setTimeout(r, 1500));
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
  await new Promise<void>((r) => (receiver ? receiver.close(() => r()) : r()));
});

describe('no secret anywhere', () => {
  it('the upstream did get the credential (the session was real)', () => {
    expect(upstream.requests.filter((r) => r.headers['plaid-secret'] === SECRET)).toHaveLength(4);
    expect(upstream.requests.filter((r) => r.url === '/accounts' && r.headers.authorization === `Bearer ${ACCESS_TOKEN}`)).toHaveLength(3);
    expect(upstream.requests.filter((r) => r.url === '/connect/token').length).toBeGreaterThanOrEqual(3);
    expect(hooks.join('\n')).toContain('store_unreachable');
  });

  it('not in the operational log (stdout and stderr of serve, at trace level)', () => {
    const out = serve.output();
    expect(out).toContain('egress-proxy listening');
    for (const f of ALL.flatMap(forms)) expect(out).not.toContain(f);
  });

  it('not in the audit log, which has a line for every request', async () => {
    const audit = await readFile(join(dir, 'audit.log'), 'utf8');
    expect(audit.trim().split('\n').length).toBeGreaterThanOrEqual(9);
    for (const f of ALL.flatMap(forms)) expect(audit).not.toContain(f);
  });

  it('not in any response, metric, readiness detail, status page, webhook body or CLI output', () => {
    const all = [...seen, ...hooks].join('\n');
    expect(all).toContain('[REDACTED]');
    expect(all).toContain('egress-proxy status');
    for (const f of ALL.flatMap(forms)) expect(all).not.toContain(f);
  });

  it('not in plaintext in any file the proxy wrote', async () => {
    for (const name of await readdir(dir)) {
      if (name === 'cred.json' || name === 'routes') continue;
      const text = await readFile(join(dir, name), 'utf8');
      for (const f of ALL.flatMap(forms)) expect(text, name).not.toContain(f);
    }
  });
});
