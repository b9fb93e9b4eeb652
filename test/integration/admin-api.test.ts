import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { lineHash } from '../../src/observe/audit.ts';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { rawRequest, statuses } from '../helpers/raw.ts';

const V1 = 'sk_admin_CANARY_v1_aaaa';
const V2 = 'sk_admin_CANARY_v2_bbbb';
let upstream: Upstream;
let proxy: TestProxy;
let admin: string;
let env: Record<string, string>;

beforeAll(async () => {
  upstream = await startUpstream();
  proxy = await startTestProxy({
    routes: {
      api: bearerRoute({ upstream: upstream.url, paths: ['/x'], callers: ['svc', 'robot'] }),
    },
    credentials: { key: { token: V1 } },
    callers: ['svc'],
  });
  env = envFor(proxy.dir);
  const created = await runCli(['admin-token', 'create', 'rotator', '--json'], env);
  expect(created.code).toBe(0);
  admin = (JSON.parse(created.stdout) as { token: string }).token;
  expect(admin).toMatch(/^ega_[A-Za-z0-9_-]{43}$/);
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

async function api(method: string, path: string, body?: unknown, token: string | null = admin): Promise<{ status: number; json: Record<string, unknown>; text: string }> {
  const res = await fetch(`${proxy.admin}/v1${path}`, {
    method,
    headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(body ? { 'content-type': 'application/json' } : {}) },
    ...(body ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  return { status: res.status, json: JSON.parse(text) as Record<string, unknown>, text };
}

describe('admin API', () => {
  it('refuses requests without a valid admin token, and a caller token is not an admin token', async () => {
    await eventually(async () => (await api('GET', '/credentials')).status === 200, 2_000, 'the admin token to load');
    expect((await api('GET', '/credentials', undefined, null)).status).toBe(401);
    expect((await api('GET', '/credentials', undefined, `ega_${'x'.repeat(43)}`)).status).toBe(401);
    expect((await api('GET', '/credentials', undefined, proxy.tokens.svc!)).status).toBe(401);
    const audit = await proxy.auditText();
    expect(audit).toMatch(/"kind":"admin".*"decision":"deny","reason":"admin_unauthenticated"/);
  });

  it('an unauthenticated request with a long path is audited with its action and target bounded', async () => {
    const long = 'A'.repeat(6_000);
    expect((await api('GET', `/${long}/x/${long}`, undefined, null)).status).toBe(401);
    await eventually(async () => (await proxy.auditText()).includes('"kind":"admin"') && (await proxy.auditText()).includes('AAAAAAAA'), 2_000, 'the audit line');
    const line = (await proxy.auditText()).split('\n').find((l) => l.includes('AAAAAAAA'))!;
    expect(line.length, 'audit line length').toBeLessThan(1_024);
  });

  it('GET /v1/credentials?due is keys due: the credentials whose current version is older than the age asked for (90 days by default), as keys due --json gives them', async () => {
    await eventually(async () => (await api('GET', '/credentials')).status === 200, 2_000, 'the admin token to load');
    const cli = async (maxAge: string) => JSON.parse((await runCli(['keys', 'due', '--max-age', maxAge, '--json'], env)).stdout) as unknown;
    // Nothing is 90 days old; everything is older than 0 seconds.
    const none = await api('GET', '/credentials?due');
    expect(none.status).toBe(200);
    expect(none.json).toEqual({ max_age_days: 90, due: [] });
    expect(none.json).toEqual(await cli('90d'));
    const all = await api('GET', '/credentials?due=0');
    expect(all.json).toEqual(await cli('0'));
    expect((all.json.due as { id: string }[]).map((d) => d.id)).toContain('key');
    expect((await api('GET', '/credentials?due=soon')).status).toBe(400);
    expect((await api('GET', '/credentials?due=1d&due=2d')).status).toBe(400);
    expect((await api('GET', '/credentials?dew=30d')).status, 'a misspelt parameter is not ignored').toBe(400);
  });

  it('stages, promotes, rolls back and revokes a credential; values go in, never come out', async () => {
    const staged = await api('POST', '/credentials/key/versions', { fields: { token: V2 }, stage: true });
    expect(staged.status).toBe(201);
    expect((staged.json.versions as { state: string }[]).map((v) => v.state)).toEqual(['current', 'pending']);
    const promoted = await api('POST', '/credentials/key/promote', { grace: '1h' });
    expect(promoted.status).toBe(200);
    expect((promoted.json.versions as { state: string }[]).map((v) => v.state)).toEqual(['previous', 'current']);
    await eventually(async () => {
      await fetch(`${proxy.url}/api/x`, { headers: { 'x-egress-token': proxy.tokens.svc! } });
      return upstream.requests.at(-1)?.headers.authorization === `Bearer ${V2}`;
    }, 1_000, 'the proxy to send version 2');

    const rolled = await api('POST', '/credentials/key/rollback', {});
    expect((rolled.json.versions as { state: string }[]).map((v) => v.state)).toEqual(['current', 'pending']);
    const revoked = await api('POST', '/credentials/key/revoke', { version: 2 });
    expect((revoked.json.versions as { state: string }[]).map((v) => v.state)).toEqual(['current', 'revoked']);
    const shown = await api('GET', '/credentials/key');
    expect(shown.status).toBe(200);
    for (const r of [staged, promoted, rolled, revoked, shown, await api('GET', '/credentials')]) {
      expect(r.text).not.toContain(V1);
      expect(r.text).not.toContain(V2);
    }
    await eventually(async () => /"actor":"admin:rotator","action":"credential\.revoke"/.test(await proxy.auditText()), 2_000, 'the audit line');
    const audit = await proxy.auditText();
    for (const action of ['stage', 'promote', 'rollback', 'revoke']) expect(audit).toContain(`"actor":"admin:rotator","action":"credential.${action}"`);
    expect(audit).not.toContain(V2);
  });

  it('answers bad input and conflicts clearly', async () => {
    expect((await api('POST', '/credentials/key/versions', { fields: { token: 42 } })).status).toBe(400);
    expect((await api('POST', '/credentials/key/promote', {})).json).toMatchObject({ error: { code: 'invalid_state' } });
    expect((await api('POST', '/credentials/nope/promote', {})).status).toBe(404);
    expect((await api('POST', '/credentials/key/promote', { grace: 'soon' })).status).toBe(400);
    expect((await api('DELETE', '/credentials/key')).status).toBe(405);
    expect((await api('GET', '/nothing')).status).toBe(404);
    expect((await api('GET', '/credentials/%E0%A4%A')).status).toBe(404);
    // Two concurrent stages of the same credential: one wins, the other is a conflict (or finds the pending one).
    const [a, b] = await Promise.all([
      api('POST', '/credentials/key/versions', { fields: { token: 'tok_race_one_1234' }, stage: true }),
      api('POST', '/credentials/key/versions', { fields: { token: 'tok_race_two_5678' }, stage: true }),
    ]);
    expect([a.status, b.status].sort()).toEqual([201, expect.any(Number)].sort());
    expect([a.status, b.status].filter((s) => s === 201)).toHaveLength(1);
    expect([409]).toContain([a.status, b.status].find((s) => s !== 201));
  });

  it('adds, rotates and revokes callers', async () => {
    const added = await api('POST', '/callers', { name: 'robot' });
    expect(added.status).toBe(201);
    const token = added.json.token as string;
    const call = (t: string) => fetch(`${proxy.url}/api/x`, { headers: { 'x-egress-token': t } }).then((r) => r.status);
    await eventually(async () => (await call(token)) === 200, 1_000, 'the new caller');
    const rotated = await api('POST', '/callers/robot/rotate', { grace: '0' });
    const fresh = rotated.json.token as string;
    await eventually(async () => (await call(token)) === 401 && (await call(fresh)) === 200, 1_000, 'the rotation');
    expect((await api('POST', '/callers/robot/revoke', {})).status).toBe(200);
    await eventually(async () => (await call(fresh)) === 401, 1_000, 'the revocation');
    const list = await api('GET', '/callers');
    expect(list.text).not.toContain(token.slice(4));
  });

  it('GET /v1/callers counts only tokens that still work, as `callers list` does: one whose rotation grace has ended is not one', async () => {
    expect((await api('POST', '/callers', { name: 'lister' })).status).toBe(201);
    expect((await api('POST', '/callers/lister/rotate', { grace: '1s' })).status).toBe(200);
    const viaApi = async () => ((await api('GET', '/callers')).json.callers as { name: string; tokens: number }[]).find((c) => c.name === 'lister')!.tokens;
    const viaCli = async () => (JSON.parse((await runCli(['callers', 'list', '--json'], envFor(proxy.dir))).stdout) as { callers: { name: string; tokens: number }[] }).callers.find((c) => c.name === 'lister')!.tokens;
    expect(await viaApi()).toBe(2);
    await new Promise((r) => setTimeout(r, 1_200));
    expect(await viaCli()).toBe(1);
    expect(await viaApi()).toBe(1);
  });

  it('refuses a body with a key it does not know or a value of the wrong type, and changes nothing', async () => {
    // A typo must not fall back to the default: {"Version": 2} revoked the current key at once,
    // {"stage": "true"} put the new key live instead of staging it, {"grce": "1h"} gave 24 h.
    expect((await api('POST', '/credentials', { id: 'strict', fields: { token: 'tok_strict_1111' } })).status).toBe(201);
    const states = async () => ((await api('GET', '/credentials/strict')).json.versions as { state: string }[]).map((v) => v.state);
    const refused = [
      await api('POST', '/credentials/strict/revoke', { Version: 2 }),
      await api('POST', '/credentials/strict/versions', { fields: { token: 'tok_strict_2222' }, stage: 'true' }),
      await api('POST', '/credentials/strict/versions', { fields: { token: 'tok_strict_3333' }, stag: true }),
      await api('POST', '/credentials/strict/rollback', { version: 1 }),
      await api('POST', '/credentials', { id: 'strict2', fields: { token: 'tok_strict_4444' }, stage: true }),
      await api('POST', '/callers', { name: 'strict-caller', grace: '1h' }),
      await api('POST', '/callers/svc/revoke', { grace: '1h' }),
      // A grace given with a stage was dropped: it belongs to promote, as `keys rotate --stage --grace` says.
      await api('POST', '/credentials/strict/versions', { fields: { token: 'tok_strict_5555' }, stage: true, grace: '1h' }),
    ];
    for (const r of refused) {
      expect(r.status, r.text).toBe(400);
      expect(r.text).not.toMatch(/tok_strict/);
    }
    expect(refused[0]!.json).toMatchObject({ error: { code: 'bad_request', message: expect.stringContaining('"Version"') } });
    expect(refused[1]!.json).toMatchObject({ error: { message: expect.stringContaining('stage') } });
    expect(refused[7]!.json).toMatchObject({ error: { message: expect.stringContaining('promote') } });
    expect(await states()).toEqual(['current']);
    expect((await api('GET', '/credentials/strict2')).status).toBe(404);
    expect((await api('GET', '/callers')).text).not.toContain('strict-caller');
    const svc = (await api('GET', '/callers')).json.callers as { name: string; revoked_at: string | null }[];
    expect(svc.find((c) => c.name === 'svc')?.revoked_at).toBeNull();
  });

  it('refuses a change whose options are in the query string, and changes nothing: ?version=1 must not revoke the current version, ?grace=0 must not leave 24 h', async () => {
    expect((await api('POST', '/credentials', { id: 'queried', fields: { token: 'tok_queried_1111' } })).status).toBe(201);
    expect((await api('POST', '/credentials/queried/versions', { fields: { token: 'tok_queried_2222' }, grace: '1h' })).status).toBe(201);
    expect((await api('POST', '/callers', { name: 'queried-caller' })).status).toBe(201);
    const states = async () => ((await api('GET', '/credentials/queried')).json.versions as { state: string }[]).map((v) => v.state);
    const refused = [
      await api('POST', '/credentials/queried/revoke?version=1', {}),
      await api('POST', '/credentials/queried/revoke?version=1'),
      await api('POST', '/credentials/queried/promote?grace=0', {}),
      await api('POST', '/callers/queried-caller/rotate?grace=0', {}),
      await api('POST', '/credentials?id=queried2', { id: 'queried3', fields: { token: 'tok_queried_3333' } }),
    ];
    for (const r of refused) {
      expect(r.status, r.text).toBe(400);
      expect(r.json).toMatchObject({ error: { code: 'bad_request', message: expect.stringContaining('query') } });
    }
    expect(await states()).toEqual(['previous', 'current']);
    expect((await api('GET', '/credentials/queried3')).status).toBe(404);
    const caller = ((await api('GET', '/callers')).json.callers as { name: string; tokens: number }[]).find((c) => c.name === 'queried-caller');
    expect(caller?.tokens).toBe(1);
  });

  it('refuses "grace": null (a script\'s unset variable) instead of taking it for the 24 h default, and changes nothing', async () => {
    expect((await api('POST', '/credentials', { id: 'nullgrace', fields: { token: 'tok_nullgrace_1111' } })).status).toBe(201);
    expect((await api('POST', '/credentials/nullgrace/versions', { fields: { token: 'tok_nullgrace_2222' }, stage: true })).status).toBe(201);
    expect((await api('POST', '/callers', { name: 'nullgrace-caller' })).status).toBe(201);
    const refused = [
      await api('POST', '/credentials/nullgrace/promote', { grace: null }),
      await api('POST', '/credentials/nullgrace/versions', { fields: { token: 'tok_nullgrace_3333' }, grace: null }),
      await api('POST', '/callers/nullgrace-caller/rotate', { grace: null }),
    ];
    for (const r of refused) {
      expect(r.status, r.text).toBe(400);
      expect(r.json).toMatchObject({ error: { code: 'bad_request', message: expect.stringContaining('grace') } });
    }
    expect(((await api('GET', '/credentials/nullgrace')).json.versions as { state: string }[]).map((v) => v.state)).toEqual(['current', 'pending']);
    const caller = ((await api('GET', '/callers')).json.callers as { name: string; tokens: number }[]).find((c) => c.name === 'nullgrace-caller');
    expect(caller?.tokens).toBe(1);
  });

  it('a credential it has just created or rotated is 0 days old, not -1', async () => {
    const created = await api('POST', '/credentials', { id: 'fresh', fields: { token: 'tok_fresh_1234' } });
    expect(created.status).toBe(201);
    const rotated = await api('POST', '/credentials/fresh/versions', { fields: { token: 'tok_fresh_5678' }, grace: '1h' });
    expect(rotated.status).toBe(201);
    for (const answer of [created, rotated]) for (const v of answer.json.versions as { age_days: number }[]) expect(v.age_days).toBe(0);
  });

  it('GET /v1/audit/head: the hash of the last line in the audit file, with the admin token only; the read itself is the next line, chained to it', async () => {
    expect((await api('GET', '/audit/head', undefined, null)).status).toBe(401);
    expect((await api('GET', '/audit/head', undefined, proxy.tokens.svc!)).status).toBe(401);
    expect((await api('POST', '/audit/head', {})).status).toBe(405);
    expect((await api('GET', '/audit/nothing')).status).toBe(404);
    const fileLines = async () => (await proxy.auditText()).split('\n').filter((l) => l !== '');
    let head: Record<string, unknown> = {};
    // Once nothing is waiting to be written, the head is the file's last line.
    await eventually(async () => {
      const answer = await api('GET', '/audit/head');
      expect(answer.status).toBe(200);
      head = answer.json;
      const lines = await fileLines();
      return head.pending === 0 && lines.some((l) => lineHash(l) === head.hash);
    }, 3_000, 'a head that is a line of the file');
    expect(Object.keys(head).sort()).toEqual(['file', 'hash', 'lines_written', 'pending', 'time']);
    expect(head).toMatchObject({ file: `${proxy.dir}/audit.log`, hash: expect.stringMatching(/^[0-9a-f]{64}$/), lines_written: expect.any(Number) });
    expect(Math.abs(Date.parse(head.time as string) - Date.now())).toBeLessThan(10_000);
    await eventually(async () => (await fileLines()).some((l) => l.includes(`"prev":"${head.hash as string}"`)), 2_000, 'the line after the head');
    const lines = await fileLines();
    const next = lines[lines.findIndex((l) => lineHash(l) === head.hash) + 1]!;
    expect(JSON.parse(next)).toMatchObject({ kind: 'admin', actor: 'admin:rotator', action: 'GET /v1/audit/:id', target: 'audit:head', decision: 'allow', reason: 'read' });
  });
});

/** A request to the admin listener; `path` is the whole path (health, metrics and the page as well as /v1/). */
async function adminFetch(method: string, path: string, init: { token?: string | null; type?: string; body?: string | Buffer; headers?: Record<string, string> } = {}): Promise<{ status: number; headers: Headers; text: string }> {
  const token = init.token === undefined ? admin : init.token;
  const res = await fetch(`${proxy.admin}${path}`, {
    method,
    headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(init.type ? { 'content-type': init.type } : {}), ...init.headers },
    ...(init.body !== undefined ? { body: init.body } : {}),
  });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

describe('admin listener: what every answer carries', () => {
  it('every answer (health, metrics, the page, the API, and each of their errors) carries its own X-Request-Id, as proxy answers do; an error body and the audit line carry the same id', async () => {
    const big = JSON.stringify({ name: 'x'.repeat(200_000) });
    const answers = [
      ['healthz', await adminFetch('GET', '/healthz', { token: null }), 200],
      ['HEAD healthz', await adminFetch('HEAD', '/healthz', { token: null }), 200],
      ['readyz', await adminFetch('GET', '/readyz', { token: null }), 200],
      ['metrics', await adminFetch('GET', '/metrics', { token: null }), 200],
      ['unknown path', await adminFetch('GET', '/nothing', { token: null }), 404],
      ['POST healthz', await adminFetch('POST', '/healthz', { token: null }), 405],
      ['page without a token', await adminFetch('GET', '/', { token: null }), 401],
      ['page', await adminFetch('GET', '/'), 200],
      ['API list', await adminFetch('GET', '/v1/callers'), 200],
      ['API without a token', await adminFetch('GET', '/v1/callers', { token: null }), 401],
      ['API unknown path', await adminFetch('GET', '/v1/nothing'), 404],
      ['API wrong method', await adminFetch('DELETE', '/v1/credentials'), 405],
      ['API not JSON', await adminFetch('POST', '/v1/callers', { type: 'text/plain', body: '{}' }), 415],
      ['API body too large', await adminFetch('POST', '/v1/callers', { type: 'application/json', body: big }), 413],
      ['API bad body', await adminFetch('POST', '/v1/callers', { type: 'application/json', body: '[' }), 400],
      ['API conflict', await adminFetch('POST', '/v1/credentials', { type: 'application/json', body: JSON.stringify({ id: 'key', fields: { token: 'tok_conflict_1234' } }) }), 409],
    ] as const;
    const ids = new Set<string>();
    for (const [label, answer, status] of answers) {
      expect(answer.status, label).toBe(status);
      const id = answer.headers.get('x-request-id');
      expect(id, label).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      ids.add(id!);
      // An error's JSON body names the id too, as the proxy's errors do.
      if (status >= 400) expect(JSON.parse(answer.text), label).toMatchObject({ error: { request_id: id } });
    }
    expect(ids.size, 'one id per answer').toBe(answers.length);
    // A refused Expect, answered before anything else.
    const raw = await rawRequest(Number(new URL(proxy.admin).port), 'GET /healthz HTTP/1.1\r\nHost: admin\r\nExpect: something-else\r\n\r\n');
    expect(statuses(raw)).toEqual([417]);
    expect(raw).toMatch(/\r\nx-request-id: [0-9a-f-]{36}\r\n/i);
    // The audit lines the admin listener writes for a refusal and for a read name the answer's id.
    const refused = answers.find(([label]) => label === 'API without a token')![1].headers.get('x-request-id')!;
    const read = answers.find(([label]) => label === 'API list')![1].headers.get('x-request-id')!;
    const page = answers.find(([label]) => label === 'page')![1].headers.get('x-request-id')!;
    await eventually(async () => (await proxy.auditText()).includes(page), 2_000, 'the audit lines with the request ids');
    const lines = (await proxy.auditText()).split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.find((l) => l.request_id === refused)).toMatchObject({ kind: 'admin', action: 'GET /v1/callers', decision: 'deny', reason: 'admin_unauthenticated' });
    expect(lines.find((l) => l.request_id === read)).toMatchObject({ kind: 'admin', action: 'GET /v1/callers', decision: 'allow', reason: 'read' });
    expect(lines.find((l) => l.request_id === page)).toMatchObject({ kind: 'admin', action: 'GET /', decision: 'allow', reason: 'read' });
  });
});

describe('admin listener: 405 and 404', () => {
  it('a 405 carries Allow with the methods that path serves (RFC 9110 §15.5.6), each of them served there; a path that is no resource is 404 whatever the method', async () => {
    const cases: [method: string, path: string, status: number, allow?: string][] = [
      ['POST', '/healthz', 405, 'GET, HEAD'],
      ['DELETE', '/readyz', 405, 'GET, HEAD'],
      ['PUT', '/metrics', 405, 'GET, HEAD'],
      ['POST', '/', 405, 'GET, HEAD'],
      ['DELETE', '/v1/credentials', 405, 'GET, HEAD, POST'],
      ['DELETE', '/v1/credentials/key', 405, 'GET, HEAD'],
      ['GET', '/v1/credentials/key/promote', 405, 'POST'],
      ['PUT', '/v1/credentials/key/revoke', 405, 'POST'],
      ['PUT', '/v1/callers', 405, 'GET, HEAD, POST'],
      ['GET', '/v1/callers/svc/rotate', 405, 'POST'],
      ['GET', '/v1/callers/svc/revoke', 405, 'POST'],
      ['POST', '/v1/audit/head', 405, 'GET, HEAD'],
      // No resource there: a 405 would say one exists with other methods.
      ['POST', '/nothing', 404],
      ['OPTIONS', '/nothing', 404],
      ['POST', '/v1', 404],
      ['GET', '/v1/credentials/key/destroy', 404],
      ['GET', '/v1/callers/svc', 404],
      ['DELETE', '/v1/callers/svc', 404],
      // An empty segment names nothing either (it was read as the collection: GET listed, POST created).
      ['GET', '/v1/credentials//promote', 404],
      ['POST', '/v1/callers//rotate', 404],
      ['GET', '/v1/callers/', 404],
    ];
    for (const [method, path, status, allow] of cases) {
      const answer = await adminFetch(method, path);
      expect(answer.status, `${method} ${path}`).toBe(status);
      expect(answer.headers.get('allow'), `${method} ${path}`).toBe(allow ?? null);
      if (status !== 405) continue;
      // What Allow lists is served: none of those methods is a 405 there (bodies that change nothing).
      for (const listed of allow!.split(', ')) {
        const target = path.replace('/key/', '/nope/').replace('/svc/', '/nope/');
        const tried = await adminFetch(listed, target, listed === 'POST' ? { type: 'application/json', body: '{"unknown_field": 1}' } : {});
        expect(tried.status, `${listed} ${target}`).not.toBe(405);
      }
    }
  });
});

describe('admin listener: HEAD', () => {
  /**
   * The headers of an answer but the two every answer has its own of, and the connection's: fetch
   * sends every HEAD with Connection: close (undici's guard against servers that send a body), which
   * the answer repeats. The pipelined test below keeps a connection open across HEADs.
   */
  const OWN = new Set(['x-request-id', 'date', 'connection', 'keep-alive']);
  const headersOf = (headers: Headers) => Object.fromEntries([...headers].filter(([name]) => !OWN.has(name)));

  it('HEAD is served wherever GET is (RFC 9110 §9.3.2): the status and headers GET answers, Content-Length that of the body GET sends, and no body', async () => {
    await eventually(async () => (await api('GET', '/credentials')).status === 200, 2_000, 'the admin token to load');
    const paths = ['/healthz', '/readyz', '/', '/v1/credentials', '/v1/credentials?due=0', '/v1/credentials/key', '/v1/callers', '/v1/audit/head', '/v1/credentials/nope'];
    for (const path of paths) {
      const token = path === '/healthz' || path === '/readyz' || path === '/metrics' ? null : admin;
      // Some bodies change from one request to the next (the metrics' process figures, the audit
      // head each audited read moves on): HEAD is compared with the GETs on either side of it once
      // those two agree.
      let head = await adminFetch('HEAD', path, { token });
      let get = await adminFetch('GET', path, { token });
      await eventually(async () => {
        const before = await adminFetch('GET', path, { token });
        head = await adminFetch('HEAD', path, { token });
        get = await adminFetch('GET', path, { token });
        return before.headers.get('content-length') === get.headers.get('content-length');
      }, 3_000, `two GET ${path} of one length`);
      expect(get.status, path).toBe(path === '/v1/credentials/nope' ? 404 : 200);
      expect(head.status, path).toBe(get.status);
      expect(headersOf(head.headers), path).toEqual(headersOf(get.headers));
      expect(Number(head.headers.get('content-length')), path).toBe(Buffer.byteLength(get.text));
      expect(head.text, path).toBe('');
    }
    // The metrics' process figures (CPU, memory, event loop lag, handles) change their lines from
    // one request to the next, by some hundreds of bytes in 10 kB: HEAD's length is that of a body
    // of the moment, not GET's to the byte.
    const head = await adminFetch('HEAD', '/metrics', { token: null });
    const get = await adminFetch('GET', '/metrics', { token: null });
    expect(head.status).toBe(200);
    expect({ ...headersOf(head.headers), 'content-length': null }).toEqual({ ...headersOf(get.headers), 'content-length': null });
    expect(Math.abs(Number(head.headers.get('content-length')) - Buffer.byteLength(get.text))).toBeLessThan(Buffer.byteLength(get.text) * 0.05);
    expect(head.text).toBe('');
  });

  it('a HEAD without an admin token is refused as GET is: the same 401 and challenge, no body', async () => {
    for (const path of ['/v1/credentials', '/v1/credentials/key', '/v1/callers', '/v1/audit/head', '/']) {
      const get = await adminFetch('GET', path, { token: null });
      const head = await adminFetch('HEAD', path, { token: null });
      expect(get.status, path).toBe(401);
      expect(head.status, path).toBe(401);
      expect(headersOf(head.headers), path).toEqual(headersOf(get.headers));
      expect(head.text, path).toBe('');
    }
  });

  it('a HEAD writes no body on the connection: a request pipelined behind it is answered', async () => {
    const port = Number(new URL(proxy.admin).port);
    const auth = `Authorization: Bearer ${admin}\r\n`;
    const raw = await rawRequest(port, `HEAD /v1/callers HTTP/1.1\r\nHost: admin\r\n${auth}\r\nHEAD /healthz HTTP/1.1\r\nHost: admin\r\n\r\nGET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n`);
    expect(statuses(raw)).toEqual([200, 200, 200]);
    expect(raw.match(/\{"status":"ok"\}/g)).toHaveLength(1);
  });

  it('a HEAD read with an admin token is audited as a GET is, under its own method; a refused one as a refused GET', async () => {
    const read = (await adminFetch('HEAD', '/v1/callers')).headers.get('x-request-id')!;
    const page = (await adminFetch('HEAD', '/')).headers.get('x-request-id')!;
    const refused = (await adminFetch('HEAD', '/v1/callers', { token: null })).headers.get('x-request-id')!;
    await eventually(async () => {
      const text = await proxy.auditText();
      return [read, page, refused].every((id) => text.includes(id));
    }, 2_000, 'the audit lines of the HEAD requests');
    const lines = (await proxy.auditText()).split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.find((l) => l.request_id === read)).toMatchObject({ kind: 'admin', actor: 'admin:rotator', action: 'HEAD /v1/callers', decision: 'allow', reason: 'read' });
    expect(lines.find((l) => l.request_id === page)).toMatchObject({ kind: 'admin', actor: 'admin:rotator', action: 'HEAD /', decision: 'allow', reason: 'read' });
    expect(lines.find((l) => l.request_id === refused)).toMatchObject({ kind: 'admin', action: 'HEAD /v1/callers', decision: 'deny', reason: 'admin_unauthenticated' });
  });
});

describe('admin API: Content-Type', () => {
  it('the media type is matched whole and case-insensitively, with parameters: application/json in any case is taken; application/jsonfoo, application/json-seq, +json types and a charset other than UTF-8 are 415', async () => {
    const add = (name: string, type: string) => adminFetch('POST', '/v1/callers', { type, body: JSON.stringify({ name }) });
    const taken = [
      ['ct-upper', 'Application/JSON'],
      ['ct-charset', 'application/json; charset=utf-8'],
      ['ct-quoted', 'application/json ;Charset="UTF-8"'],
      ['ct-other-param', 'application/json;foo=bar'],
    ];
    for (const [name, type] of taken) expect((await add(name!, type!)).status, type).toBe(201);
    const refused = [
      ['ct-jsonfoo', 'application/jsonfoo'],
      ['ct-seq', 'application/json-seq'],
      ['ct-patch', 'application/merge-patch+json'],
      ['ct-text', 'text/json'],
      ['ct-latin1', 'application/json; charset=iso-8859-1'],
      ['ct-bad-param', 'application/json; charset'],
      ['ct-none', 'none'],
    ];
    for (const [name, type] of refused) {
      const answer = await add(name!, type!);
      expect(answer.status, type).toBe(415);
      expect(JSON.parse(answer.text), type).toMatchObject({ error: { code: 'unsupported_media_type' } });
    }
    expect(JSON.parse((await add('ct-latin1', 'application/json; charset=iso-8859-1')).text).error.message).toMatch(/charset/i);
    const names = ((await api('GET', '/callers')).json.callers as { name: string }[]).map((c) => c.name);
    for (const [name] of taken) expect(names).toContain(name);
    for (const [name] of refused) expect(names).not.toContain(name);
  });

  it('a body that is not valid UTF-8 is refused (400), not stored with its bytes replaced: a Latin-1 secret would become U+FFFD', async () => {
    const body = Buffer.concat([Buffer.from('{"id":"latin","fields":{"token":"caf'), Buffer.from([0xe9]), Buffer.from('_secret_1234"}}')]);
    const answer = await adminFetch('POST', '/v1/credentials', { type: 'application/json', body });
    expect(answer.status, answer.text).toBe(400);
    expect(JSON.parse(answer.text)).toMatchObject({ error: { code: 'bad_request', message: expect.stringMatching(/UTF-8/) } });
    expect((await api('GET', '/credentials/latin')).status).toBe(404);
  });
});

describe('admin API: 401', () => {
  it('a 401 carries a Bearer challenge (RFC 9110 §15.5.2: WWW-Authenticate is a MUST on a 401), never a Basic one a browser would prompt for and then replay', async () => {
    // No token, an unknown one, a caller's token, and the admin token sent as Basic (which the API does not take).
    const basic = `Basic ${Buffer.from(`x:${admin}`).toString('base64')}`;
    for (const authorization of [undefined, `Bearer ega_${'z'.repeat(43)}`, `Bearer ${proxy.tokens.svc!}`, basic]) {
      const answer = await adminFetch('POST', '/v1/callers', { token: null, type: 'application/json', body: '{"name":"challenged"}', headers: authorization ? { authorization } : {} });
      expect(answer.status).toBe(401);
      expect(answer.headers.get('www-authenticate')).toBe('Bearer realm="egress-proxy admin"');
    }
  });
});

