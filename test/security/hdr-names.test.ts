import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawRequest, startLab, statuses, type Lab } from './lab.ts';

/**
 * HDR-03c and HDR-09c: header names as upstreams read them. Underscore spellings of claimed or
 * dropped headers (CGI, WSGI and PHP fold "_" into "-") and the whole x-forwarded-* family never
 * reach U. Both were found by this suite and fixed in src/pipeline/headers.ts.
 */
let lab: Lab;

beforeAll(async () => {
  lab = await startLab({
    routes: (u) => ({
      bearer: `name: bearer
prefix: /bearer
upstream: ${u.url}
allow_private_addresses: true
credential: plaid
inject:
  scheme: bearer
  token: "{secret}"
allow:
  - caller: a
    methods: [POST]
    paths: [/x]
`,
    }),
  });
}, 30_000);

afterAll(async () => {
  await lab?.close();
});

async function send(path: string, headerLines: string[]): Promise<string> {
  const raw = await rawRequest(lab.port, [`POST ${path} HTTP/1.1`, 'Host: p', `X-Egress-Token: ${lab.tokens.a}`, ...headerLines, 'Content-Length: 0', 'Connection: close', '', ''].join('\r\n'));
  lab.seen(raw);
  return raw;
}

describe('HDR findings', () => {
  it('HDR-09c every X-Forwarded-* header is stripped (README: "X-Forwarded-*"), not only For/Host/Proto/Port/Prefix', async () => {
    const mark = lab.u.requests.length;
    const names = ['X-Forwarded-Server', 'X-Forwarded-Scheme', 'X-Forwarded-Ssl', 'X-Forwarded-Uri', 'X-Forwarded-User', 'X-Forwarded-Email', 'X-Forwarded-Path', 'X-Forwarded-Client-Ip'];
    const raw = await send('/plaid/accounts/get', names.map((n) => `${n}: spoofed`));
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    const arrived = names.filter((n) => r.headers[n.toLowerCase()] !== undefined);
    expect(arrived).toEqual([]);
    await lab.g0(mark, 1);
  });

  it('HDR-03c underscore spellings of claimed headers (PLAID_SECRET, Authorization via CGI-style names) never reach U', async () => {
    // CGI/WSGI/PHP upstreams map both "Plaid-Secret" and "Plaid_Secret" to HTTP_PLAID_SECRET, so a
    // caller-chosen "PLAID_SECRET" next to the injected PLAID-SECRET is a second credential at U.
    const mark = lab.u.requests.length;
    const raw = await send('/plaid/accounts/get', ['PLAID_SECRET: attacker-secret', 'Plaid_Client_Id: attacker-id']);
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(JSON.stringify(r.rawHeaders)).not.toContain('attacker');
    const raw2 = await send('/bearer/x', ['X-Egress_Token: x', 'Proxy_Authorization: Basic Zm9vOmJhcg==', 'X_Forwarded_For: 10.0.0.1']);
    expect(statuses(raw2)).toEqual([200]);
    const r2 = lab.u.requests.at(-1)!;
    expect(JSON.stringify(r2.rawHeaders)).not.toMatch(/Zm9vOmJhcg|10\.0\.0\.1/);
    await lab.g0(mark, 2);
  });
  it('HDR-17 target-override headers (X-Original-URL, X-Rewrite-URL, X-Original-URI, X-Envoy-Original-Path, X-Override-URL) never reach U', async () => {
    // IIS URL Rewrite, Zend/Laminas and older Symfony route on X-Original-URL / X-Rewrite-URL
    // instead of the request line: the allowlist approved /accounts/get, the upstream would serve
    // /item/remove with the injected credential. Like X-HTTP-Method-Override, they are dropped.
    const mark = lab.u.requests.length;
    const names = ['X-Original-URL', 'X-Rewrite-URL', 'X-Original-URI', 'X-Envoy-Original-Path', 'X-Override-URL', 'X_Original_URL'];
    const raw = await send('/plaid/accounts/get', names.map((n) => `${n}: /item/remove`));
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    expect(r.url).toBe('/accounts/get');
    expect(JSON.stringify(r.rawHeaders), 'no target override at U').not.toContain('/item/remove');
    await lab.g0(mark, 1);
  });
  it('HDR-09d other client-address and client-certificate claims (True-Client-IP, X-Client-IP, CF-Connecting-IP, X-SSL-Client-Verify, …) never reach U', async () => {
    // The same forgeable claims as X-Forwarded-For and X-SSL-Client-S-DN under the names CDNs,
    // load balancers and TLS terminators use: an upstream that trusts one of them would take the
    // caller's word for the client's address or verified certificate.
    const mark = lab.u.requests.length;
    const names = ['True-Client-IP', 'X-Client-IP', 'X-Cluster-Client-IP', 'CF-Connecting-IP', 'Fastly-Client-IP', 'X-Originating-IP', 'X-Remote-IP', 'X-Remote-Addr', 'Client-IP',
      'X-SSL-Client-Verify', 'X-SSL-Client-I-DN', 'X-SSL-Client-Fingerprint', 'X-Client-Verify', 'X-Client-DN'];
    const raw = await send('/plaid/accounts/get', names.map((n) => `${n}: spoofed`));
    expect(statuses(raw)).toEqual([200]);
    const r = lab.u.requests.at(-1)!;
    const arrived = names.filter((n) => r.headers[n.toLowerCase()] !== undefined);
    expect(arrived).toEqual([]);
    await lab.g0(mark, 1);
  });
});
