import type { KeyringFile } from '../store/keyring-file.ts';
import type { StoreView } from '../store/store-view.ts';
import type { AlertRules } from '../observe/alert-rules.ts';
import type { AuditLog } from '../observe/audit.ts';
import type { Logger } from '../observe/log.ts';
import type { Metrics } from '../observe/metrics.ts';
import type { UsageTracker } from '../observe/usage.ts';
import type { Activity } from '../observe/activity.ts';
import type { Drain } from './connection-state.ts';
import type { Dispatchers } from './dispatchers.ts';
import type { RateLimiter } from './rate-limiter.ts';
import type { CallerSlots } from './in-flight.ts';
import type { NonceSource } from './nonces.ts';
import type { TokenBroker } from './token-broker.ts';

/** Long-lived collaborators the steps use: built once in main.ts. */
export interface Services {
  readonly store: StoreView;
  readonly keys: KeyringFile;
  readonly dispatchers: Dispatchers;
  readonly limiter: RateLimiter;
  readonly slots: CallerSlots;
  readonly nonces: NonceSource;
  readonly tokens: TokenBroker;
  readonly audit: AuditLog;
  readonly metrics: Metrics;
  readonly rules: AlertRules;
  readonly usage: UsageTracker;
  readonly activity: Activity;
  readonly log: Logger;
  /** Set going by close(): answers from then on close their connection, and close() waits for audit lines. */
  readonly drain: Drain;
}
