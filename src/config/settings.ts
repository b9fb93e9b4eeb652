import { resolve } from 'node:path';
import { UserError } from '../errors.ts';
import { LOG_LEVELS } from '../observe/log.ts';
import { parseDuration, parseRate, parseSize, type Rate } from './units.ts';
import { decodeUserinfo } from './userinfo.ts';

/**
 * Process settings: each from an environment variable, or the matching `egress serve` flag
 * (EGRESS_ADMIN_LISTEN -> --admin-listen). Secrets never come from here.
 */

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

export interface Settings {
  readonly listen: HostPort;
  /**
   * Listen on the proxy (and TLS) port with SO_REUSEPORT, so several `egress serve` processes can
   * share it (the kernel spreads connections). The admin listener never shares.
   */
  readonly reusePort: boolean;
  readonly adminListen: HostPort;
  readonly tlsListen: HostPort | undefined;
  readonly tlsCert: string | undefined;
  readonly tlsKey: string | undefined;
  readonly clientCa: string | undefined;
  readonly certsDir: string;
  readonly routesDir: string;
  readonly store: string;
  readonly masterKeyFile: string;
  readonly auditLog: string;
  readonly alertWebhook: string | undefined;
  readonly alertWebhookSecretFile: string | undefined;
  readonly alertsFile: string | undefined;
  /** Rotate the audit file past this size; keep this many rotated files. */
  readonly auditMaxBytes: number;
  readonly auditKeep: number;
  /** Also write every audit line to stdout, for log shippers. */
  readonly auditStdout: boolean;
  readonly logLevel: string;
  /** How long cached credentials serve while the store cannot be read. */
  readonly storeMaxStaleMs: number;
  /** Requests of one caller being answered at once, at most; more are refused with 429. */
  readonly callerMaxInFlight: number;
  /** Caller connections of the proxy listeners together (see ConnectionCap). */
  readonly maxConnections: number;
  /** Forward-mode tunnels one caller may open, per instance (each costs the proxy a TLS handshake); the burst is the tunnels it may hold. */
  readonly callerConnectRate: Rate;
  /** True when store and master key file are both the defaults (first-run key creation applies). */
  readonly defaultPaths: boolean;
}

export const SETTINGS = {
  listen: { env: 'EGRESS_LISTEN', flag: 'listen', default: '127.0.0.1:8080' },
  reusePort: { env: 'EGRESS_REUSE_PORT', flag: 'reuse-port', default: 'false' },
  tlsListen: { env: 'EGRESS_TLS_LISTEN', flag: 'tls-listen', default: undefined },
  tlsCert: { env: 'EGRESS_TLS_CERT', flag: 'tls-cert', default: undefined },
  tlsKey: { env: 'EGRESS_TLS_KEY', flag: 'tls-key', default: undefined },
  clientCa: { env: 'EGRESS_CLIENT_CA', flag: 'client-ca', default: undefined },
  adminListen: { env: 'EGRESS_ADMIN_LISTEN', flag: 'admin-listen', default: '127.0.0.1:9090' },
  certsDir: { env: 'EGRESS_CERTS', flag: 'certs', default: './certs' },
  routesDir: { env: 'EGRESS_ROUTES', flag: 'routes', default: './routes' },
  store: { env: 'EGRESS_STORE', flag: 'store', default: 'file:./data/store.json' },
  masterKeyFile: { env: 'EGRESS_MASTER_KEY_FILE', flag: 'master-key-file', default: './data/master.key' },
  auditLog: { env: 'EGRESS_AUDIT_LOG', flag: 'audit-log', default: './data/audit.log' },
  alertWebhook: { env: 'EGRESS_ALERT_WEBHOOK', flag: 'alert-webhook', default: undefined },
  alertWebhookSecretFile: { env: 'EGRESS_ALERT_WEBHOOK_SECRET_FILE', flag: 'alert-webhook-secret-file', default: undefined },
  alertsFile: { env: 'EGRESS_ALERTS', flag: 'alerts', default: undefined },
  auditMaxSize: { env: 'EGRESS_AUDIT_MAX_SIZE', flag: 'audit-max-size', default: '100mb' },
  auditKeep: { env: 'EGRESS_AUDIT_KEEP', flag: 'audit-keep', default: '10' },
  auditStdout: { env: 'EGRESS_AUDIT_STDOUT', flag: 'audit-stdout', default: 'false' },
  logLevel: { env: 'EGRESS_LOG_LEVEL', flag: 'log-level', default: 'info' },
  storeMaxStale: { env: 'EGRESS_STORE_MAX_STALE', flag: 'store-max-stale', default: '5m' },
  // Half of an upstream's 256 connections: one caller's slow requests cannot take them all.
  callerMaxInFlight: { env: 'EGRESS_CALLER_MAX_IN_FLIGHT', flag: 'caller-max-in-flight', default: '128' },
  // Idle keep-alive connections of a few hundred callers' pools; a flood past it costs a bounded amount.
  maxConnections: { env: 'EGRESS_MAX_CONNECTIONS', flag: 'max-connections', default: '2048' },
  // A pool opens its tunnels once and keeps them; 20 handshakes a second is a client that does not.
  callerConnectRate: { env: 'EGRESS_CALLER_CONNECT_RATE', flag: 'caller-connect-rate', default: '20/s' },
} as const satisfies Record<string, { env: string; flag: string; default: string | undefined }>;

export type SettingName = keyof typeof SETTINGS;

export function parseHostPort(text: string, what: string): HostPort {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s]*)):(\d{1,5})$/.exec(text.trim());
  const port = match ? Number(match[3]) : Number.NaN;
  if (!match || port > 65_535) throw new UserError(`${what} must be HOST:PORT (got "${text}")`, 2);
  return { host: match[1] ?? (match[2] || '127.0.0.1'), port };
}

export function loadSettings(env: NodeJS.ProcessEnv, flags: Partial<Record<SettingName, string>> = {}): Settings {
  const get = (name: SettingName): string | undefined => flags[name] ?? nonEmpty(env[SETTINGS[name].env]) ?? SETTINGS[name].default;
  // Secrets never come from argv, which every user of the machine can read (ps, /proc/PID/cmdline).
  if (flags.store !== undefined && /^(?:rediss?|redis-sentinel|redis-cluster):\/\/[^@]*:[^]*@/.test(flags.store)) {
    throw new UserError('--store carries a password, and the command line is readable by every user of the machine: set EGRESS_STORE instead, or give the password with ?password_file=PATH', 2);
  }
  if (flags.alertWebhook !== undefined && URL.parse(flags.alertWebhook)?.password) {
    throw new UserError('--alert-webhook carries a password, and the command line is readable by every user of the machine: set EGRESS_ALERT_WEBHOOK instead', 2);
  }
  const tls = get('tlsListen');
  const logLevel = get('logLevel')!;
  if (!(LOG_LEVELS as readonly string[]).includes(logLevel)) throw new UserError(`EGRESS_LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')}`, 2);
  if (tls && (!get('tlsCert') || !get('tlsKey'))) throw new UserError('EGRESS_TLS_LISTEN needs EGRESS_TLS_CERT and EGRESS_TLS_KEY (the listener\'s own certificate and key files)', 2);
  const store = get('store')!;
  const masterKeyFile = resolve(get('masterKeyFile')!);
  const auditLog = get('auditLog')!;
  return {
    listen: parseHostPort(get('listen')!, 'EGRESS_LISTEN'),
    reusePort: booleanSetting(get('reusePort')!, 'EGRESS_REUSE_PORT'),
    adminListen: parseHostPort(get('adminListen')!, 'EGRESS_ADMIN_LISTEN'),
    tlsListen: tls ? parseHostPort(tls, 'EGRESS_TLS_LISTEN') : undefined,
    tlsCert: get('tlsCert'),
    tlsKey: get('tlsKey'),
    clientCa: get('clientCa'),
    certsDir: resolve(get('certsDir')!),
    routesDir: resolve(get('routesDir')!),
    store,
    masterKeyFile,
    auditLog: auditLog === '-' ? '-' : resolve(auditLog),
    alertWebhook: webhookUrl(get('alertWebhook')),
    alertWebhookSecretFile: get('alertWebhookSecretFile'),
    alertsFile: get('alertsFile'),
    auditMaxBytes: sizeSetting(get('auditMaxSize')!, 'EGRESS_AUDIT_MAX_SIZE'),
    auditKeep: countSetting(get('auditKeep')!, 'EGRESS_AUDIT_KEEP'),
    auditStdout: booleanSetting(get('auditStdout')!, 'EGRESS_AUDIT_STDOUT'),
    logLevel,
    storeMaxStaleMs: durationSetting(get('storeMaxStale')!, 'EGRESS_STORE_MAX_STALE'),
    callerMaxInFlight: countSetting(get('callerMaxInFlight')!, 'EGRESS_CALLER_MAX_IN_FLIGHT'),
    maxConnections: countSetting(get('maxConnections')!, 'EGRESS_MAX_CONNECTIONS', 100_000),
    callerConnectRate: rateSetting(get('callerConnectRate')!, 'EGRESS_CALLER_CONNECT_RATE'),
    defaultPaths: store === SETTINGS.store.default && masterKeyFile === resolve(SETTINGS.masterKeyFile.default),
  };
}

function webhookUrl(text: string | undefined): string | undefined {
  if (text === undefined) return undefined;
  let url: URL | undefined;
  try {
    url = new URL(text);
  } catch {
    // below
  }
  if (url?.protocol !== 'https:' && url?.protocol !== 'http:') throw new UserError('EGRESS_ALERT_WEBHOOK must be an http(s) URL', 2);
  // Sent as Basic credentials: a malformed escape is refused here, not at the first alert.
  decodeUserinfo(url.username, 'EGRESS_ALERT_WEBHOOK');
  decodeUserinfo(url.password, 'EGRESS_ALERT_WEBHOOK');
  return text;
}

function sizeSetting(text: string, what: string): number {
  const bytes = parseSize(text);
  if (bytes === undefined || bytes < 1024) throw new UserError(`${what} must be a size like 100mb (at least 1kb)`, 2);
  return bytes;
}

function countSetting(text: string, what: string, max = 1000): number {
  // Digits only: Number() would also take "0x10", "1e2", " 5" and "5.0".
  const n = /^\d{1,6}$/.test(text) ? Number(text) : Number.NaN;
  if (!Number.isSafeInteger(n) || n < 1 || n > max) throw new UserError(`${what} must be a whole number from 1 to ${max}`, 2);
  return n;
}

function rateSetting(text: string, what: string): Rate {
  const rate = parseRate(text);
  if (!rate) throw new UserError(`${what} must be a rate like 20/s or 600/min`, 2);
  return rate;
}

function booleanSetting(text: string, what: string): boolean {
  if (text === 'true' || text === '1') return true;
  if (text === 'false' || text === '0') return false;
  throw new UserError(`${what} must be true or false`, 2);
}

function durationSetting(text: string, what: string): number {
  const ms = parseDuration(text);
  if (ms === undefined) throw new UserError(`${what} must be a duration like 30s or 5m (got "${text}")`, 2);
  return ms;
}

function nonEmpty(value: string | undefined): string | undefined {
  return value === undefined || value === '' ? undefined : value;
}
