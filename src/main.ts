import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Server } from 'node:http';
import type { DestinationStream } from 'pino';
import { RouteReloader } from './config/reloader.ts';
import { loadRoutes } from './config/load-routes.ts';
import type { Settings } from './config/settings.ts';
import { SETTINGS } from './config/settings.ts';
import { UserError } from './errors.ts';
import { Alerts } from './observe/alerts.ts';
import { CallerSlots } from './pipeline/in-flight.ts';
import { Drain } from './pipeline/connection-state.ts';
import { Activity } from './observe/activity.ts';
import { AlertRules } from './observe/alert-rules.ts';
import { RouteCredentialCheck } from './observe/route-credentials.ts';
import { loadAlertSettings } from './observe/alert-settings.ts';
import { WebhookSink } from './observe/webhook.ts';
import { readFile, stat } from 'node:fs/promises';
import { UsageTracker } from './observe/usage.ts';
import { AuditLog } from './observe/audit.ts';
import { lockAuditLog, type AuditLock } from './observe/audit-lock.ts';
import { createLogger, type Logger } from './observe/log.ts';
import { Metrics } from './observe/metrics.ts';
import { Dispatchers } from './pipeline/dispatchers.ts';
import { MemoryRateLimiter, type RateLimiter } from './pipeline/rate-limiter.ts';
import { RedisRateLimiter } from './pipeline/redis-rate-limiter.ts';
import { MemoryNonces, RedisNonces } from './pipeline/nonces.ts';
import { SharedTokens } from './pipeline/shared-tokens.ts';
import { TokenBroker } from './pipeline/token-broker.ts';
import { RedisStore } from './store/redis-store.ts';
import type { Services } from './pipeline/services.ts';
import { createAdminServer } from './server/admin.ts';
import { ConnectionCap } from './server/connection-cap.ts';
import { createReverseServer } from './server/reverse.ts';
import { createForwardHandler } from './server/forward.ts';
import { CA_FILES, LeafMinter, readCa } from './certs/ca.ts';
import { createTlsServer, type TlsListener } from './server/tls.ts';
import { ListenerFilesReloader } from './server/tls-files.ts';
import { join } from 'node:path';
import { FileStore } from './store/file-store.ts';
import { createKeyring, readKeyring, type Keyring } from './store/keyring.ts';
import { openStore } from './store/open-store.ts';
import { StoreView } from './store/store-view.ts';
import type { StoreSnapshot } from './store/types.ts';
import { laterIncarnation } from './store/records.ts';
import { GraceSweeper } from './rotation/sweeper.ts';
import { auditHistory } from './rotation/history-audit.ts';
import { hostname } from 'node:os';
import { KeyringFile } from './store/keyring-file.ts';

export interface RunningProxy {
  readonly proxyAddress: AddressInfo;
  /** The TLS listener's address, when EGRESS_TLS_LISTEN is set. */
  readonly tlsAddress: AddressInfo | undefined;
  /** Forward mode's leaf minter, when the CA exists (which hosts have leaves). */
  readonly minter: LeafMinter | undefined;
  readonly adminAddress: AddressInfo;
  readonly services: Services;
  readonly routes: RouteReloader;
  /** The TLS listener's certificate, key and client CAs, when EGRESS_TLS_LISTEN is set (reloaded on change and SIGHUP). */
  readonly tlsFiles: ListenerFilesReloader | undefined;
  /** Stop accepting, let in-flight requests finish (up to `deadlineMs`), then release everything. */
  close(deadlineMs?: number): Promise<void>;
}

export interface StartOptions {
  readonly logDestination?: DestinationStream;
  /**
   * Hold `<audit log>.lock` while running and refuse to start when another live process holds it
   * (`egress serve` does; in-process test proxies may share a file knowingly).
   */
  readonly lockAuditLog?: boolean;
}

/** Composition root: settings -> keyring -> store -> routes -> listeners. */
export async function startProxy(settings: Settings, options: StartOptions = {}): Promise<RunningProxy> {
  const log = createLogger(settings.logLevel, options.logDestination);
  const backend = openStore(settings.store);
  const keyring = await openKeyring(settings, backend instanceof FileStore ? backend : undefined, log);
  const alertSettings = await loadAlertSettings(settings.alertsFile);
  const metrics = new Metrics();
  const webhook = settings.alertWebhook ? new WebhookSink(settings.alertWebhook, await readWebhookSecret(settings.alertWebhookSecretFile), log) : undefined;
  const alerts = new Alerts(log, metrics, alertSettings.cooldown, webhook);
  const rules = new AlertRules(alerts, alertSettings);

  const keys = new KeyringFile(settings.masterKeyFile, keyring, log, (reason) =>
    alerts.raise('reload_rejected', 'critical', 'keyring', 'the master key file changed but cannot be used; the keyring loaded before stays in use', { master_key_file: settings.masterKeyFile, reason }));
  await keys.start();
  const store = new StoreView(backend, log, { maxStaleMs: settings.storeMaxStaleMs, alerts, onError: () => metrics.storeErrors.inc() });
  const initial = await loadRoutes(settings.routesDir);
  const dispatchers = new Dispatchers();
  const auditLock = options.lockAuditLog ? await takeAuditLock(settings.auditLog, log) : undefined;
  const audit = new AuditLog(settings.auditLog, log, {
    maxBytes: settings.auditMaxBytes,
    keep: settings.auditKeep,
    alsoStdout: settings.auditStdout,
    onFailure: (message, facts) => alerts.raise('audit_write_failed', 'critical', settings.auditLog, message, facts),
  });
  await audit.open();
  const sweeper = new GraceSweeper(backend, log, metrics, `proxy:${hostname()}:${process.pid}`, () => void store.refresh());
  // OAuth2 tokens are shared by every instance through Redis when the store is Redis.
  const tokens = new TokenBroker(log, backend instanceof RedisStore ? new SharedTokens(backend.client, keys) : undefined);
  store.onChange((previous, next) => {
    auditHistory(audit, previous, next);
    sweeper.schedule(next);
    for (const id of recreatedCredentials(previous, next)) {
      dispatchers.forgetCredential(id);
      tokens.forgetCredential(id);
    }
    // A version revoked or retired since loses its TLS pools and the tokens minted with it.
    const live = liveVersions(next);
    dispatchers.retainVersions(live);
    tokens.retainVersions(live);
  });
  await store.start();
  if (backend instanceof RedisStore) {
    backend.onEvictionRisk((policy) => alerts.raise('store_evicts', 'critical', backend.description, 'Redis may evict the store\'s records under memory pressure (maxmemory-policy allkeys-*): set noeviction or a volatile-* policy', { store: backend.description, maxmemory_policy: policy }));
  }
  // Limits are shared through Redis when the store is Redis (several instances), in memory otherwise.
  const limiter: RateLimiter = backend instanceof RedisStore ? new RedisRateLimiter(backend.client, backend.connectAgain(), log, { alerts, redis: backend.description }) : new MemoryRateLimiter();
  await limiter.start?.();
  const usage = new UsageTracker(backend, log);
  usage.start();
  const nonces = backend instanceof RedisStore ? new RedisNonces(backend.client) : new MemoryNonces();
  const activity = new Activity();
  const services: Services = { store, keys, dispatchers, limiter, slots: new CallerSlots(settings.callerMaxInFlight), nonces, tokens, audit, metrics, rules, usage, activity, log, drain: new Drain() };
  metrics.bindStore(store);
  metrics.bindInFlight(() => services.drain.handling);
  const ageCheck = setInterval(() => rules.checkCredentials(store.snapshot()), 60_000);
  ageCheck.unref();
  rules.checkCredentials(store.snapshot());

  // Routes whose credential cannot serve them load (the store may be filled later), and are said
  // when the routes or the store change: at start, after a reload, after a store change.
  const credentialCheck = new RouteCredentialCheck(log, alerts);
  const routes = new RouteReloader(settings.routesDir, initial, log, (config, ok) => {
    metrics.reloads.inc({ result: ok ? 'ok' : 'rejected' });
    metrics.routesLoaded.set(config.routes.length);
    if (ok) {
      dispatchers.retain(config);
      credentialCheck.check(config.routes, store.snapshot());
    } else alerts.raise('reload_rejected', 'warning', 'routes', 'a route reload was rejected; the last good configuration stays live', { routes_dir: settings.routesDir });
  });
  metrics.routesLoaded.set(initial.routes.length);
  credentialCheck.check(initial.routes, store.snapshot());
  store.onChange((_previous, next) => credentialCheck.check(routes.config.routes, next));
  routes.watch();

  // Forward mode is on when the CA exists (egress certs init).
  const ca = await readCa(settings.certsDir);
  const minter = ca ? new LeafMinter(ca) : undefined;
  const forward = minter ? createForwardHandler(() => routes.config, services, minter, { connectRate: settings.callerConnectRate }) : undefined;
  const proxy = createReverseServer(() => routes.config, services, forward?.onConnect);
  let overCapLogged = 0;
  const cap = new ConnectionCap(settings.maxConnections, (listener, outcome) => {
    metrics.connectionsOverCap.inc({ listener, outcome });
    // Once a minute at most: a flood must not flood the log too.
    if (Date.now() - overCapLogged < 60_000) return;
    overCapLogged = Date.now();
    log.warn({ listener, max_connections: settings.maxConnections }, 'caller connections past EGRESS_MAX_CONNECTIONS are refused (egress_connections_over_cap_total counts them)');
  });
  cap.attach(proxy, 'plain', 'connection');
  if (ca) log.info({ certs: settings.certsDir }, 'forward mode on: CONNECT to hosts the routes name is intercepted with the CA in EGRESS_CERTS');
  const admin = createAdminServer({
    readiness: () => {
      const s = store.status();
      metrics.storeReachable.set(s.reachable ? 1 : 0);
      // Routes their credential cannot serve are listed, and leave the instance ready: the others work.
      const credentialProblems = credentialCheck.problems();
      return { ready: s.reachable && s.usable, detail: { routes: { ...routes.status(), ...(credentialProblems.length > 0 ? { credential_problems: credentialProblems } : {}) }, store: { backend: backend.description, ...s }, ...(tlsFiles ? { tls_listener: tlsFiles.status() } : {}) } };
    },
  }, metrics, { store, keys, audit, rules, routes: () => routes.config.routes }, { store, alerts, activity, routes: () => routes.config, credentialProblems: () => credentialCheck.problems() });

  // The TLS listener: callers by client certificate (issued by EGRESS_CLIENT_CA, default the forward-mode CA) or token.
  let tls: TlsListener | undefined;
  let tlsFiles: ListenerFilesReloader | undefined;
  if (settings.tlsListen) {
    const paths = { cert: settings.tlsCert!, key: settings.tlsKey!, clientCa: settings.clientCa ?? join(settings.certsDir, CA_FILES.cert) };
    // Renewed files are taken up while running; one that cannot be used leaves the last good ones in use.
    tlsFiles = new ListenerFilesReloader(paths, log, (files) => tls?.use(files), (reason) =>
      alerts.raise('reload_rejected', 'critical', 'tls_listener', 'a TLS listener file changed but cannot be used; the last good certificate, key and client CAs stay in use', { tls_cert: paths.cert, tls_key: paths.key, client_ca: paths.clientCa, reason }));
    tls = await createTlsServer({
      files: await tlsFiles.load(),
      certsDir: settings.certsDir,
      onRevocationsDamaged: (reason) => alerts.raise('reload_rejected', 'critical', 'revocations', 'the caller certificate revocation list cannot be read; the last good list stays in force', { certs: settings.certsDir, reason }),
    }, () => routes.config, services);
    tlsFiles.watch();
    cap.attach(tls.server, 'tls', 'secureConnection');
    await listen(tls.server, settings.tlsListen.host, settings.tlsListen.port, 'EGRESS_TLS_LISTEN', settings.reusePort);
  }
  // Node hands over the socket of a CONNECT or an upgrade (one pipelined behind a request in flight
  // waits there to be answered): it is no longer a connection closeAllConnections sees, and one left
  // open held the drain past its deadline, as long as the request before it took.
  const handedOver = new Set<Duplex>();
  const noteHandover = (_req: unknown, socket: Duplex) => {
    handedOver.add(socket);
    socket.once('close', () => handedOver.delete(socket));
  };
  // Only beside a listener already there: with none, Node does not hand the socket over at all.
  for (const server of [proxy, admin, ...(tls ? [tls.server] : [])]) {
    for (const event of ['connect', 'upgrade']) if (server.listenerCount(event) > 0) server.on(event, noteHandover);
  }
  await listen(proxy, settings.listen.host, settings.listen.port, 'EGRESS_LISTEN', settings.reusePort);
  // The admin listener is never shared: each instance has its own (/metrics and /readyz are per process).
  await listen(admin, settings.adminListen.host, settings.adminListen.port, 'EGRESS_ADMIN_LISTEN', false);
  const proxyAddress = proxy.address() as AddressInfo;
  const adminAddress = admin.address() as AddressInfo;
  log.info({ listen: `${proxyAddress.address}:${proxyAddress.port}`, ...(settings.reusePort ? { reuse_port: true } : {}), admin: `${adminAddress.address}:${adminAddress.port}`, routes: initial.routes.length, store: backend.description }, 'egress-proxy listening');

  let closing: Promise<void> | undefined;
  const close = (deadlineMs = 10_000): Promise<void> => {
    closing ??= (async () => {
      routes.close();
      tlsFiles?.close();
      keys.close();
      sweeper.close();
      clearInterval(ageCheck);
      tls?.close();
      forward?.refuseNew();
      services.drain.draining = true;
      const drained = Promise.all([closeServer(proxy), closeServer(admin), ...(tls ? [closeServer(tls.server)] : [])]);
      // Keep-alive connections become idle as their last response ends: close each as it does.
      const sweep = setInterval(() => {
        proxy.closeIdleConnections();
        forward?.closeIdleConnections();
        admin.closeIdleConnections();
        tls?.server.closeIdleConnections();
      }, 50);
      const timer = setTimeout(() => {
        log.warn('drain deadline passed; closing the remaining connections');
        proxy.closeAllConnections();
        forward?.closeAllConnections();
        admin.closeAllConnections();
        tls?.server.closeAllConnections();
        for (const socket of handedOver) socket.destroy();
      }, deadlineMs);
      timer.unref();
      await drained;
      clearTimeout(timer);
      clearInterval(sweep);
      // Requests cut at the deadline are still ending (their audit lines unwritten) as the last
      // connection closes; one still running a second later waits on an upstream or the store.
      const unfinished = await services.drain.settled(1_000);
      if (unfinished > 0) log.warn({ requests: unfinished }, 'requests still being handled at exit; their audit lines are not written');
      await dispatchers.close();
      await usage.close();
      await limiter.close?.();
      await store.close();
      await audit.close();
      await auditLock?.release();
      await alerts.close();
      log.flush();
    })();
    return closing;
  };
  return { proxyAddress, adminAddress, minter, tlsAddress: tls ? (tls.server.address() as AddressInfo) : undefined, services, routes, tlsFiles, close };
}

/**
 * The keyring is created on a first run only: default paths and no store yet, so `npm start` works
 * on a fresh clone. Anywhere else a missing keyring is an error, never a silent new key.
 */
async function openKeyring(settings: Settings, fileStore: FileStore | undefined, log: Logger): Promise<Keyring> {
  try {
    return await readKeyring(settings.masterKeyFile);
  } catch (err) {
    const missing = err instanceof UserError && err.message.includes('does not exist');
    if (!missing || !settings.defaultPaths || !fileStore || (await fileStore.exists())) throw err;
    const keyring = await createKeyring(settings.masterKeyFile);
    log.warn({ master_key_file: SETTINGS.masterKeyFile.default }, 'first run: created a new master key file; back it up, every credential depends on it');
    return keyring;
  }
}

/** The webhook signing secret: from a file only its owner can read, never from argv or the environment. */
async function readWebhookSecret(path: string | undefined): Promise<Buffer> {
  if (!path) throw new UserError('EGRESS_ALERT_WEBHOOK needs EGRESS_ALERT_WEBHOOK_SECRET_FILE: a file (mode 0600) holding the HMAC signing secret');
  let info;
  try {
    info = await stat(path);
  } catch (err) {
    throw new UserError(`EGRESS_ALERT_WEBHOOK_SECRET_FILE ${path} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  if ((info.mode & 0o077) !== 0) throw new UserError(`EGRESS_ALERT_WEBHOOK_SECRET_FILE ${path} is readable by group or others; run "chmod 600 ${path}"`);
  const secret = Buffer.from((await readFile(path, 'utf8')).trim(), 'utf8');
  if (secret.length < 16) throw new UserError(`EGRESS_ALERT_WEBHOOK_SECRET_FILE ${path} must hold at least 16 characters`);
  return secret;
}

/** The audit log's single-writer lock; a lock that cannot be made at all (read-only folder) is logged, not fatal. */
async function takeAuditLock(auditLog: string, log: Logger): Promise<AuditLock | undefined> {
  try {
    return await lockAuditLog(auditLog);
  } catch (err) {
    if (err instanceof UserError) throw err;
    log.warn({ audit_log: auditLog, code: (err as NodeJS.ErrnoException).code }, 'cannot create the audit log lock file; the one-writer-per-file check is off');
    return undefined;
  }
}

/**
 * Listen, or fail with a UserError that says why. With `reusePort` (EGRESS_REUSE_PORT), SO_REUSEPORT:
 * other processes that also set it may listen on the same address, and the kernel spreads new
 * connections among them.
 */
async function listen(server: Server, host: string, port: number, setting: string, reusePort: boolean): Promise<void> {
  await new Promise<void>((resolveListen, reject) => {
    const onError = (err: NodeJS.ErrnoException) => {
      server.off('listening', onListening);
      const why = err.code === 'EADDRINUSE'
        ? reusePort
          ? 'address already in use (a process that did not set EGRESS_REUSE_PORT holds it, or one of another user)'
          : `address already in use (another process listens there${setting === 'EGRESS_ADMIN_LISTEN' ? '; each instance needs its own EGRESS_ADMIN_LISTEN' : '; to run several egress serve processes on one port, set EGRESS_REUSE_PORT=1 on every one of them'})`
        : `${err.code ?? 'error'}: ${err.message}`;
      reject(new UserError(`${setting}: cannot listen on ${host}:${port}: ${why}`));
    };
    const onListening = () => {
      server.off('error', onError);
      resolveListen();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen({ port, host, ...(reusePort ? { reusePort: true } : {}) });
  });
}

function closeServer(server: Server): Promise<void> {
  return new Promise((resolveClose) => server.close(() => resolveClose()));
}

/**
 * Credentials that are a later incarnation than before (created again after the store lost them):
 * their version numbers start over, so what was made with the old numbers must go.
 */
function recreatedCredentials(previous: StoreSnapshot | undefined, next: StoreSnapshot): string[] {
  return [...next.credentials].filter(([id, record]) => {
    const before = previous?.credentials.get(id);
    return before !== undefined && laterIncarnation(record, before);
  }).map(([id]) => id);
}

/** Credential versions that may still be used ("id\0version"): pending, current and previous. */
function liveVersions(snapshot: StoreSnapshot): Set<string> {
  const live = new Set<string>();
  for (const r of snapshot.credentials.values()) for (const v of r.versions) if (v.state === 'pending' || v.state === 'current' || v.state === 'previous') live.add(`${r.id}\u0000${v.version}`);
  return live;
}
