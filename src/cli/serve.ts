import { startProxy } from '../main.ts';
import { maxArgs, parse } from './io.ts';
import { UserError } from '../errors.ts';

/** `egress serve`: run the proxy until SIGTERM/SIGINT; SIGHUP reloads the route folder and the TLS listener's files. */
export async function serve(args: readonly string[]): Promise<number> {
  // The lenient parser is what request smuggling needs (RFC 9112 §11.2): never run with it.
  const flags = `${process.execArgv.join(' ')} ${process.env.NODE_OPTIONS ?? ''}`;
  if (/--insecure-http-parser\b/.test(flags)) throw new UserError('refusing to serve with --insecure-http-parser (it lets requests be smuggled past the allowlist)');
  // An inspector or a heap snapshot reads every decrypted credential (as --disable-sigusr1 keeps
  // the inspector signal off): a debugging flag left in NODE_OPTIONS must not start a proxy.
  const exposing = /(?:^|\s)(--inspect(?:-brk|-wait)?|--heapsnapshot-signal|--heapsnapshot-near-heap-limit)(?:[=\s]|$)/.exec(flags)?.[1];
  if (exposing) throw new UserError(`refusing to serve with ${exposing} (it exposes the process memory, and every decrypted credential in it)`);
  // A diagnostic report (--report-on-signal, --report-uncaught-exception, …) copies the environment,
  // and EGRESS_STORE or EGRESS_ALERT_WEBHOOK may carry a password: reports leave it out.
  process.report.excludeEnv = true;
  const p = parse(args);
  maxArgs(p.positionals, 0, 'usage: egress serve [--listen HOST:PORT] [--reuse-port true] [--admin-listen HOST:PORT] [--routes DIR] [--store URL] …');
  // The signal handlers go in before anything listens: a SIGTERM sent as soon as the listening line
  // is out (or during start-up) drains and exits 0 instead of killing the process mid-start.
  let requested: string | undefined;
  let stop = (signal: string) => {
    requested ??= signal;
  };
  // Handlers stay installed while draining: a second SIGTERM (a process-group kill under `npm start`
  // delivers one from the group and one forwarded by npm) would otherwise take the default action
  // and kill the process mid-drain, cutting in-flight requests and losing their audit lines. The
  // drain deadline bounds the exit; SIGKILL is the way to end it sooner.
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  // SIGHUP's default action ends the process (bin/egress.js ignores the signal until this point): a
  // reload signal sent while start-up is still under way (a deploy that writes a route file and
  // signals at once) is held, and run once start-up is done, as the change it announces may have
  // come after the routes were read.
  let hupDuringStart = false;
  let hup = () => {
    hupDuringStart = true;
  };
  process.on('SIGHUP', () => hup());
  let proxy;
  try {
    proxy = await startProxy(p.settings(), { lockAuditLog: true });
  } catch (err) {
    // A start-up that fails part-way (the port is taken, the audit log is another process's) may
    // leave connections open, such as a Redis client's, that would keep the process alive after the
    // error is printed: end it shortly after, with the exit code the CLI sets.
    setTimeout(() => process.exit(), 1000).unref();
    throw err;
  }
  const log = proxy.services.log;
  hup = () => {
    void proxy.routes.reload('SIGHUP');
    void proxy.tlsFiles?.reload('SIGHUP');
  };
  if (hupDuringStart) hup();
  return new Promise((resolveExit) => {
    let draining = false;
    stop = (signal: string) => {
      if (draining) return void log.info({ signal }, 'already draining; the drain deadline bounds the exit');
      draining = true;
      log.info({ signal }, 'draining and shutting down');
      void proxy.close().then(() => resolveExit(0));
    };
    if (requested) stop(requested);
  });
}
