import { readFile, writeFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KEYS } from '../../src/store/redis-store.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { rawRequest, statuses } from '../helpers/raw.ts';
import { TestRedis } from '../helpers/redis.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * `admin-token create NAME --read-only`: a token for monitoring, which reads the admin API and the
 * status page and can change nothing. Run against both stores: the field is written, read and
 * validated by each.
 */

const SECRET = 'sk_readonly_CANARY_v1_aaaa';
let redis: TestRedis;
let upstream: Upstream;

beforeAll(async () => {
  redis = await TestRedis.create();
  upstream = await startUpstream();
});
afterAll(async () => {
  await upstream?.close();
  await redis?.destroy();
});

interface Answer {
  status: number;
  headers: Headers;
  json: Record<string, unknown>;
}

async function call(proxy: TestProxy, method: string, path: string, token: string, body?: unknown, authorization = `Bearer ${token}`): Promise<Answer> {
  const res = await fetch(`${proxy.admin}${path}`, {
    method,
    headers: { authorization, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  let json: Record<string, unknown> = {};
  try {
    json = JSON.parse(text) as Record<string, unknown>;
  } catch {
    // The status page is HTML; a HEAD has no body.
  }
  return { status: res.status, headers: res.headers, json };
}

/** Every change the admin API makes, each with a body it would accept from a full token. */
const WRITES: readonly [string, string, unknown?][] = [
  ['POST', '/v1/credentials', { id: 'fresh', fields: { token: 'sk_fresh_CANARY_1234' } }],
  ['POST', '/v1/credentials/key/versions', { fields: { token: 'sk_v2_CANARY_5678' } }],
  ['POST', '/v1/credentials/key/versions', { fields: { token: 'sk_v2_CANARY_5678' }, stage: true }],
  ['POST', '/v1/credentials/key/promote', { grace: '0' }],
  ['POST', '/v1/credentials/key/rollback', {}],
  ['POST', '/v1/credentials/key/revoke', {}],
  ['POST', '/v1/credentials/key/revoke', { version: 1 }],
  ['POST', '/v1/callers', { name: 'intruder' }],
  ['POST', '/v1/callers/svc/rotate', { grace: '0' }],
  ['POST', '/v1/callers/svc/revoke', {}],
  // Methods no endpoint serves, and a path that names nothing: refused for what the token is first.
  ['DELETE', '/v1/credentials/key'],
  ['PUT', '/v1/credentials/key', { fields: { token: 'x' } }],
  ['PATCH', '/v1/callers/svc'],
  ['POST', '/v1/nothing', {}],
];

describe.each(['file', 'redis'] as const)('read-only admin tokens (%s store)', (kind) => {
  let proxy: TestProxy;
  let env: Record<string, string>;
  let full: string;
  let monitor: string;
  let storeUrl: string | undefined;

  beforeAll(async () => {
    storeUrl = kind === 'redis' ? `${redis.url}/1` : undefined;
    proxy = await startTestProxy({
      routes: { api: bearerRoute({ upstream: upstream.url, paths: ['/x'], callers: ['svc'] }) },
      credentials: { key: { token: SECRET } },
      callers: ['svc'],
      ...(storeUrl ? { store: storeUrl } : {}),
    });
    env = envFor(proxy.dir, storeUrl ? { EGRESS_STORE: storeUrl } : {});
    const made = await runCli(['admin-token', 'create', 'rotator', '--json'], env);
    expect(made.code, made.stderr).toBe(0);
    full = (JSON.parse(made.stdout) as { token: string }).token;
    const ro = await runCli(['admin-token', 'create', 'monitor', '--read-only', '--json'], env);
    expect(ro.code, ro.stderr + ro.stdout).toBe(0);
    expect(JSON.parse(ro.stdout)).toMatchObject({ name: 'monitor', read_only: true, token: expect.stringMatching(/^ega_/) });
    monitor = (JSON.parse(ro.stdout) as { token: string }).token;
    await eventually(async () => (await call(proxy, 'GET', '/v1/credentials', monitor)).status === 200 && (await call(proxy, 'GET', '/v1/credentials', full)).status === 200, 3_000, 'both admin tokens to load');
  });
  afterAll(async () => {
    await proxy?.close();
  });

  /** What the store holds, as the CLI reads it: credentials with their versions and states, and callers. */
  async function storeState(): Promise<string> {
    const keys = await runCli(['keys', 'list', '--json'], env);
    const callers = await runCli(['callers', 'list', '--json'], env);
    const shown = await runCli(['keys', 'show', 'key', '--json'], env);
    expect(keys.code).toBe(0);
    expect(callers.code).toBe(0);
    return JSON.stringify([JSON.parse(keys.stdout), JSON.parse(callers.stdout), JSON.parse(shown.stdout)]);
  }

  it('reads: credentials, one credential, ?due, callers, the audit head and the status page (Bearer and Basic), GET and HEAD, each audited as a read of the token', async () => {
    for (const path of ['/v1/credentials', '/v1/credentials/key', '/v1/credentials?due', '/v1/credentials?due=0', '/v1/callers', '/v1/audit/head']) {
      expect((await call(proxy, 'GET', path, monitor)).status, `GET ${path}`).toBe(200);
      expect((await call(proxy, 'HEAD', path, monitor)).status, `HEAD ${path}`).toBe(200);
    }
    const due = await call(proxy, 'GET', '/v1/credentials?due=0', monitor);
    expect((due.json.due as { id: string }[]).map((d) => d.id)).toEqual(['key']);
    const page = await call(proxy, 'GET', '/', monitor);
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toMatch(/^text\/html/);
    const basic = await call(proxy, 'GET', '/', monitor, undefined, `Basic ${Buffer.from(`ops:${monitor}`).toString('base64')}`);
    expect(basic.status).toBe(200);
    await eventually(async () => /"actor":"admin:monitor","action":"GET \/","target":"status-page","decision":"allow","reason":"read"/.test(await proxy.auditText()), 2_000, 'the status page read audited');
    expect(await proxy.auditText()).toMatch(/"actor":"admin:monitor","action":"GET \/v1\/audit\/:id","target":"audit:head","decision":"allow","reason":"read"/);
    // Its creation is audited with what kind of token it is; the full one's as any change is.
    expect(await proxy.auditText()).toMatch(/"action":"admin\.add","target":"admin:monitor","decision":"allow","reason":"read-only"/);
    expect(await proxy.auditText()).toMatch(/"action":"admin\.add","target":"admin:rotator","decision":"allow","reason":"changed"/);
  });

  it('a change sent with Expect: 100-continue is refused without a 100 Continue: the body, which may carry a secret, is never invited', async () => {
    const body = JSON.stringify({ fields: { token: 'sk_expect_CANARY_9999' } });
    const head = `POST /v1/credentials/key/versions HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer ${monitor}\r\nExpect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`;
    const answer = await rawRequest(Number(new URL(proxy.admin).port), head);
    expect(statuses(answer)).toEqual([403]);
    expect(answer).toContain('"code":"admin_read_only"');
  });

  it('every change is refused with 403 admin_read_only, audited as a deny with the token\'s name, and nothing in the store changes', async () => {
    const before = await storeState();
    const ids: string[] = [];
    for (const [method, path, body] of WRITES) {
      const answer = await call(proxy, method, path, monitor, body);
      ids.push(answer.headers.get('x-request-id')!);
      expect(answer.status, `${method} ${path}`).toBe(403);
      expect(answer.json, `${method} ${path}`).toMatchObject({ error: { code: 'admin_read_only', message: expect.stringContaining('read-only'), request_id: answer.headers.get('x-request-id') } });
    }
    // Nothing reached the store: give a change that slipped through time to land, then compare.
    await new Promise((r) => setTimeout(r, 300));
    expect(await storeState()).toBe(before);
    expect((await call(proxy, 'GET', '/v1/callers', monitor)).json).toEqual({ callers: [expect.objectContaining({ name: 'svc', tokens: 1, revoked_at: null })] });
    // The caller still works, with the key it had.
    const proxied = await fetch(`${proxy.url}/api/x`, { headers: { 'x-egress-token': proxy.tokens.svc! } });
    expect(proxied.status).toBe(200);
    expect(upstream.requests.at(-1)?.headers.authorization).toBe(`Bearer ${SECRET}`);
    await eventually(async () => (await proxy.auditText()).includes('"action":"PATCH /v1/callers/:id"'), 2_000, 'the last refusal audited');
    const lines = (await proxy.auditText()).split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    const denied = ids.map((id) => lines.find((l) => l.request_id === id));
    for (const [i, line] of denied.entries()) expect(line, `${WRITES[i]![0]} ${WRITES[i]![1]}`).toMatchObject({ kind: 'admin', actor: 'admin:monitor', decision: 'deny', reason: 'admin_read_only' });
    expect(denied.map((l) => l?.action)).toContain('POST /v1/credentials/:id/revoke');
    // No change was made by anyone with this token.
    expect(lines.filter((l) => l.actor === 'admin:monitor' && l.decision === 'allow').every((l) => l.reason === 'read')).toBe(true);
  });

  it('a full token still changes things, and records without the field (as full tokens are written) are full tokens', async () => {
    const added = await call(proxy, 'POST', '/v1/callers', full, { name: 'late' });
    expect(added.status).toBe(201);
    await eventually(async () => /"actor":"admin:rotator","action":"caller\.add"/.test(await proxy.auditText()), 2_000, 'the change audited');
    // The full token's stored record carries no read_only at all: what stores written before the field hold.
    const stored = await storedAdmin('rotator');
    expect(stored).not.toHaveProperty('read_only');
    expect(await storedAdmin('monitor')).toMatchObject({ read_only: true });
  });

  it('admin-token list shows each token\'s access; rotate keeps it read-only, and the new token reads and is refused changes', async () => {
    const listed = await runCli(['admin-token', 'list', '--json'], env);
    expect(listed.code).toBe(0);
    const tokens = (JSON.parse(listed.stdout) as { admin_tokens: { name: string; read_only: boolean }[] }).admin_tokens;
    expect(tokens.find((t) => t.name === 'monitor')).toMatchObject({ read_only: true });
    expect(tokens.find((t) => t.name === 'rotator')).toMatchObject({ read_only: false });
    const text = await runCli(['admin-token', 'list'], env);
    expect(text.stdout).toMatch(/^NAME\s.*ACCESS/m);
    expect(text.stdout).toMatch(/^monitor\s.*read-only/m);
    expect(text.stdout).toMatch(/^rotator\s.*full/m);

    const rotated = await runCli(['admin-token', 'rotate', 'monitor', '--grace', '0', '--json'], env);
    expect(rotated.code, rotated.stderr).toBe(0);
    expect(JSON.parse(rotated.stdout)).toMatchObject({ name: 'monitor', read_only: true });
    const fresh = (JSON.parse(rotated.stdout) as { token: string }).token;
    await eventually(async () => (await call(proxy, 'GET', '/v1/credentials', fresh)).status === 200, 3_000, 'the rotated token to load');
    expect((await call(proxy, 'GET', '/v1/credentials', monitor)).status, 'the old token stopped').toBe(401);
    const refused = await call(proxy, 'POST', '/v1/credentials/key/revoke', fresh, {});
    expect(refused.status).toBe(403);
    expect(refused.json).toMatchObject({ error: { code: 'admin_read_only' } });
    expect(await storedAdmin('monitor')).toMatchObject({ read_only: true });
  });

  it('the flag belongs to admin-token create only: elsewhere it is a usage error', async () => {
    for (const args of [['callers', 'add', 'nope', '--read-only'], ['admin-token', 'rotate', 'monitor', '--read-only'], ['admin-token', 'list', '--read-only']]) {
      const result = await runCli(args, env);
      expect(result.code, args.join(' ')).toBe(2);
      expect(result.stderr, args.join(' ')).toContain('--read-only');
    }
  });

  it('a record whose read_only is not true or false is damaged: it fails closed (its token opens nothing), and is named as such', async () => {
    const made = await runCli(['admin-token', 'create', 'odd', '--read-only', '--json'], env);
    const odd = (JSON.parse(made.stdout) as { token: string }).token;
    await eventually(async () => (await call(proxy, 'GET', '/v1/credentials', odd)).status === 200, 3_000, 'the token to load');
    await editAdmin('odd', (record) => ({ ...record, read_only: 'no' }));
    await eventually(async () => (await call(proxy, 'GET', '/v1/credentials', odd)).status === 401, 3_000, 'the damaged record to fail closed');
    expect((await call(proxy, 'POST', '/v1/callers', odd, { name: 'sneaky' })).status).toBe(401);
    expect(proxy.logs()).toMatch(/"record":"admin:odd".*store record is damaged/);
    const listed = await runCli(['admin-token', 'list', '--json'], env);
    expect(JSON.parse(listed.stdout)).toMatchObject({ damaged: ['odd'] });
    expect((await runCli(['admin-token', 'list'], env)).stdout).toContain('damaged records (fail closed): odd');
    // The other tokens keep working.
    expect((await call(proxy, 'GET', '/v1/credentials', full)).status).toBe(200);
  });

  async function storedAdmin(name: string): Promise<Record<string, unknown>> {
    if (!storeUrl) return (JSON.parse(await readFile(proxy.storePath, 'utf8')) as { admins: Record<string, Record<string, unknown>> }).admins[name]!;
    const client = redis.client({ db: 1 });
    try {
      return JSON.parse((await client.get(KEYS.record('admin', name)))!) as Record<string, unknown>;
    } finally {
      client.disconnect();
    }
  }

  /** Rewrite a stored admin record behind the store's back (a hand edit, or another writer's bug). */
  async function editAdmin(name: string, edit: (record: Record<string, unknown>) => Record<string, unknown>): Promise<void> {
    if (!storeUrl) {
      const doc = JSON.parse(await readFile(proxy.storePath, 'utf8')) as { admins: Record<string, Record<string, unknown>> };
      doc.admins[name] = edit(doc.admins[name]!);
      await writeFile(proxy.storePath, JSON.stringify(doc));
      return;
    }
    const client = redis.client({ db: 1 });
    try {
      const key = KEYS.record('admin', name);
      await client.set(key, JSON.stringify(edit(JSON.parse((await client.get(key))!) as Record<string, unknown>)));
      // Writers announce changes; a hand edit does too, so the instances read it now.
      await client.incr(KEYS.version);
      await client.publish(KEYS.channel, 'changed');
    } finally {
      client.disconnect();
    }
  }
});
