import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { apiKeyRoute, bearerRoute } from '../helpers/routes.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * A route whose credential the store does not hold, or whose current version lacks a field the
 * route's templates read, loads (the store may be filled later) but is said at once: a warning
 * alert `route_credential_missing` per route, and the route listed in /readyz and on the status
 * page, each time the answer changes, and cleared when the credential can serve the route.
 */
const SECRET = 'tok_ROUTECRED_CANARY_4711';
const OTHER_SECRET = 'tok_ROUTECRED_CANARY_other_0815';
let upstream: Upstream;
let serve: ServeProcess | undefined;

interface Problem { route: string; file: string; credential: string; problem: string; missing_fields?: string[] }
interface AlertLine { alert?: string; subject?: string; credential?: string; file?: string; problem?: string; missing_fields?: string[]; msg?: string }

beforeAll(async () => {
  upstream = await startUpstream();
});

afterAll(async () => {
  await upstream?.close();
});

afterEach(async () => {
  await serve?.stop();
  serve = undefined;
});

function lines(output: string): AlertLine[] {
  return output.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as AlertLine);
}

function alertsFor(output: string, route: string): AlertLine[] {
  return lines(output).filter((l) => l.alert === 'route_credential_missing' && l.subject === route);
}

async function problems(admin: string): Promise<Problem[] | undefined> {
  const res = await fetch(`${admin}/readyz`);
  expect(res.status).toBe(200);
  return ((await res.json()) as { routes: { credential_problems?: Problem[] } }).routes.credential_problems;
}

describe('routes whose credential cannot serve them', () => {
  it('are said at start, cleared by keys put, and said again after a reload that introduces a typo', async () => {
    const dir = await makeTempDir('egress-routecred-');
    const { tokens } = await seedDataDir(dir, { routes: { api: bearerRoute({ upstream: upstream.url, paths: ['/x'] }) }, callers: ['svc'] });
    const env = envFor(dir);
    serve = await startServe(env);

    // At start: the route loads, one alert names it, its file and the credential; the instance stays ready.
    const first = alertsFor(serve.output(), 'api');
    expect(first).toHaveLength(1);
    expect(first[0]).toMatchObject({ credential: 'key', problem: 'not_in_store', file: join(dir, 'routes', 'api.yaml') });
    expect(await problems(serve.admin)).toEqual([{ route: 'api', file: join(dir, 'routes', 'api.yaml'), credential: 'key', problem: 'not_in_store' }]);
    const get = () => fetch(`${serve!.url}/api/x`, { headers: { 'x-egress-token': tokens.svc! } }).then((r) => r.status);
    expect(await get()).toBe(503);

    // The running proxy sees the credential arrive: cleared, and said so.
    expect((await runCli(['keys', 'put', 'key', '--from-stdin'], env, JSON.stringify({ token: SECRET }))).code).toBe(0);
    await eventually(async () => (await problems(serve!.admin)) === undefined, 5_000, 'the problem to clear');
    await eventually(() => serve!.output().includes('route_credential_missing cleared'), 2_000, 'the clearing line');
    expect(await get()).toBe(200);

    // Other store changes that do not change the answer say nothing more.
    expect((await runCli(['callers', 'add', 'other'], env)).code).toBe(0);
    await new Promise((r) => setTimeout(r, 500));
    expect(alertsFor(serve.output(), 'api')).toHaveLength(1);

    // A reload that misspells the credential: raised again at once (a cleared alert is no repeat).
    await writeFile(join(dir, 'routes', 'api.yaml'), bearerRoute({ upstream: upstream.url, paths: ['/x'] }).replace('credential: key', 'credential: kye'));
    await eventually(() => alertsFor(serve!.output(), 'api').length === 2, 5_000, 'the alert after the reload');
    expect(alertsFor(serve.output(), 'api')[1]).toMatchObject({ credential: 'kye', problem: 'not_in_store' });
    expect(await problems(serve.admin)).toEqual([{ route: 'api', file: join(dir, 'routes', 'api.yaml'), credential: 'kye', problem: 'not_in_store' }]);

    // Nor do store changes while the answer stays the same.
    expect((await runCli(['callers', 'add', 'third'], env)).code).toBe(0);
    await new Promise((r) => setTimeout(r, 500));
    expect(alertsFor(serve.output(), 'api')).toHaveLength(2);
    expect(serve.output()).not.toContain(SECRET);
  });

  it('name the fields a route reads that the current version lacks, never a value, and show on the status page', async () => {
    const dir = await makeTempDir('egress-routecred-');
    await seedDataDir(dir, {
      routes: { api: apiKeyRoute({ upstream: upstream.url }), ok: apiKeyRoute({ upstream: upstream.url, name: 'ok', credential: 'good' }) },
      credentials: { key: { token: SECRET }, good: { secret: OTHER_SECRET } },
      callers: ['svc'],
    });
    const env = envFor(dir);
    serve = await startServe(env);
    const raised = alertsFor(serve.output(), 'api');
    expect(raised).toHaveLength(1);
    expect(raised[0]).toMatchObject({ credential: 'key', problem: 'missing_fields', missing_fields: ['secret'] });
    expect(raised[0]!.msg).toContain('"secret"');
    expect(alertsFor(serve.output(), 'ok')).toHaveLength(0);
    expect(await problems(serve.admin)).toEqual([{ route: 'api', file: join(dir, 'routes', 'api.yaml'), credential: 'key', problem: 'missing_fields', missing_fields: ['secret'] }]);

    const admin = (JSON.parse((await runCli(['admin-token', 'create', 'ops', '--json'], env)).stdout) as { token: string }).token;
    let page = '';
    await eventually(async () => {
      const res = await fetch(`${serve!.admin}/`, { headers: { authorization: `Bearer ${admin}` } });
      page = await res.text();
      return res.status === 200;
    }, 5_000, 'the status page');
    expect(page).toContain('lacks field <code>secret</code>');

    // Revoking the only version of a credential leaves its route with no current version.
    expect((await runCli(['keys', 'revoke', 'good', '--version', '1'], env)).code).toBe(0);
    await eventually(() => alertsFor(serve!.output(), 'ok').length === 1, 5_000, 'the alert for the revoked credential');
    expect(alertsFor(serve.output(), 'ok')[0]).toMatchObject({ credential: 'good', problem: 'no_current_version' });
    expect(alertsFor(serve.output(), 'api')).toHaveLength(1);

    for (const secret of [SECRET, OTHER_SECRET]) {
      expect(serve.output()).not.toContain(secret);
      expect(page).not.toContain(secret);
    }
  });
});
