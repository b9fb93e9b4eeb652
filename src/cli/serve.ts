import { startProxy } from '../main.ts';
import { maxArgs, parse } from './io.ts';

/** `egress serve`: run the proxy until SIGTERM/SIGINT; SIGHUP reloads the route folder. */
export async function serve(args: readonly string[]): Promise<number> {
  const p = parse(args);
  maxArgs(p.positionals, 0, 'usage: egress serve [--listen HOST:PORT] [--admin-listen HOST:PORT] [--routes DIR] [--store URL] …');
  const proxy = await startProxy(p.settings());
  const log = proxy.services.log;
  process.on('SIGHUP', () => void proxy.routes.reload('SIGHUP'));
  return new Promise((resolveExit) => {
    const stop = (signal: string) => {
      log.info({ signal }, 'draining and shutting down');
      void proxy.close().then(() => resolveExit(0));
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}
