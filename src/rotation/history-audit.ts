import type { AuditLog } from '../observe/audit.ts';
import { compareCopies, type CallerRecord, type CredentialRecord, type HistoryEntry } from '../store/records.ts';
import type { StoreSnapshot } from '../store/types.ts';

/**
 * Every change to a credential, caller or admin token carries a history entry with its actor, made
 * by whoever changed it (CLI, admin API, a grace sweep). Each running instance writes the entries
 * it had not seen into its own audit log, so every change is audited wherever it was made.
 */
export function auditHistory(audit: AuditLog, previous: StoreSnapshot | undefined, next: StoreSnapshot): void {
  if (!previous) return; // Changes from before this instance started are not re-audited.
  const tables: [string, ReadonlyMap<string, CredentialRecord | CallerRecord>, ReadonlyMap<string, CredentialRecord | CallerRecord>][] = [
    ['credential', previous.credentials, next.credentials],
    ['caller', previous.callers, next.callers],
    ['admin', previous.admins, next.admins],
  ];
  for (const [kind, before, after] of tables) {
    for (const [key, record] of after) {
      const old = before.get(key);
      // A record created again after the store lost it starts over at revision 1: a later
      // incarnation, whose history is new even at a revision already seen.
      if (old && compareCopies(record, old) <= 0) continue;
      for (const entry of newEntries(old?.history ?? [], record.history ?? [])) {
        audit.admin({
          actor: entry.actor,
          action: `${kind}.${entry.action}`,
          target: entry.version !== undefined ? `${kind}:${key}@v${entry.version}` : `${kind}:${key}`,
          decision: 'allow',
          reason: entry.detail ?? 'changed',
        });
      }
    }
  }
}

function newEntries(before: readonly HistoryEntry[], after: readonly HistoryEntry[]): readonly HistoryEntry[] {
  const last = before.at(-1);
  if (!last) return after;
  const key = JSON.stringify(last);
  const i = after.findIndex((e) => JSON.stringify(e) === key);
  return i === -1 ? after : after.slice(i + 1);
}
