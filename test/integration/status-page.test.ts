import { existsSync } from 'node:fs';
import { mkdtemp, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.ts';
import { envFor, eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * The ops status page, loaded in a real headless Chromium (Debian's /usr/bin/chromium, driven by
 * playwright-core): it shows routes, callers, credentials with their versions, traffic charts and
 * alerts, and no secret value.
 */
const SECRETS = ['sk_status_CANARY_plaid_1', 'sk_status_CANARY_plaid_2', 'sk_status_CANARY_alpaca'];
let upstream: Upstream;
let proxy: TestProxy;
let browser: Browser;
let admin: string;
export const SCREENSHOT_DIR = process.env.EGRESS_SCREENSHOT_DIR;

beforeAll(async () => {
  expect(existsSync('/usr/bin/chromium'), 'Chromium is installed at /usr/bin/chromium (apt-get install chromium; .ci/run does)').toBe(true);
  upstream = await startUpstream();
  const route = (name: string, credential: string) => `name: ${name}\nprefix: /${name}\nupstream: ${upstream.url}\nallow_private_addresses: true\ncredential: ${credential}\ninject:\n  scheme: bearer\nallow:\n  - caller: sync-worker\n    methods: [GET]\n    paths: [/x]\n  - caller: web\n    methods: [GET]\n    paths: [/x]\n`;
  proxy = await startTestProxy({
    routes: { plaid: route('plaid', 'plaid-production'), alpaca: route('alpaca', 'alpaca-paper') },
    credentials: { 'plaid-production': { token: SECRETS[0]! }, 'alpaca-paper': { token: SECRETS[2]! } },
    callers: ['sync-worker', 'web'],
  });
  const env = envFor(proxy.dir);
  admin = (JSON.parse((await runCli(['admin-token', 'create', 'ops', '--json'], env)).stdout) as { token: string }).token;
  expect((await runCli(['keys', 'rotate', 'plaid-production', '--from-stdin', '--grace', '24h'], env, JSON.stringify({ token: SECRETS[1] }))).code).toBe(0);
  for (let i = 0; i < 30; i++) await fetch(`${proxy.url}/plaid/x`, { headers: { 'x-egress-token': proxy.tokens['sync-worker']! } });
  for (let i = 0; i < 12; i++) await fetch(`${proxy.url}/alpaca/nope`, { headers: { 'x-egress-token': proxy.tokens.web! } });
  for (let i = 0; i < 10; i++) await fetch(`${proxy.url}/plaid/x`, { headers: { 'x-egress-token': `egt_${'q'.repeat(42)}${i}` } });
  await proxy.services().usage.flush();
  await eventually(async () => (await fetch(`${proxy.admin}/`, { headers: { authorization: `Bearer ${admin}` } })).status === 200, 2_000, 'the admin token');
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

afterAll(async () => {
  await browser?.close();
  await proxy?.close();
  await upstream?.close();
});

describe('status page', () => {
  it('needs an admin token (a caller token does not do)', async () => {
    expect((await fetch(`${proxy.admin}/`)).status).toBe(401);
    expect((await fetch(`${proxy.admin}/`)).headers.get('www-authenticate')).toContain('Basic');
    expect((await fetch(`${proxy.admin}/`, { headers: { authorization: `Bearer ${proxy.tokens.web}` } })).status).toBe(401);
    const basic = Buffer.from(`ops:${admin}`).toString('base64');
    expect((await fetch(`${proxy.admin}/`, { headers: { authorization: `Basic ${basic}` } })).status).toBe(200);
  });

  it('renders in Chromium on a laptop-sized screen with routes, credentials, versions, charts and alerts, and no secret', async () => {
    const page = await browser.newPage({ viewport: { width: 1366, height: 900 }, extraHTTPHeaders: { authorization: `Bearer ${admin}` } });
    const response = await page.goto(`${proxy.admin}/`);
    expect(response!.status()).toBe(200);
    const text = await page.locator('body').innerText();
    for (const name of ['plaid-production', 'alpaca-paper', 'sync-worker', 'web', '/plaid', '/alpaca']) expect(text).toContain(name);
    expect(text).toMatch(/previous/);
    expect(text).toMatch(/current/);
    expect(text).toMatch(/unknown_token/);
    expect(text).toMatch(/requests per minute · \d+ in the hour/);
    expect(await page.locator('svg').count()).toBe(2);
    expect(await page.locator('svg rect').count()).toBe(120);
    const html = await page.content();
    for (const secret of SECRETS) {
      expect(html).not.toContain(secret);
      expect(html).not.toContain(Buffer.from(secret).toString('base64'));
    }
    // Readable on a laptop: nothing wider than the window.
    const overflow = (await page.evaluate('document.documentElement.scrollWidth - window.innerWidth')) as number;
    expect(overflow).toBeLessThanOrEqual(0);
    const dir = SCREENSHOT_DIR ?? (await mkdtemp(join(tmpdir(), 'egress-status-')));
    const file = join(dir, 'status.png');
    await page.screenshot({ path: file, fullPage: true });
    expect((await stat(file)).size).toBeGreaterThan(20_000);
    await page.close();
  });
});
