import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir } from '../helpers/proxy.ts';
import { rawRequest, statuses } from '../helpers/raw.ts';

// A caller that puts its credentials in the request target's userinfo: refused, and audited.
const TOKEN = 'egt_CANARY_userinfo_token_7d1e';

let dir: string;
let serve: ServeProcess;

beforeAll(async () => {
  dir = await makeTempDir('egress-audit-target-');
  await mkdir(join(dir, 'routes'));
  expect((await runCli(['master-key', 'init'], envFor(dir))).code).toBe(0);
  serve = await startServe(envFor(dir));
});

afterAll(async () => {
  await serve?.stop();
});

describe('the audit line of a refused request target', () => {
  it('keeps the path but not the userinfo of an absolute-form target', async () => {
    const port = Number(new URL(serve.url).port);
    const targets = [
      `http://sync:${TOKEN}@api.example/plaid/accounts/get`,
      `https://${TOKEN}@api.example/plaid/x?key=v`,
      `http://sync:pw/${TOKEN}@api.example/plaid/x`,
      `//sync:${TOKEN}@api.example/plaid/x`,
    ];
    for (const target of targets) {
      const answer = await rawRequest(port, `GET ${target} HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n`);
      expect(statuses(answer)[0]).toBeGreaterThanOrEqual(400);
    }
    const audit = () => readFile(join(dir, 'audit.log'), 'utf8');
    await eventually(async () => (await audit()).split('\n').filter(Boolean).length >= targets.length, 3_000, 'audit lines');
    const text = await audit();
    expect(text).toContain('api.example/plaid/accounts/get');
    expect(text).not.toContain('CANARY');
    expect(serve.output()).not.toContain('CANARY');
  });
});
