import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { Cluster, ClusterOptions, Redis, RedisOptions } from 'ioredis';
import { decodeUserinfo } from '../config/userinfo.ts';
import { UserError } from '../errors.ts';

const require = createRequire(import.meta.url);

/**
 * ioredis is loaded on the first connection, not with this module: a proxy on the file store never
 * connects, and the client library would cost it memory for nothing (about 2.5 MB resident with
 * the compile cache).
 */
const ioredis = (): typeof import('ioredis') => require('ioredis');

/**
 * Redis connections for the store and the rate limiter. Every command is bounded: no offline
 * queue (a command while disconnected fails at once), one attempt per command, a command timeout.
 * Callers fall back to what they cached, or to per-instance limits, instead of waiting.
 */
export const REDIS_LIMITS = Object.freeze({ commandTimeoutMs: 500, connectTimeoutMs: 1_000, maxReconnectDelayMs: 2_000 });

export type RedisConnection = Redis | Cluster;

const scriptShas = new Map<string, string>();

/**
 * Run a Lua script by its SHA1 (EVALSHA), loading it with EVAL only when the server does not have
 * it yet (NOSCRIPT: a restart, a failover, another cluster node). EVAL sends and hashes the whole
 * script on every call, which on the rate limiter's one-call-per-request path cost as much as the
 * script itself.
 */
export function evalScript(client: RedisConnection, script: string, keys: readonly string[], args: readonly string[]): Promise<unknown> {
  return run(client, script, keys, args, false);
}

/** A script that only reads: as written, and with the `no-writes` flag for servers that take flags. */
export interface ReadScript {
  readonly plain: string;
  readonly flagged: string;
}

export function readScript(body: string): ReadScript {
  return Object.freeze({ plain: body, flagged: `#!lua flags=no-writes\n${body}` });
}

/**
 * Run a script that only reads. Redis takes a script without flags for one that may write: during
 * a write pause (`CLIENT PAUSE WRITE`, which FAILOVER and managed failovers issue) it holds the
 * call until the pause ends, past the command timeout, so a read failed as if Redis were down.
 * On Redis 7 and later the script carries `#!lua flags=no-writes` and goes by EVALSHA_RO / EVAL_RO,
 * which are never held: an EVALSHA of a script the server does not have yet (after a restart or a
 * failover) is judged before the script is found, as a possible write, and held until the pause
 * ends only to answer NOSCRIPT. Older servers reject the flag line and lack the *_RO commands:
 * they get the script as written, as before.
 */
export async function evalReadScript(client: RedisConnection, script: ReadScript, keys: readonly string[], args: readonly string[]): Promise<unknown> {
  if (await takesScriptFlags(client)) {
    try {
      return await run(client, script.flagged, keys, args, true);
    } catch (err) {
      // A server that says it is Redis 7 and refuses the *_RO commands: in a Cluster, HELLO may
      // reach an upgraded node while the store's slot is on one not upgraded yet; an ACL may list
      // the commands the store used before. The script as written reads as it did then, on this
      // connection until it reconnects.
      if (!refusedCommand(err)) throw err;
      scriptFlags.set(client, Promise.resolve(false));
    }
  }
  return run(client, script.plain, keys, args, false);
}

/** The server does not know the command (renamed away, too old) or the user may not run it. */
function refusedCommand(err: unknown): boolean {
  return err instanceof Error && err.name === 'ReplyError' && (err.message.startsWith('ERR unknown command') || err.message.startsWith('NOPERM'));
}

async function run(client: RedisConnection, script: string, keys: readonly string[], args: readonly string[], readOnly: boolean): Promise<unknown> {
  let sha = scriptShas.get(script);
  if (!sha) {
    sha = createHash('sha1').update(script, 'utf8').digest('hex');
    scriptShas.set(script, sha);
  }
  try {
    return await (readOnly ? client.evalsha_ro(sha, keys.length, ...keys, ...args) : client.evalsha(sha, keys.length, ...keys, ...args));
  } catch (err) {
    if (!(err instanceof Error) || !err.message.startsWith('NOSCRIPT')) throw err;
    return readOnly ? client.eval_ro(script, keys.length, ...keys, ...args) : client.eval(script, keys.length, ...keys, ...args);
  }
}

/** Per connection: whether its server takes script flags. Forgotten when it reconnects, which may reach another server. */
const scriptFlags = new WeakMap<RedisConnection, Promise<boolean>>();
const forgetOnReconnect = new WeakSet<RedisConnection>();

/**
 * Whether the server takes script flags (Redis 7 and later), asked once per connection with HELLO,
 * whose reply carries the server's version and which every user may send (INFO needs @dangerous).
 * A server that refuses HELLO is older: Redis 5 has none, 6.0 wants the protocol version.
 * A connection that did not answer is asked again on the next read.
 */
export function takesScriptFlags(client: RedisConnection): Promise<boolean> {
  let known = scriptFlags.get(client);
  if (known) return known;
  if (!forgetOnReconnect.has(client)) {
    forgetOnReconnect.add(client);
    client.on('ready', () => scriptFlags.delete(client));
  }
  known = client.hello().then(
    (reply) => serverMajorVersion(reply) >= 7,
    (err: unknown) => {
      if (err instanceof Error && err.name === 'ReplyError') return false;
      scriptFlags.delete(client);
      throw err;
    },
  );
  scriptFlags.set(client, known);
  return known;
}

/** The major version in a HELLO reply (`['server', 'redis', 'version', '7.0.15', …]`); 0 when it has none. */
export function serverMajorVersion(reply: unknown): number {
  if (!Array.isArray(reply)) return 0;
  const at = reply.indexOf('version');
  const major = at === -1 ? NaN : parseInt(String(reply[at + 1]), 10);
  return Number.isInteger(major) ? major : 0;
}

export interface RedisSpec {
  /** The URL with any password masked: safe to log. */
  readonly description: string;
  connect(): RedisConnection;
}

const COMMON: RedisOptions = {
  enableOfflineQueue: false,
  maxRetriesPerRequest: 0,
  commandTimeout: REDIS_LIMITS.commandTimeoutMs,
  connectTimeout: REDIS_LIMITS.connectTimeoutMs,
  retryStrategy: (times: number) => Math.min(100 * 2 ** Math.min(times, 5), REDIS_LIMITS.maxReconnectDelayMs),
  // After a failover the old primary answers READONLY: reconnect, and Sentinel finds the new one.
  reconnectOnError: (err: Error) => err.message.startsWith('READONLY'),
  lazyConnect: false,
  // The rate limiter already sends the checks that arrive together as one script call per route;
  // ioredis's auto-pipelining wrapped each of those calls in a pipeline of one, and turning it off
  // gave 1.07-1.10x the requests through a Redis-store proxy (paired runs, 10 connections).
  enableAutoPipelining: false,
};

/**
 * The query parameters each form takes. Any other is refused rather than ignored: `?tls=1` or
 * `?ssl=true` connected in the clear (password and ciphertext with it), a misspelt `password_file`
 * connected without the password, and `?db=5` on redis:// used database 0. Named in the message,
 * never quoted with its value (which may be a password in a URL written the wrong way).
 */
const PARAMS: Readonly<Record<string, readonly string[]>> = {
  redis: ['password_file', 'tls'],
  rediss: ['password_file', 'tls'],
  'redis-sentinel': ['password_file', 'sentinel_password_file', 'tls', 'db'],
  'redis-cluster': ['password_file', 'tls'],
};

function checkParams(scheme: string, params: URLSearchParams, path: string | undefined): void {
  for (const name of new Set(params.keys())) {
    const printable = /^[a-z_]{1,32}$/i.test(name) ? `"${name}"` : 'a parameter';
    if (!PARAMS[scheme]!.includes(name)) {
      const hint = name === 'db' ? ` (give the database as the path: ${scheme}://host:6379/N)` : '';
      throw new UserError(`EGRESS_STORE has ${printable}, which a ${scheme}:// URL does not take${hint}; it takes ${PARAMS[scheme]!.join(', ')}`, 2);
    }
    if (params.getAll(name).length > 1) throw new UserError(`EGRESS_STORE gives ${printable} more than once`, 2);
  }
  const tls = params.get('tls');
  if (tls !== null && tls !== 'true' && tls !== 'false') throw new UserError('EGRESS_STORE "tls" is true or false', 2);
  if (tls === 'false' && scheme === 'rediss') throw new UserError('EGRESS_STORE is rediss:// (always TLS) with "tls" false: use redis:// for a connection in the clear', 2);
  // A Cluster has database 0 only; the path was ignored, and the store went to database 0.
  if (scheme === 'redis-cluster' && path !== undefined && path !== '/' && path !== '/0') throw new UserError('EGRESS_STORE: a redis-cluster:// URL names no database (a Cluster has database 0 only)', 2);
}

/** Redis's TIME reply ([seconds, microseconds]) as epoch milliseconds, fraction included. */
export function timeMs(reply: readonly (string | number)[]): number {
  return Number(reply[0]) * 1000 + Number(reply[1]) / 1000;
}

/** Redis's answer to SELECT of a database it does not have (Redis 6 and later; older ones). */
export const SELECT_REFUSED = /^ERR (DB index is out of range|invalid DB index)/;

/**
 * ioredis reports a refused SELECT (a database number the server does not have) as an error event
 * and goes on in database 0, another store's: the connection is dropped before it is ready (it
 * reconnects, and is refused again), so nothing is read or written there. On every connection
 * made from EGRESS_STORE: the store's, its subscriber's, the rate limiter's.
 */
function refuseMissingDatabase(client: Redis): Redis {
  client.on('error', (err: Error) => {
    if (SELECT_REFUSED.test(err.message)) client.disconnect(true);
  });
  return client;
}

/** The password in the file a parameter names (a trailing newline is not part of it), if the URL has the parameter. */
function readPasswordFile(params: URLSearchParams, name: 'password_file' | 'sentinel_password_file'): string | undefined {
  const path = params.get(name);
  if (!path) return undefined;
  let password: string;
  try {
    password = readFileSync(path, 'utf8').trim();
  } catch (err) {
    throw new UserError(`EGRESS_STORE ${name} ${path} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  // A secret mounted empty connected with no password at all, and Redis answered NOAUTH.
  if (!password) throw new UserError(`EGRESS_STORE ${name} ${path} is empty`);
  return password;
}

/**
 * `redis://[:password@]host:port[/db]`, `rediss://…` (TLS),
 * `redis-sentinel://[:password@]host:port,host:port/<master name>[?db=N]`,
 * `redis-cluster://[:password@]host:port,host:port`. `?password_file=PATH` reads the password from a
 * file instead of the URL; `?tls=true` connects over TLS. With Sentinel, the password is the
 * primary's (and its replicas'); `?sentinel_password_file=PATH` gives the sentinels' own
 * (their `requirepass`), which ioredis otherwise never sends them.
 */
export function parseRedisUrl(spec: string): RedisSpec {
  // The userinfo runs to the last "@": a password is often base64 ("/", "+") and is not always
  // percent-encoded, and no host, database number or master name holds an "@". Cut at the first
  // "/" instead, a password's tail became the host and its head was quoted in errors and logs.
  const match = /^(redis|rediss|redis-sentinel|redis-cluster):\/\/(?:(.*)@)?([^/?@]+)(\/[^?@]*)?(?:\?([^@]*))?$/.exec(spec);
  if (!match) throw new UserError('EGRESS_STORE is not a Redis URL like redis://host:6379/0', 2);
  const [, scheme, userinfo, hostList, path, query] = match;
  const params = new URLSearchParams(query ?? '');
  checkParams(scheme!, params, path);
  let username: string | undefined;
  let password: string | undefined;
  if (userinfo) {
    const colon = userinfo.indexOf(':');
    username = decodeUserinfo(colon === -1 ? userinfo : userinfo.slice(0, colon), 'EGRESS_STORE') || undefined;
    password = colon === -1 ? undefined : decodeUserinfo(userinfo.slice(colon + 1), 'EGRESS_STORE');
  }
  password = readPasswordFile(params, 'password_file') ?? password;
  const hosts = hostList!.split(',').map((h) => {
    const m = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(h);
    // Not quoted: in a URL that does not parse, what looks like a host may be part of the password.
    const port = Number(m?.[2] ?? (scheme === 'redis-sentinel' ? 26379 : 6379));
    // A port out of range was accepted here and failed every connection attempt (ERR_SOCKET_BAD_PORT) of a proxy that started anyway.
    if (!m || !(port >= 1 && port <= 65535)) throw new UserError('EGRESS_STORE has a bad host: give HOST:PORT (port 1-65535), or HOST:PORT,HOST:PORT for Sentinel and Cluster', 2);
    return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
  });
  // Digits only: Number() also took "1e1" and "0x1" for databases 10 and 1.
  const dbText = scheme === 'redis-sentinel' ? (params.get('db') ?? '0') : (path?.slice(1) || '0');
  if (!/^\d{1,9}$/.test(dbText)) throw new UserError('EGRESS_STORE database number must be a whole number', 2);
  const db = Number(dbText);
  const auth = { ...(username ? { username } : {}), ...(password ? { password } : {}) };
  const description = `${scheme}://${password ? `${username ?? ''}:***@` : ''}${hostList}${path ?? ''}`;
  const tls = scheme === 'rediss' || params.get('tls') === 'true' ? { tls: {} } : {};

  switch (scheme) {
    case 'redis':
    case 'rediss':
      if (hosts.length !== 1) throw new UserError('a redis:// URL names one host; use redis-sentinel:// or redis-cluster:// for several');
      return { description, connect: () => refuseMissingDatabase(new (ioredis().Redis)({ ...COMMON, ...auth, ...tls, host: hosts[0]!.host, port: hosts[0]!.port, db })) };
    case 'redis-sentinel': {
      const name = path?.slice(1);
      if (!name) throw new UserError('redis-sentinel:// needs the master name as its path: redis-sentinel://h1:26379,h2:26379/mymaster');
      // ioredis takes `tls` in Sentinel mode for nothing unless told: the primary was reached in the
      // clear, and the sentinels always were. With TLS asked for, both go over TLS.
      const sentinelTls = 'tls' in tls ? { enableTLSForSentinelMode: true, sentinelTLS: {} } : {};
      const sentinelPassword = readPasswordFile(params, 'sentinel_password_file');
      const sentinelAuth = sentinelPassword ? { sentinelPassword } : {};
      // A sentinel that takes the connection and never answers (a hung host) held the connection
      // for good without a bound of its own: the next sentinel was never asked.
      return { description, connect: () => refuseMissingDatabase(new (ioredis().Redis)({ ...COMMON, ...auth, ...tls, ...sentinelTls, ...sentinelAuth, sentinelCommandTimeout: REDIS_LIMITS.commandTimeoutMs, sentinels: hosts, name, db })) };
    }
    default: {
      const options: ClusterOptions = { enableOfflineQueue: false, enableAutoPipelining: false, redisOptions: { ...COMMON, ...auth, ...tls }, clusterRetryStrategy: COMMON.retryStrategy };
      return { description, connect: () => new (ioredis().Cluster)(hosts, options) };
    }
  }
}

