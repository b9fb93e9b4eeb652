/**
 * Child process: the floor. A bare pass-through proxy on undici alone: node:http server,
 * undici Pool.request, stream pipe, the two credential headers added, hop-by-hop headers dropped,
 * `/bench` stripped. No caller check, no allowlist, no rate limit, no audit, no redaction.
 *
 * Env: BENCH_UPSTREAM (origin, e.g. http://127.0.0.1:1234).
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { pipeline } from 'node:stream/promises';
import { Pool, type Dispatcher } from 'undici';
import { CLIENT_ID, HOP_BY_HOP, PROXY_PREFIX, SECRET, exitWithParent, type ReadyMessage } from './common.ts';

exitWithParent();

const origin = process.env.BENCH_UPSTREAM;
if (!origin) throw new Error('BENCH_UPSTREAM is not set');

// The same pool settings as egress-proxy's Dispatchers.
const pool = new Pool(origin, { connections: 256, pipelining: 1, keepAliveTimeout: 30_000 });

const server = createServer(async (req, res) => {
  const headers: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(req.headers)) {
    if (value !== undefined && !HOP_BY_HOP.has(name)) headers[name] = value;
  }
  headers['plaid-client-id'] = CLIENT_ID;
  headers['plaid-secret'] = SECRET;
  const url = req.url ?? '/';
  const path = url.startsWith(`${PROXY_PREFIX}/`) ? url.slice(PROXY_PREFIX.length) : url;
  const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined;
  try {
    const upstream = await pool.request({ method: req.method as Dispatcher.HttpMethod, path, headers, body: hasBody ? req : null });
    const out: Record<string, string | string[]> = {};
    for (const [name, value] of Object.entries(upstream.headers)) {
      if (value !== undefined && !HOP_BY_HOP.has(name)) out[name] = value;
    }
    res.writeHead(upstream.statusCode, out);
    await pipeline(upstream.body, res);
  } catch {
    if (!res.headersSent) {
      res.writeHead(502, { 'content-type': 'text/plain' });
      res.end('bad gateway\n');
    } else {
      res.destroy();
    }
  }
});

server.listen(0, '127.0.0.1', () => {
  process.send!({ type: 'ready', port: (server.address() as AddressInfo).port } satisfies ReadyMessage);
});
