/**
 * Child process: http-proxy-3 (native http path, keep-alive agent) doing the same header injection
 * through its `headers` option, `/bench` stripped. No checks.
 *
 * Env: BENCH_UPSTREAM (origin, e.g. http://127.0.0.1:1234).
 */
import { Agent, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createProxyServer } from 'http-proxy-3';
import { CLIENT_ID, PROXY_PREFIX, SECRET, exitWithParent, type ReadyMessage } from './common.ts';

exitWithParent();

const origin = process.env.BENCH_UPSTREAM;
if (!origin) throw new Error('BENCH_UPSTREAM is not set');

// Without an agent http-proxy-3 sends `Connection: close` upstream; keep-alive like the others.
const agent = new Agent({ keepAlive: true, maxSockets: 256, keepAliveMsecs: 30_000 });
const proxy = createProxyServer({
  target: origin,
  agent,
  headers: { 'PLAID-CLIENT-ID': CLIENT_ID, 'PLAID-SECRET': SECRET },
  xfwd: false,
});
proxy.on('error', () => {});

const server = createServer((req, res) => {
  const url = req.url ?? '/';
  if (url.startsWith(`${PROXY_PREFIX}/`)) req.url = url.slice(PROXY_PREFIX.length);
  proxy.web(req, res, {}, () => {
    if (!res.headersSent) {
      res.writeHead(502, { 'content-type': 'text/plain' });
      res.end('bad gateway\n');
    } else {
      res.destroy();
    }
  });
});

server.listen(0, '127.0.0.1', () => {
  process.send!({ type: 'ready', port: (server.address() as AddressInfo).port } satisfies ReadyMessage);
});
