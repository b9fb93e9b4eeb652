import { UserError } from '../errors.ts';

/**
 * A user name or password as written in a URL (EGRESS_STORE, EGRESS_ALERT_WEBHOOK), its
 * %-escapes decoded. A malformed escape is refused (exit 2) without quoting the text, which may be
 * a password: a "%" of the password itself is written %25.
 */
export function decodeUserinfo(text: string, setting: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new UserError(`${setting} has a malformed %-escape in its user name or password (write "%" as %25)`, 2);
  }
}
