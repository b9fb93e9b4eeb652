import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { rawRequest } from '../helpers/raw.ts';

// Refused CONNECTs are requests too: audited, counted and watched like refused reverse-mode ones.
const GUESS = 'egt_CANARY_guessed_token_0000000000000000000';
let dir: string;
let serve: ServeProcess;
let token: string;

beforeAll(async () => {
  dir = await makeTempDir('egress-connect-audit-');
  const seeded = await seedDataDir(dir, {
    routes: {
      bank: `name: bank
prefix: /bank
upstream: https://api.bank.test
credential: key
inject: { scheme: bearer }
allow:
  - caller: svc
    methods: [GET]
    paths: [/accounts]
`,
    },
    credentials: { key: { token: 'sk_connect_audit_1234' } },
    callers: ['svc'],
  });
  token = seeded.tokens.svc!;
  const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
  expect((await runCli(['certs', 'init'], env)).code).toBe(0);
  serve = await startServe(env);
}, 30_000);

afterAll(async () => {
  await serve?.stop();
});

const connect = (target: string, credentials: string | null) =>
  rawRequest(Number(new URL(serve.url).port), `CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n${credentials ? `Proxy-Authorization: Basic ${Buffer.from(credentials).toString('base64')}\r\n` : ''}\r\n`);

describe('a refused CONNECT', () => {
  it('gets an audit line, a metric and the unknown_token alert, and no token is written', async () => {
    for (let i = 0; i < 10; i++) expect(await connect('api.bank.test:443', `svc:${GUESS}${i}`)).toMatch(/^HTTP\/1\.1 407/);
    expect(await connect('evil.example:443', `svc:${token}`)).toMatch(/^HTTP\/1\.1 403/);
    expect(await connect(`${GUESS}@api.bank.test:443`, `svc:${token}`)).toMatch(/^HTTP\/1\.1 403/);
    const audit = () => readFile(join(dir, 'audit.log'), 'utf8');
    await eventually(async () => (await audit()).split('\n').filter(Boolean).length >= 12, 3_000, 'the audit lines');
    const lines = (await audit()).split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.filter((l) => l.method === 'CONNECT' && l.reason === 'caller_unauthenticated')).toHaveLength(10);
    expect(lines).toContainEqual(expect.objectContaining({ method: 'CONNECT', caller: 'svc', decision: 'deny', reason: 'route_forbidden', path: 'evil.example:443' }));
    await eventually(() => serve.output().includes('"alert":"unknown_token"'), 3_000, 'the unknown_token alert');
    const metrics = await (await fetch(`${serve.admin}/metrics`)).text();
    expect(metrics).toContain('egress_requests_total{route="none",caller="unknown",decision="deny",status_class="4xx"} 10');
    expect(metrics).toContain('egress_requests_total{route="none",caller="svc",decision="deny",status_class="4xx"} 2');
    expect(await audit()).not.toContain('CANARY');
    expect(serve.output()).not.toContain('CANARY');
    expect(metrics).not.toContain('CANARY');
  });
});
