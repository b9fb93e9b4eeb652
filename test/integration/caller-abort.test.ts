import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** A caller that hangs up is not an upstream failure: no 5xx in the metrics, an honest audit line. */
let upstream: Upstream;
let proxy: TestProxy;

beforeAll(async () => {
  upstream = await startUpstream((req, res) => {
    if (req.url === '/slow') {
      setTimeout(() => {
        res.writeHead(200);
        res.end('late');
      }, 800);
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    const chunk = Buffer.alloc(64 * 1024, 1);
    let sent = 0;
    const timer = setInterval(() => {
      if (res.destroyed || sent++ > 50) {
        clearInterval(timer);
        res.end();
        return;
      }
      res.write(chunk);
    }, 20);
  });
  proxy = await startTestProxy({
    routes: { api: `name: api\nprefix: /api\nupstream: ${upstream.url}\nallow_private_addresses: true\ncredential: key\ninject:\n  scheme: bearer\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/slow, /stream]\n` },
    credentials: { key: { token: 'tok_abort_1234' } },
    callers: ['svc'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await upstream?.close();
});

describe('a caller that hangs up', () => {
  it.each([
    ['before the upstream answers', '/slow'],
    ['in the middle of a streamed response', '/stream'],
  ])('%s is recorded as aborted, not as an upstream error', async (_what, path) => {
    const ac = new AbortController();
    const res = fetch(`${proxy.url}/api${path}`, { headers: { 'x-egress-token': proxy.tokens.svc! }, signal: ac.signal });
    if (path === '/stream') {
      const r = await res;
      const reader = r.body!.getReader();
      await reader.read();
      ac.abort();
    } else {
      setTimeout(() => ac.abort(), 200);
      await expect(res).rejects.toThrow();
    }
    await eventually(async () => (await proxy.auditText()).includes(`"path":"/api${path}"`), 3_000, 'the audit line');
    const line = (await proxy.auditText()).trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.path === `/api${path}`)!;
    expect(line).toMatchObject({ decision: 'aborted', reason: 'caller_closed' });
    const metrics = await (await fetch(`${proxy.admin}/metrics`)).text();
    expect(metrics).not.toMatch(/egress_requests_total\{[^}]*status_class="5xx"/);
    expect((await fetch(`${proxy.admin}/healthz`)).status).toBe(200);
  });
});
