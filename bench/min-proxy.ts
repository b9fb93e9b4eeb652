/**
 * Child process: the least a Node proxy on this stack can do per request. node:http server, undici
 * Pool.dispatch with a handler that collects the response and sends it in one `end` (what
 * egress-proxy's UpstreamExchange does for a small body), the two credential headers added,
 * hop-by-hop headers dropped, `/bench` stripped. No caller check, no allowlist, no rate limit, no
 * audit, no metrics, no redaction, no back-pressure, no body limit: not a proxy to run, a floor to
 * measure egress-proxy's own cost against.
 *
 * Env: BENCH_UPSTREAM (origin, e.g. http://127.0.0.1:1234).
 */
import { createServer, type IncomingHttpHeaders, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Pool, type Dispatcher } from 'undici';
import { CLIENT_ID, HOP_BY_HOP, PROXY_PREFIX, SECRET, exitWithParent, type ReadyMessage } from './common.ts';

exitWithParent();

const origin = process.env.BENCH_UPSTREAM;
if (!origin) throw new Error('BENCH_UPSTREAM is not set');

// The same pool settings as egress-proxy's Dispatchers.
const pool = new Pool(origin, { connections: 256, pipelining: 1, keepAliveTimeout: 30_000 });

/** The headers that go on, as a flat [name, value, …] list (no object to build per request). */
function passedOn(headers: IncomingHttpHeaders): string[] {
  const out: string[] = [];
  for (const name in headers) {
    const value = headers[name];
    if (value === undefined || HOP_BY_HOP.has(name)) continue;
    if (Array.isArray(value)) for (const v of value) out.push(name, v);
    else out.push(name, value);
  }
  return out;
}

class Relay implements Dispatcher.DispatchHandler {
  readonly #res: ServerResponse;
  #status = 0;
  #headers: IncomingHttpHeaders = {};
  readonly #chunks: Buffer[] = [];

  constructor(res: ServerResponse) {
    this.#res = res;
  }

  onRequestStart(): void {}

  onResponseStart(_controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders): void {
    this.#status = statusCode;
    this.#headers = headers;
  }

  onResponseData(_controller: Dispatcher.DispatchController, chunk: Buffer): void {
    this.#chunks.push(chunk);
  }

  onResponseEnd(): void {
    this.#res.writeHead(this.#status, passedOn(this.#headers));
    this.#res.end(this.#chunks.length === 1 ? this.#chunks[0] : Buffer.concat(this.#chunks));
  }

  onResponseError(): void {
    if (this.#res.headersSent) {
      this.#res.destroy();
      return;
    }
    this.#res.writeHead(502, { 'content-type': 'text/plain' });
    this.#res.end('bad gateway\n');
  }
}

const server = createServer((req, res) => {
  const headers = passedOn(req.headers);
  headers.push('plaid-client-id', CLIENT_ID, 'plaid-secret', SECRET);
  const url = req.url ?? '/';
  const path = url.startsWith(`${PROXY_PREFIX}/`) ? url.slice(PROXY_PREFIX.length) : url;
  const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined;
  pool.dispatch({ method: req.method as Dispatcher.HttpMethod, path, headers, body: hasBody ? req : null }, new Relay(res));
});

server.listen(0, '127.0.0.1', () => {
  process.send!({ type: 'ready', port: (server.address() as AddressInfo).port } satisfies ReadyMessage);
});
