import type { Keyring } from '../store/keyring.ts';
import type { StoreView } from '../store/store-view.ts';
import type { AuditLog } from '../observe/audit.ts';
import type { Logger } from '../observe/log.ts';
import type { Metrics } from '../observe/metrics.ts';
import type { Dispatchers } from './dispatchers.ts';
import type { RateLimiter } from './rate-limiter.ts';

/** Long-lived collaborators the steps use: built once in main.ts. */
export interface Services {
  readonly store: StoreView;
  readonly keyring: Keyring;
  readonly dispatchers: Dispatchers;
  readonly limiter: RateLimiter;
  readonly audit: AuditLog;
  readonly metrics: Metrics;
  readonly log: Logger;
}
