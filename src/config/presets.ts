/**
 * Known providers. A route file that says `preset: NAME` gets these keys; any key the file writes
 * itself replaces the preset's value whole (no deep merge: what the file says is what applies).
 * With a preset, `prefix` defaults to "/<name>". Values are raw route-file values, validated by the
 * same strict schema as a hand-written file. Facts and their sources: shared/reference/providers.md.
 */

export interface Preset {
  readonly about: string;
  /** Credential fields the preset's templates read: what `egress keys put` must be given. */
  readonly fields: readonly string[];
  readonly route: {
    readonly upstream: string;
    readonly inject: Readonly<Record<string, unknown>> | readonly Readonly<Record<string, unknown>>[];
    readonly auth_failure?: { readonly status: readonly number[]; readonly body_contains?: string | readonly string[] };
    readonly replay_safe?: readonly string[];
    readonly idempotency_key?: string;
    readonly caller_headers?: readonly string[];
    readonly strip_body_fields?: readonly string[];
  };
}

const alpaca = (host: string): Preset => ({
  about: `Alpaca Trading API (${host}): key id and secret key headers`,
  fields: ['key_id', 'secret_key'],
  route: {
    upstream: `https://${host}`,
    inject: { scheme: 'headers', headers: { 'APCA-API-KEY-ID': '{key_id}', 'APCA-API-SECRET-KEY': '{secret_key}' } },
    auth_failure: { status: [401] },
  },
});

const bearer = (about: string, upstream: string, field: string): Preset => ({
  about,
  fields: [field],
  route: { upstream, inject: { scheme: 'bearer', token: `{${field}}` }, auth_failure: { status: [401] } },
});

const PRESET_TABLE = {
  plaid: {
    about: 'Plaid production: PLAID-CLIENT-ID / PLAID-SECRET headers (override upstream for sandbox)',
    fields: ['client_id', 'secret'],
    route: {
      upstream: 'https://production.plaid.com',
      inject: { scheme: 'headers', headers: { 'PLAID-CLIENT-ID': '{client_id}', 'PLAID-SECRET': '{secret}' } },
      // Plaid reads them from the headers or the body (providers.md): a caller's body copy goes.
      strip_body_fields: ['client_id', 'secret'],
      // Branch on error_code, not the status: a rejected key is 400 INVALID_API_KEYS.
      auth_failure: { status: [400, 401], body_contains: 'INVALID_API_KEYS' },
      // Read-only POSTs: safe to send again with the previous secret.
      replay_safe: [
        'POST /accounts/get', 'POST /accounts/balance/get', 'POST /auth/get', 'POST /identity/get', 'POST /item/get',
        'POST /institutions/get', 'POST /institutions/get_by_id', 'POST /institutions/search', 'POST /categories/get',
        'POST /transactions/get', 'POST /transactions/sync', 'POST /investments/holdings/get',
        'POST /investments/transactions/get', 'POST /liabilities/get',
      ],
    },
  },
  teller: {
    about: 'Teller: client certificate (mTLS); the enrollment access token is the caller\'s own Basic Authorization',
    fields: ['certificate', 'private_key'],
    route: {
      upstream: 'https://api.teller.io',
      inject: { scheme: 'mtls', certificate: '{certificate}', private_key: '{private_key}' },
      // The proxy's credential is the certificate: a missing or revoked one is a 400 naming it.
      // 403 is an invalid access token, which is the caller's, not ours.
      auth_failure: { status: [400], body_contains: 'certificate' },
      caller_headers: ['Authorization'],
    },
  },
  'alpaca-paper': alpaca('paper-api.alpaca.markets'),
  'alpaca-live': alpaca('api.alpaca.markets'),
  snaptrade: {
    about: 'SnapTrade: clientId + timestamp query, HMAC-SHA256 Signature header (root paths; /api/v1 is deprecated)',
    fields: ['client_id', 'consumer_key'],
    route: {
      upstream: 'https://api.snaptrade.com',
      inject: { scheme: 'snaptrade' },
      auth_failure: { status: [401, 403], body_contains: 'Unable to verify signature' },
    },
  },
  kraken: {
    about: 'Kraken spot REST: API-Key + API-Sign (HMAC-SHA512) with a shared, strictly increasing nonce',
    fields: ['api_key', 'api_secret'],
    route: {
      upstream: 'https://api.kraken.com',
      inject: { scheme: 'kraken' },
      // Kraken answers HTTP 200 with its errors in the body: "EAPI:Invalid key" for a key it does not
      // know, "EAPI:Invalid signature" for a secret that is not the key's (one pasted wrong).
      auth_failure: { status: [200], body_contains: ['EAPI:Invalid key', 'EAPI:Invalid signature'] },
      replay_safe: [
        'POST /0/private/Balance', 'POST /0/private/BalanceEx', 'POST /0/private/TradeBalance', 'POST /0/private/OpenOrders',
        'POST /0/private/ClosedOrders', 'POST /0/private/QueryOrders', 'POST /0/private/TradesHistory',
        'POST /0/private/QueryTrades', 'POST /0/private/OpenPositions', 'POST /0/private/Ledgers',
        'POST /0/private/QueryLedgers', 'POST /0/private/TradeVolume',
      ],
    },
  },
  coinbase: {
    about: 'Coinbase Advanced Trade (CDP keys): a new ES256/EdDSA JWT per request',
    fields: ['key_name', 'private_key'],
    route: { upstream: 'https://api.coinbase.com', inject: { scheme: 'coinbase_jwt' }, auth_failure: { status: [401] } },
  },
  gocardless: {
    about: 'GoCardless Bank Account Data: Bearer token minted from secret_id/secret_key (JSON token request)',
    fields: ['secret_id', 'secret_key'],
    route: {
      upstream: 'https://bankaccountdata.gocardless.com',
      inject: {
        scheme: 'oauth2_client_credentials',
        token_url: 'https://bankaccountdata.gocardless.com/api/v2/token/new/',
        refresh_url: 'https://bankaccountdata.gocardless.com/api/v2/token/refresh/',
        client_auth: 'json',
        client_id: '{secret_id}',
        client_secret: '{secret_key}',
        id_field: 'secret_id',
        secret_field: 'secret_key',
        token_field: 'access',
        expires_field: 'access_expires',
        refresh_field: 'refresh',
        refresh_expires_field: 'refresh_expires',
      },
      auth_failure: { status: [401] },
    },
  },
  truelayer: {
    about: 'TrueLayer Payments API: Bearer token from the client-credentials grant with the payments scope (form token request), and Tl-Signature (ES512) on POST, PUT, PATCH and DELETE',
    fields: ['client_id', 'client_secret', 'kid', 'private_key'],
    route: {
      upstream: 'https://api.truelayer.com',
      inject: [
        // "For any requests to the Payments API, you must include a minimum of the payments scope"
        // (docs.truelayer.com, Generate a payments access token); more scopes (mandates…) need an inject of the file's own.
        { scheme: 'oauth2_client_credentials', token_url: 'https://auth.truelayer.com/connect/token', client_auth: 'body', scope: 'payments' },
        // Modification requests must carry Tl-Signature (truelayer-signing request-signing-v2.md); last, over the final bytes.
        { scheme: 'truelayer_signing' },
      ],
      auth_failure: { status: [401] },
      // Callers send Idempotency-Key on the requests that change something, and it is signed: a
      // replay with the previous key carries it again, re-signed (providers.md §3.2, §3.3).
      idempotency_key: 'Idempotency-Key',
    },
  },
  tradier: bearer('Tradier brokerage: Authorization: Bearer access token', 'https://api.tradier.com', 'access_token'),
  simplefin: {
    about: 'SimpleFIN Bridge: Basic auth from the Access URL\'s user and password (override upstream with its host and path)',
    fields: ['username', 'password'],
    route: { upstream: 'https://beta-bridge.simplefin.org/simplefin', inject: { scheme: 'basic' }, auth_failure: { status: [401, 403] } },
  },
  synth: bearer('Synth Finance: Authorization: Bearer API key', 'https://api.synthfinance.com', 'api_key'),
  stripe: {
    about: 'Stripe: Authorization: Bearer secret key',
    fields: ['secret_key'],
    route: {
      upstream: 'https://api.stripe.com',
      inject: { scheme: 'bearer', token: '{secret_key}' },
      auth_failure: { status: [401] },
      // Stripe runs a POST once per Idempotency-Key: one sent with it may be replayed with the
      // previous key, carrying the same key (providers.md §3.2).
      idempotency_key: 'Idempotency-Key',
    },
  },
} as const satisfies Record<string, Preset>;

export type PresetName = keyof typeof PRESET_TABLE;

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === 'object') {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}

/** By name; a Map, so no route file can reach Object.prototype through `preset: constructor`. */
export const PRESETS: ReadonlyMap<string, Preset> = new Map(Object.entries(deepFreeze(PRESET_TABLE)));
export const PRESET_NAMES = Object.keys(PRESET_TABLE) as [PresetName, ...PresetName[]];
