/**
 * Child process: the upstream every target calls. A node:http server that answers 200 with a small
 * JSON body, but only to requests that carry the injected secret: anything without
 * `plaid-secret: <SECRET>` gets 401 and is counted. The orchestrator reads the counters over IPC.
 *
 * Env: BENCH_BODY_BYTES (expected POST body size).
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { CLIENT_ID, SECRET, TOKEN_HEADER, UPSTREAM_PATH, emptyStats, exitWithParent, type ReadyMessage, type StatsReply, type StatsRequest } from './common.ts';

exitWithParent();

const expectedBody = Number(process.env.BENCH_BODY_BYTES ?? 2048);
const stats = emptyStats();

const OK_BODY = Buffer.from(JSON.stringify({
  accounts: [
    { account_id: 'BxBXxLj1m4HMXBm9WZZmCWVbPjX16EHwv99vp', balances: { available: 100, current: 110, iso_currency_code: 'USD' }, mask: '0000', name: 'Plaid Checking', subtype: 'checking', type: 'depository' },
  ],
  item: { item_id: 'eVBnVMp7zdTJLkRNr33Rs6zr7KNJqBFL9DrE6' },
  request_id: 'bench',
}));
const UNAUTHORIZED_BODY = Buffer.from(JSON.stringify({ error_type: 'INVALID_INPUT', error_code: 'INVALID_API_KEYS', error_message: 'missing or wrong PLAID-SECRET' }));

function respond(req: IncomingMessage, res: ServerResponse, bodyBytes: number): void {
  stats.requests++;
  if (req.method === 'POST') {
    stats.post++;
    if (bodyBytes !== expectedBody) stats.badBody++;
  } else {
    stats.get++;
  }
  const path = (req.url ?? '').split('?', 1)[0];
  if (path !== UPSTREAM_PATH) stats.wrongPath++;
  if (req.headers[TOKEN_HEADER] !== undefined) stats.tokenSeen++;
  if (req.headers['plaid-client-id'] !== CLIENT_ID) stats.badClientId++;
  if (req.headers['plaid-secret'] !== SECRET) {
    stats.missingSecret++;
    res.writeHead(401, { 'content-type': 'application/json', 'content-length': UNAUTHORIZED_BODY.length });
    res.end(UNAUTHORIZED_BODY);
    return;
  }
  stats.ok++;
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': OK_BODY.length });
  res.end(OK_BODY);
}

const server = createServer((req, res) => {
  let bytes = 0;
  req.on('data', (chunk: Buffer) => {
    bytes += chunk.length;
  });
  req.on('end', () => respond(req, res, bytes));
  req.on('error', () => res.destroy());
});
// Longer than any proxy's pool idle timeout, so idle keep-alive sockets are closed by the client
// side, never raced by the server.
server.keepAliveTimeout = 65_000;
server.headersTimeout = 66_000;
server.requestTimeout = 0;

process.on('message', (message: StatsRequest) => {
  if (message?.type === 'stats') process.send!({ type: 'stats', id: message.id, stats: { ...stats } } satisfies StatsReply);
});

server.listen(0, '127.0.0.1', () => {
  process.send!({ type: 'ready', port: (server.address() as AddressInfo).port } satisfies ReadyMessage);
});
