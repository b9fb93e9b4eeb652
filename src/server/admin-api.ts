import type { IncomingMessage, ServerResponse } from 'node:http';
import { NAME, CALLER_NAME } from '../config/route-schema.ts';
import { parseDuration } from '../config/units.ts';
import { continueBody, hasBody, unmetExpectation } from '../pipeline/body.ts';
import { countHeader } from '../pipeline/canonicalise-target.ts';
import { closesForUnreadBody } from '../pipeline/send-error.ts';
import { bearerToken, tokenFromAuthorization } from './proxy-auth.ts';
import { ConflictError, NotFoundError, StateError, StoreUnavailableError, UserError } from '../errors.ts';
import type { AlertRules } from '../observe/alert-rules.ts';
import type { AuditLog } from '../observe/audit.ts';
import * as ops from '../rotation/operations.ts';
import { parseGrace } from '../rotation/transitions.ts';
import { lastUseByVersion } from '../observe/usage.ts';
import { describeCredential, dueForRotation, validateFields } from '../store/credentials.ts';
import { liveTokenCount } from '../store/callers.ts';
import type { KeyringFile } from '../store/keyring-file.ts';
import type { StoreView } from '../store/store-view.ts';

/**
 * The admin API: the CLI's credential and caller operations over HTTP, for rotation scripts, and
 * the audit chain's head, for a record of it kept outside the audit file.
 * Authenticated by an admin token (`egress admin-token create`), stored as a hash; a read-only one
 * (`--read-only`) is refused every method but GET and HEAD. Secret values
 * arrive in request bodies only and never come back. Successful changes are audited from the
 * record's history (like CLI changes); refused requests are audited here.
 */
export interface AdminApiDeps {
  readonly store: StoreView;
  readonly keys: KeyringFile;
  readonly audit: AuditLog;
  /** The routes in force, so a rotation that would leave one without its fields is refused. */
  readonly routes?: () => readonly ops.RouteFields[];
  /** Unknown admin tokens count toward unknown_token; revoked or expired ones raise retired_credential_used. */
  readonly rules?: AlertRules;
}

const MAX_BODY = 128 * 1024;

/** The answer to an Expect other than 100-continue (RFC 9110 §10.1.1), on any admin path. */
export const EXPECTATION_FAILED = Object.freeze({ error: Object.freeze({ code: 'expectation_failed', message: 'The request has an Expect the admin listener cannot meet; only 100-continue is supported.' }) });

class HttpError extends Error {
  readonly status: number;
  readonly code: string;
  readonly headers: Readonly<Record<string, string>>;
  constructor(status: number, code: string, message: string, headers: Readonly<Record<string, string>> = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers;
  }
}

export async function handleAdminApi(req: IncomingMessage, res: ServerResponse, path: string, id: string, deps: AdminApiDeps): Promise<void> {
  // A malformed escape stays as written: it names nothing, so the answer is a 404, not a thrown error.
  const segments = path.split('/').slice(2).map((s) => {
    try {
      return decodeURIComponent(s);
    } catch {
      return s;
    }
  });
  const action = `${req.method} /v1/${segments.map((s, i) => (i % 2 === 1 && segments.length > 1 ? ':id' : s)).join('/')}`;
  let actor = 'admin:unknown';
  try {
    // As on the proxy listeners, before anything else: the connection closes after this answer.
    if (unmetExpectation(req)) throw new HttpError(417, EXPECTATION_FAILED.error.code, EXPECTATION_FAILED.error.message);
    // Without a readable store no token can be checked: that is our failure, and a rotation script
    // told 401 would conclude its token is wrong (as the proxy answers callers 503, not 401).
    if (bearerToken(req.headers.authorization) && !deps.store.usable()) throw new HttpError(503, 'store_unavailable', 'The store cannot be read, so the admin token cannot be checked; retry shortly.');
    const name = adminName(req, deps.store, 'bearer');
    if (!name) {
      refusedAdminToken(req, bearerToken(req.headers.authorization), deps);
      // A 401 names the scheme to use (RFC 9110 §15.5.2). Bearer, which no browser prompts for: a
      // Basic challenge would have it ask for a password, then replay it with every request here.
      throw new HttpError(401, 'admin_unauthenticated', 'An admin token is required: Authorization: Bearer ega_…', { 'www-authenticate': 'Bearer realm="egress-proxy admin"' });
    }
    actor = `admin:${name}`;
    // A read-only token (admin-token create --read-only) is for monitoring: it reads, and any other
    // method is refused before its path, its body or the store is looked at, so nothing it sends
    // can change anything (and a client waiting on Expect: 100-continue is never told to send).
    if (req.method !== 'GET' && req.method !== 'HEAD' && deps.store.adminReadOnly(name)) throw new HttpError(403, 'admin_read_only', `The admin token "${name}" is read-only: it may only GET and HEAD the admin API and the status page. Nothing was changed; changes need an admin token made without --read-only.`);
    const op: ops.Operator = { store: deps.store.backend, actor, ...(deps.routes ? { routes: deps.routes } : {}) };
    const result = await route(req, res, segments, op, deps);
    // The API's answer reflects the change at once; the proxy's own view follows within a second.
    void deps.store.refresh();
    send(res, result.status ?? 200, result.body);
    // Changes are audited from the record's history, on every instance; a read changes nothing
    // there, and what a token was used to look at is audited here (a HEAD too: it is the same read).
    if (req.method === 'GET' || req.method === 'HEAD') deps.audit.admin({ requestId: id, actor, action: bounded(action), target: bounded(segments.slice(0, 2).join(':')), decision: 'allow', reason: 'read' });
  } catch (err) {
    const e = toHttpError(err);
    // Refused requests are audited as sent, which anyone who reaches the port decides: bounded.
    deps.audit.admin({ requestId: id, actor, action: bounded(action), target: bounded(segments.slice(0, 2).join(':') || 'v1'), decision: e.status >= 500 ? 'error' : 'deny', reason: e.code });
    send(res, e.status, { error: { code: e.code, message: e.message, request_id: id } }, e.headers);
  }
}

/** A value from the request path as the audit line keeps it: at most 128 characters. */
function bounded(text: string): string {
  return text.length > 128 ? `${text.slice(0, 128)}…` : text;
}

async function route(req: IncomingMessage, res: ServerResponse, s: readonly string[], op: ops.Operator, deps: AdminApiDeps): Promise<{ status?: number; body: unknown }> {
  const [collection, id, verb, ...extra] = s;
  // HEAD is served wherever GET is, with GET's status and headers (RFC 9110 §9.3.2): it is routed
  // as a GET, and Node leaves out the body of the answer to a HEAD, keeping its Content-Length.
  const method = req.method === 'HEAD' ? 'GET' : req.method ?? '';
  // Which resource a path names is settled before its method is looked at: a 405 says the resource
  // exists and names its methods, so a path that names nothing (an unknown verb, a caller without
  // one, an empty segment) is a 404 whatever the method.
  if (extra.length > 0 || s.includes('')) throw notFound();
  const now = new Date();
  if (collection === 'credentials') {
    if (!id) {
      if (method === 'GET') {
        const records = (await op.store.load()).credentials.values();
        // `keys due` for scripts on HTTP: `?due` (90 days) or `?due=30d`, the credentials whose
        // current version is older, as `keys due --json` gives them.
        const maxAgeMs = dueQuery(req.url ?? '');
        if (maxAgeMs !== undefined) return { body: { max_age_days: maxAgeMs / 86_400_000, due: dueForRotation(records, maxAgeMs, now.getTime()) } };
        return { body: { credentials: [...records].map((r) => describeCredential(r, now)) } };
      }
      if (method === 'POST') {
        const body = await readJson(req, res, ['id', 'fields']);
        const newId = stringField(body, 'id');
        if (!NAME.test(newId)) throw new HttpError(400, 'bad_request', 'id: lower-case letters, digits, "_" and "-"');
        return { status: 201, body: describeCredential(await ops.putCredential(op, deps.keys.current, newId, fields(body)), now) };
      }
      throw notAllowed('GET, HEAD, POST');
    }
    if (!verb) {
      if (method !== 'GET') throw notAllowed('GET, HEAD');
      const record = (await op.store.load()).credentials.get(id);
      if (!record) throw notFound(`no credential "${id}"`);
      return { body: describeCredential(record, now, lastUseByVersion(await op.store.readUsage(id))) };
    }
    const known = CREDENTIAL_VERBS.get(verb);
    if (!known) throw notFound();
    if (method !== 'POST') throw notAllowed('POST');
    const body = await readJson(req, res, known);
    switch (verb) {
      case 'versions':
        if (body.stage !== undefined && typeof body.stage !== 'boolean') throw new HttpError(400, 'bad_request', 'stage must be true or false');
        // As `keys rotate --stage --grace`: a staged version's grace is given when it is promoted.
        if (body.stage === true && body.grace !== undefined) throw new HttpError(400, 'bad_request', `grace applies when a version becomes current: give it to POST /v1/credentials/${id}/promote; nothing was staged`);
        return { status: 201, body: describeCredential(await ops.rotateCredential(op, deps.keys.current, id, fields(body), { stage: body.stage === true, graceMs: grace(body) }), now) };
      case 'promote':
        return { body: describeCredential(await ops.promoteCredential(op, id, grace(body)), now) };
      case 'rollback':
        return { body: describeCredential(await ops.rollbackCredential(op, id), now) };
      case 'revoke': {
        const version = body.version;
        if (version !== undefined && (!Number.isSafeInteger(version) || (version as number) < 1)) throw new HttpError(400, 'bad_request', 'version must be a version number');
        return { body: describeCredential(await ops.revokeCredential(op, id, version as number | undefined), now) };
      }
      default:
        throw notFound();
    }
  }
  if (collection === 'callers') {
    if (!id) {
      if (method === 'GET') {
        const now = Date.now();
        const list = [...(await op.store.load()).callers.values()].map((c) => ({ name: c.name, created_at: c.created_at, tokens: liveTokenCount(c, now), revoked_at: c.revoked_at ?? null }));
        return { body: { callers: list } };
      }
      if (method === 'POST') {
        const name = stringField(await readJson(req, res, ['name']), 'name');
        if (!CALLER_NAME.test(name)) throw new HttpError(400, 'bad_request', 'name: lower-case letters, digits, ".", "_" and "-"');
        const { record, token } = await ops.addToken(op, 'caller', name);
        return { status: 201, body: { caller: record.name, token } };
      }
      throw notAllowed('GET, HEAD, POST');
    }
    if (verb !== 'rotate' && verb !== 'revoke') throw notFound();
    if (method !== 'POST') throw notAllowed('POST');
    const body = await readJson(req, res, verb === 'rotate' ? ['grace'] : []);
    if (verb === 'rotate') {
      const { record, token } = await ops.rotateToken(op, 'caller', id, grace(body));
      return { body: { caller: record.name, token } };
    }
    const record = await ops.revokeToken(op, 'caller', id);
    return { body: { caller: record.name, revoked_at: record.revoked_at } };
  }
  if (collection === 'audit' && id === 'head' && !verb) {
    // Read before this request's own audit line is written (it follows, chained to this head).
    if (method !== 'GET') throw notAllowed('GET, HEAD');
    return { body: deps.audit.head() };
  }
  throw notFound();
}

/**
 * The admin token's name, from `Authorization: Bearer ega_…`; undefined when absent or not a live
 * admin token. The status page (GET, read-only) also takes Basic with the token as the password, so
 * a browser can open it; the API does not: a browser that has opened the page replays Basic
 * credentials by itself, with any request to this origin, a cross-site form POST to
 * /v1/credentials/ID/revoke included.
 */
export function adminName(req: IncomingMessage, store: StoreView, schemes: 'bearer' | 'bearer-or-basic'): string | undefined {
  // Node keeps the first of two Authorization lines: which one counts would depend on the order a
  // client or a proxy in between wrote them. Two are refused, as two caller tokens are.
  if (countHeader(req.rawHeaders, 'authorization') > 1) return undefined;
  const header = req.headers.authorization;
  const token = schemes === 'bearer' ? bearerToken(header) : tokenFromAuthorization(header);
  return token && store.usable() ? store.identifyAdmin(token) : undefined;
}

/**
 * A token presented to the admin listener that opened nothing: an admin token that expired or was
 * revoked raises retired_credential_used, anything else counts toward unknown_token.
 */
export function refusedAdminToken(req: IncomingMessage, token: string | undefined, deps: Pick<AdminApiDeps, 'store' | 'rules'>): void {
  if (!token || !deps.rules) return;
  const remote = req.socket.remoteAddress ?? 'unknown';
  const retired = deps.store.lookupAdmin(token).retired;
  if (retired) deps.rules.onRetiredAdminToken(retired, remote);
  else deps.rules.onUnknownAdminToken(remote);
}

function toHttpError(err: unknown): HttpError {
  if (err instanceof HttpError) return err;
  if (err instanceof ConflictError) return new HttpError(409, 'conflict', err.message);
  if (err instanceof NotFoundError) return new HttpError(404, 'not_found', err.message);
  if (err instanceof StateError) return new HttpError(409, 'invalid_state', err.message);
  if (err instanceof StoreUnavailableError) return new HttpError(503, 'store_unavailable', err.message);
  if (err instanceof UserError) return new HttpError(400, 'bad_request', err.message);
  return new HttpError(500, 'internal_error', 'The admin request failed.');
}

function notFound(message = 'No such admin endpoint.'): HttpError {
  return new HttpError(404, 'not_found', message);
}

/** `?due` or `?due=DURATION` on GET /v1/credentials: the maximum age asked for, or undefined without `due`. */
function dueQuery(url: string): number | undefined {
  const at = url.indexOf('?');
  if (at === -1) return undefined;
  const params = new URLSearchParams(url.slice(at + 1));
  const names = [...new Set(params.keys())];
  if (names.some((n) => n !== 'due')) throw new HttpError(400, 'bad_request', 'GET /v1/credentials takes one query parameter, due (?due or ?due=90d)');
  if (names.length === 0) return undefined;
  const values = params.getAll('due');
  if (values.length > 1) throw new HttpError(400, 'bad_request', 'due is given more than once');
  const ms = parseDuration(values[0] || '90d');
  if (ms === undefined) throw new HttpError(400, 'bad_request', 'due must be a duration like 30d, 24h or 0');
  return ms;
}

/** A 405 carries the methods the path does serve (RFC 9110 §15.5.6): `allow` is that list. */
function notAllowed(allow: string): HttpError {
  return new HttpError(405, 'method_not_allowed', `Method not allowed on this endpoint; it serves ${allow}.`, { allow });
}

/** The body fields each credential verb takes. */
const CREDENTIAL_VERBS: ReadonlyMap<string, readonly string[]> = new Map([
  ['versions', ['fields', 'stage', 'grace']],
  ['promote', ['grace']],
  ['rollback', []],
  ['revoke', ['version']],
]);

/**
 * The request's JSON object, with no field but `known`: a misspelt field must not leave its
 * default in force ({"Version": 2} would revoke the current version, {"stag": true} put a new key
 * live). The message names the field only when its name cannot be a value pasted in the wrong place.
 */
async function readJson(req: IncomingMessage, res: ServerResponse, known: readonly string[]): Promise<Record<string, unknown>> {
  // The same goes for options in the query string, which nothing reads: POST …/revoke?version=1
  // revoked the current version, …/rotate?grace=0 left the old token working for 24 h.
  if ((req.url ?? '').includes('?')) throw new HttpError(400, 'bad_request', `a change takes its options in the JSON body, not in the query string; this endpoint takes ${known.length ? known.map((k) => `"${k}"`).join(', ') : 'no fields'}; nothing was changed`);
  const body = await readJsonObject(req, res);
  for (const key of Object.keys(body)) {
    if (known.includes(key)) continue;
    const name = /^[A-Za-z][A-Za-z0-9_-]{0,31}$/.test(key) ? `"${key}"` : '(name not shown)';
    throw new HttpError(400, 'bad_request', `unknown field ${name}; this endpoint takes ${known.length ? known.map((k) => `"${k}"`).join(', ') : 'no fields'}`);
  }
  return body;
}

async function readJsonObject(req: IncomingMessage, res: ServerResponse): Promise<Record<string, unknown>> {
  // What can be refused from the head is refused before a client that sent Expect: 100-continue
  // is told to send its body (RFC 9110 §10.1.1).
  if (Number(req.headers['content-length'] ?? 0) > MAX_BODY) throw tooLarge();
  if (hasBody(req)) {
    const refused = unreadableMediaType(req.headers['content-type']);
    if (refused) throw new HttpError(415, 'unsupported_media_type', refused);
  }
  continueBody(req, res);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY) throw tooLarge();
    chunks.push(chunk as Buffer);
  }
  if (size === 0) return {};
  let text: string;
  try {
    text = UTF8.decode(Buffer.concat(chunks));
  } catch {
    // Decoded leniently, each invalid byte became U+FFFD: a Latin-1 secret stored changed.
    throw new HttpError(400, 'bad_request', 'The body is not valid UTF-8; nothing was changed.');
  }
  try {
    const parsed: unknown = JSON.parse(text);
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Error('not an object');
    return Object.assign(Object.create(null), parsed) as Record<string, unknown>;
  } catch {
    throw new HttpError(400, 'bad_request', 'The body is not a JSON object.');
  }
}

const UTF8 = new TextDecoder('utf-8', { fatal: true });

const TOKEN = "[!#$%&'*+.^_`|~0-9A-Za-z-]+";
const QUOTED = '"(?:[^"\\\\]|\\\\.)*"';
/** RFC 9110 §8.3.1: type "/" subtype *( OWS ";" OWS [ name "=" ( token / quoted-string ) ] ). */
const MEDIA_TYPE = new RegExp(`^(${TOKEN})/(${TOKEN})((?:[ \\t]*;[ \\t]*(?:${TOKEN}=(?:${TOKEN}|${QUOTED}))?)*)$`);
const PARAMETER = new RegExp(`(${TOKEN})=(${TOKEN}|${QUOTED})`, 'g');
const JSON_ONLY = 'Send JSON with Content-Type: application/json.';

/**
 * Why a request body's Content-Type is not one the API reads, or undefined when it is
 * application/json. Type, subtype, parameter names and the charset's value are case-insensitive
 * (RFC 9110 §8.3.1, §8.3.2); a prefix is not a match (application/jsonfoo, application/json-seq).
 * Structured-syntax +json types are refused: each gives JSON a meaning of its own (a merge patch's
 * null deletes a field, a JSON-seq body is several texts) that these endpoints would not apply. The
 * body is read as UTF-8, so a charset other than that is refused rather than read as something it is not.
 */
function unreadableMediaType(header: string | undefined): string | undefined {
  const match = MEDIA_TYPE.exec(header ?? '');
  if (!match || match[1]!.toLowerCase() !== 'application' || match[2]!.toLowerCase() !== 'json') return JSON_ONLY;
  for (const [, name, value] of match[3]!.matchAll(PARAMETER)) {
    if (name!.toLowerCase() !== 'charset') continue;
    const charset = value!.startsWith('"') ? value!.slice(1, -1).replace(/\\(.)/g, '$1') : value!;
    if (charset.toLowerCase() !== 'utf-8') return 'The body is read as UTF-8: send Content-Type: application/json with charset=utf-8 or no charset.';
  }
  return undefined;
}

function tooLarge(): HttpError {
  return new HttpError(413, 'body_too_large', 'Admin request bodies are limited to 128 KiB.');
}

function stringField(body: Record<string, unknown>, name: string): string {
  const value = body[name];
  if (typeof value !== 'string' || !value) throw new HttpError(400, 'bad_request', `"${name}" is required`);
  return value;
}

function fields(body: Record<string, unknown>) {
  const checked = validateFields(body.fields);
  if (!checked.ok) throw new HttpError(400, 'bad_request', `fields: ${checked.message}`);
  return checked.fields;
}

function grace(body: Record<string, unknown>): number {
  // Only a grace left out is the default: null is not one (version and stage refuse it too).
  const value = body.grace === undefined ? '24h' : body.grace;
  const ms = typeof value === 'string' ? parseGrace(value) : undefined;
  if (ms === undefined) throw new HttpError(400, 'bad_request', 'grace must be a duration like "0", "1h" or "24h", at most "365d"');
  return ms;
}

function send(res: ServerResponse, status: number, body: unknown, headers: Readonly<Record<string, string>> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store', ...(closesForUnreadBody(res) ? { connection: 'close' } : {}) });
  res.end(text);
}
