import { pino, type DestinationStream, type Logger as PinoLogger } from 'pino';

export type Logger = PinoLogger;

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

/**
 * Operational log: JSON lines on stdout. Nothing here ever receives a header map, a body or an
 * error object from the HTTP client whole; headers go through `loggableHeaders`.
 */
export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino({ level, base: { service: 'egress-proxy' }, timestamp: pino.stdTimeFunctions.isoTime }, destination ?? pino.destination({ fd: 1, sync: false }));
}

// Headers that are safe to log: none carries a credential or a caller token.
const LOGGABLE_HEADERS = new Set(['content-type', 'content-length', 'user-agent', 'accept', 'accept-encoding', 'x-request-id', 'retry-after', 'location']);

export function loggableHeaders(headers: Record<string, string | string[] | undefined>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined && LOGGABLE_HEADERS.has(name.toLowerCase())) out[name.toLowerCase()] = Array.isArray(value) ? value.join(', ') : value;
  }
  return out;
}
