import { trading } from '@alpacahq/alpaca-trade-api';
import { Configuration, PlaidApi } from 'plaid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/**
 * Real provider SDKs, unchanged but for their base URL (the proxy's route prefix) and one extra
 * header (the caller token). Routes use the presets; the stand-in upstreams check the credential
 * the way the provider does and answer like it.
 */
const PLAID = { client_id: 'plaid-client-CANARY', secret: 'plaid-secret-CANARY-0042' };
const ALPACA = { key_id: 'PKALPACAKEYCANARY', secret_key: 'alpaca-secret-CANARY-9' };

let plaid: Upstream;
let alpaca: Upstream;
let proxy: TestProxy;

function json(res: import('node:http').ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

beforeAll(async () => {
  plaid = await startUpstream((req, res, body) => {
    const ok = req.headers['plaid-client-id'] === PLAID.client_id && req.headers['plaid-secret'] === PLAID.secret;
    if (!ok) {
      json(res, 400, { error_type: 'INVALID_INPUT', error_code: 'INVALID_API_KEYS', error_message: `invalid client_id or secret provided: ${String(req.headers['plaid-secret'])}`, request_id: 'r0' });
      return;
    }
    const parsed = JSON.parse(body.toString('utf8')) as { access_token?: string };
    if (req.url === '/accounts/get' && parsed.access_token === 'access-sandbox-1') {
      json(res, 200, {
        accounts: [{ account_id: 'acc-1', balances: { available: 100, current: 110, iso_currency_code: 'USD', limit: null, unofficial_currency_code: null }, mask: '0000', name: 'Checking', official_name: null, subtype: 'checking', type: 'depository' }],
        item: { item_id: 'item-1', institution_id: 'ins_1', webhook: null, error: null, available_products: [], billed_products: ['transactions'], consent_expiration_time: null, update_type: 'background' },
        request_id: 'r1',
      });
      return;
    }
    json(res, 400, { error_type: 'INVALID_INPUT', error_code: 'INVALID_ACCESS_TOKEN', error_message: 'bad access token', request_id: 'r2' });
  });
  alpaca = await startUpstream((req, res) => {
    if (req.headers['apca-api-key-id'] !== ALPACA.key_id || req.headers['apca-api-secret-key'] !== ALPACA.secret_key) {
      json(res, 401, { message: 'unauthorized.' });
      return;
    }
    if (req.url === '/v2/account') json(res, 200, { id: 'acct-1', account_number: 'PA123', status: 'ACTIVE', currency: 'USD', cash: '1000.5', buying_power: '2001', pattern_day_trader: false });
    else if (req.url === '/v2/positions') json(res, 200, [{ asset_id: 'a-1', symbol: 'AAPL', exchange: 'NASDAQ', asset_class: 'us_equity', qty: '3', side: 'long' }]);
    else json(res, 404, { message: 'not found' });
  });
  proxy = await startTestProxy({
    routes: {
      plaid: `name: plaid\npreset: plaid\nupstream: ${plaid.url}\nallow_private_addresses: true\ncredential: plaid\nallow:\n  - caller: sync\n    methods: [POST]\n    paths: [/accounts/get, /transactions/sync]\n`,
      alpaca: `name: alpaca\npreset: alpaca-paper\nupstream: ${alpaca.url}\nallow_private_addresses: true\ncredential: alpaca\nallow:\n  - caller: sync\n    methods: [GET]\n    paths: [/v2/account, /v2/positions]\n`,
    },
    credentials: { plaid: PLAID, alpaca: ALPACA },
    callers: ['sync'],
  });
});

afterAll(async () => {
  await proxy?.close();
  await plaid?.close();
  await alpaca?.close();
});

describe('plaid (official npm SDK) through the plaid preset', () => {
  const client = () => new PlaidApi(new Configuration({ basePath: `${proxy.url}/plaid`, baseOptions: { headers: { 'X-Egress-Token': proxy.tokens.sync! } } }));

  it('accountsGet works with no Plaid credentials in the client', async () => {
    const res = await client().accountsGet({ access_token: 'access-sandbox-1' });
    expect(res.status).toBe(200);
    expect(res.data.accounts[0]!.account_id).toBe('acc-1');
    const sent = plaid.requests.at(-1)!;
    expect(sent.url).toBe('/accounts/get');
    expect(JSON.parse(sent.body.toString())).toEqual({ access_token: 'access-sandbox-1' });
    expect(sent.headers['x-egress-token']).toBeUndefined();
    // The SDK's own headers pass through (no caller_headers restriction on this route).
    expect(sent.headers['plaid-version']).toBeDefined();
  });

  it('credentials the client still carries are replaced by the proxy\'s', async () => {
    const legacy = new PlaidApi(new Configuration({
      basePath: `${proxy.url}/plaid`,
      baseOptions: { headers: { 'X-Egress-Token': proxy.tokens.sync!, 'PLAID-CLIENT-ID': 'old-client', 'PLAID-SECRET': 'old-secret' } },
    }));
    const res = await legacy.accountsGet({ access_token: 'access-sandbox-1' });
    expect(res.status).toBe(200);
    expect(plaid.requests.at(-1)!.rawHeaders.filter((h) => h.toLowerCase() === 'plaid-secret')).toHaveLength(1);
  });

  it('a Plaid error reaches the SDK as Plaid sent it', async () => {
    const err = await client().accountsGet({ access_token: 'access-sandbox-unknown' }).catch((e: unknown) => e);
    const data = (err as { response?: { status: number; data: { error_code: string } } }).response;
    expect(data?.status).toBe(400);
    expect(data?.data.error_code).toBe('INVALID_ACCESS_TOKEN');
  });

  it('a path the caller is not allowed is the proxy\'s 403, seen by the SDK', async () => {
    const err = await client().itemRemove({ access_token: 'access-sandbox-1' }).catch((e: unknown) => e);
    const response = (err as { response?: { status: number; headers: Record<string, string> } }).response;
    expect(response?.status).toBe(403);
    expect(response?.headers['x-egress-error']).toBe('route_forbidden');
  });
});

describe('@alpacahq/alpaca-trade-api (v4 trading API classes) through the alpaca-paper preset', () => {
  const config = () => new trading.Configuration({ basePath: `${proxy.url}/alpaca`, headers: { 'X-Egress-Token': proxy.tokens.sync! } });

  it('getAccount and getAllOpenPositions with no Alpaca keys in the client', async () => {
    const account = await new trading.AccountsApi(config()).getAccount();
    expect(account.accountNumber).toBe('PA123');
    expect(alpaca.requests.at(-1)!.url).toBe('/v2/account');
    const positions = await new trading.PositionsApi(config()).getAllOpenPositions();
    expect(positions.map((p) => p.symbol)).toEqual(['AAPL']);
    expect(alpaca.requests.at(-1)!.headers['x-egress-token']).toBeUndefined();
  });

  it('placeholder keys in the client are replaced by the proxy\'s', async () => {
    const withKeys = new trading.Configuration({ basePath: `${proxy.url}/alpaca`, keyId: 'placeholder', secret: 'placeholder', headers: { 'X-Egress-Token': proxy.tokens.sync! } });
    const account = await new trading.AccountsApi(withKeys).getAccount();
    expect(account.id).toBe('acct-1');
    expect(alpaca.requests.at(-1)!.headers['apca-api-key-id']).toBe(ALPACA.key_id);
  });
});
