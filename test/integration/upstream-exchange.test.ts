import { createServer, request, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Pool } from '../../src/pipeline/undici.ts';
import { dispatchExchange, type UpstreamExchange } from '../../src/pipeline/upstream-exchange.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

// A full collection on demand, without starting the test process with --expose-gc.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** Small: whole before the relay starts (one write). Big: still streaming when it starts. */
const SMALL = 100;
const BIG = 4 * 1024 * 1024;

/**
 * A finished exchange (undici's handler) stays reachable for a while from undici during
 * young-generation collections. While it still pointed at the caller's response, the whole
 * request and response outlived two scavenges: a sixth of everything the proxy allocated was
 * promoted, and full collections (2-3 ms pauses) ran 1.4 times a second at 2,000 req/s. Once a
 * relay is done, the exchange must not reach the response: the test holds the exchanges, as
 * undici may, and checks that every response can still be collected.
 */
describe('UpstreamExchange', () => {
  let upstream: Upstream;
  let pool: Pool;
  let proxy: Server;
  let port: number;
  /** The exchanges, held on purpose, as undici may hold them. */
  const exchanges: UpstreamExchange[] = [];
  const responses: WeakRef<ServerResponse>[] = [];

  beforeAll(async () => {
    upstream = await startUpstream((req, res) => {
      const body = 'x'.repeat(req.url === '/big' ? BIG : SMALL);
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
      res.end(body);
    });
    pool = new Pool(upstream.url, { connections: 4 });
    proxy = createServer((req, res) => {
      const exchange = dispatchExchange(pool, { method: 'GET', path: req.url ?? '/', headers: [] });
      exchanges.push(exchange);
      responses.push(new WeakRef(res));
      exchange.head.then(
        (e) => e.pipeTo(res, e.status, ['content-type', 'text/plain']),
        () => res.destroy(),
      ).catch(() => res.destroy());
    });
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
    port = (proxy.address() as AddressInfo).port;
  });

  afterAll(async () => {
    proxy.closeAllConnections();
    await new Promise((resolve) => proxy.close(resolve));
    await pool.close();
    await upstream.close();
  });

  it.each([
    ['a body that arrived whole', '/small', SMALL],
    ['a body still streaming when the relay starts', '/big', BIG],
  ])('does not keep the caller response alive once %s is relayed', async (_what, path, size) => {
    exchanges.length = 0;
    responses.length = 0;
    for (let i = 0; i < 5; i++) {
      const length = await new Promise<number>((resolve, reject) => {
        request({ port, path, agent: false }, (res) => {
          let n = 0;
          res.on('data', (chunk: Buffer) => (n += chunk.length));
          res.on('end', () => resolve(n));
        }).on('error', reject).end();
      });
      expect(length).toBe(size);
    }
    expect(exchanges).toHaveLength(5);
    // Let the sockets close and every callback run, then collect.
    await new Promise((resolve) => setTimeout(resolve, 50));
    gc();
    await new Promise((resolve) => setImmediate(resolve));
    gc();
    const alive = responses.filter((ref) => ref.deref() !== undefined).length;
    expect(alive, 'responses still reachable while their exchanges are held').toBe(0);
  });
  // The second answer waits in Node's queue behind the first, so its first write reports it full:
  // its upstream is paused there (not read into memory), and resumes once the queue reaches it.
  it('two big answers pipelined on one connection both arrive whole', async () => {
    const { connect } = await import('node:net');
    const socket = connect(port, '127.0.0.1');
    let received = 0;
    socket.on('data', (chunk: Buffer) => (received += chunk.length));
    socket.write('GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
    await new Promise<void>((resolve, reject) => {
      socket.on('close', () => resolve());
      socket.on('error', reject);
    });
    expect(received).toBeGreaterThan(2 * BIG);
    expect(received).toBeLessThan(2 * BIG + 4096);
  });
});
