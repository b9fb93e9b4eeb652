import type { IncomingMessage, ServerResponse } from 'node:http';
import type { CompiledConfig, CompiledRoute, CompiledRule } from '../config/compile-routes.ts';
import type { OutboundRequest, ResolvedCredential } from '../injectors/types.ts';
import type { Decision } from '../observe/audit.ts';
import type { Services } from './services.ts';
import type { Target } from './target.ts';

/** One request's state as it moves through the steps. Steps read and write it; nothing else does. */
export interface RequestContext {
  readonly id: string;
  readonly req: IncomingMessage;
  readonly res: ServerResponse;
  /** The configuration live when the request arrived; a reload never changes it mid-request. */
  readonly config: CompiledConfig;
  readonly services: Services;
  /** performance.now() at arrival. */
  readonly startedAt: number;
  target?: Target;
  caller?: string;
  route?: CompiledRoute;
  /** The path relative to the route prefix: what rules match and what follows the upstream base path. */
  relativeSegments?: readonly string[];
  rule?: CompiledRule;
  credential?: ResolvedCredential;
  outbound?: OutboundRequest;
  /** Every value that went upstream as a credential: redacted if the upstream echoes it. */
  readonly redactions: string[];
  upstreamStatus?: number;
  /** Milliseconds from sending upstream to its response headers. */
  upstreamMs?: number;
  decision: Decision;
  reason: string;
}

export type Step = (ctx: RequestContext) => void | Promise<void>;
