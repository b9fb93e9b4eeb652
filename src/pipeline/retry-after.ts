import { MAX_PAUSE_MS } from './rate-limiter.ts';

/**
 * Retry-After as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), capped at MAX_PAUSE_MS (an hour);
 * 0 when absent or unusable. Sent more than once (two field lines, or one line `120, 120`, which a
 * CDN or middleware in front of the provider may add to the provider's own), it is not a valid field,
 * but the provider did ask for a pause: when every value reads, the largest is honoured, as the
 * quota behind it is shared. When one does not, there is no telling what was meant: no pause.
 */
export function retryAfterMs(value: string | readonly string[] | undefined, now = Date.now()): number {
  if (value === undefined) return 0;
  let longest = 0;
  for (const element of listElements(typeof value === 'string' ? [value] : value)) {
    const ms = /^\d+$/.test(element) ? Number(element) * 1000 : Date.parse(asGmt(element)) - now;
    if (Number.isNaN(ms)) return 0;
    longest = Math.max(longest, ms);
  }
  return Number.isFinite(longest) && longest > 0 ? Math.min(longest, MAX_PAUSE_MS) : 0;
}

/**
 * The elements of a comma-separated field, over all its lines, empty ones dropped (RFC 9110 §5.6.1).
 * The comma after an HTTP-date's day name (`Sun, 06 Nov 1994 ...`, `Sunday, 06-Nov-94 ...`) is
 * part of the date, not a separator.
 */
function listElements(lines: readonly string[]): string[] {
  const elements: string[] = [];
  for (const line of lines) {
    const parts = line.split(',');
    for (let i = 0; i < parts.length; i++) {
      let part = parts[i]!.trim();
      if (/^[A-Za-z]{3,9}$/.test(part) && i + 1 < parts.length) part = `${part}, ${parts[++i]!.trim()}`;
      if (part) elements.push(part);
    }
  }
  return elements;
}

/**
 * An asctime-date (`Sun Nov  6 08:49:37 1994`), the third HTTP-date form a recipient must accept
 * (RFC 9110 §5.6.7), names no zone but is GMT; Date.parse read it in the proxy's local time zone.
 */
function asGmt(date: string): string {
  const asctime = /^[A-Za-z]{3} ([A-Za-z]{3}) +(\d{1,2}) (\d{2}:\d{2}:\d{2}) (\d{4})$/.exec(date);
  return asctime ? `${asctime[2]} ${asctime[1]} ${asctime[4]} ${asctime[3]} GMT` : date;
}
