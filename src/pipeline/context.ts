import type { IncomingMessage, ServerResponse } from 'node:http';
import type { CompiledConfig, CompiledRoute, CompiledRule } from '../config/compile-routes.ts';
import type { OutboundRequest, ResolvedCredential } from '../injectors/types.ts';
import type { CredentialVersionRecord } from '../store/records.ts';
import type { Decision } from '../observe/audit.ts';
import type { Services } from './services.ts';
import type { FetchedToken } from './token-broker.ts';
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
  /** The caller's address, read at arrival: the socket can be gone by the time the request ends. */
  readonly remote: string;
  /**
   * Set for a forward-mode request: inside a tunnel, the CONNECT host and the tunnel's caller token;
   * in absolute form (`GET http://host/path`, no tunnel), the target's host, its path and query as
   * sent (rawTarget), and the token of Proxy-Authorization, if one came.
   */
  readonly forward?: { readonly host: string; readonly port: number; readonly token: string | undefined; readonly rawTarget?: string };
  /** On the TLS listener: the caller a client certificate names, or why it was refused. */
  readonly certificate?: { readonly caller?: string; readonly refused?: string; readonly notBefore?: number };
  /** The caller was identified by its certificate (not a token). */
  viaCertificate?: boolean;
  target?: Target;
  caller?: string;
  /** Refused for presenting no token and no Proxy-Authorization at all (not counted as an unknown token). */
  anonymous?: boolean;
  route?: CompiledRoute;
  /** The path relative to the route prefix: what rules match and what follows the upstream base path. */
  relativeSegments?: readonly string[];
  rule?: CompiledRule;
  credential?: ResolvedCredential;
  /** The previous version, inside its grace window: what a replay-safe request may fall back to. */
  previous?: CredentialVersionRecord;
  /** The request may be sent twice (GET/HEAD, listed replay-safe, or carrying the route's idempotency key once) and a previous version exists: its body is buffered. */
  replayable?: boolean;
  /** The inbound body, when it had to be buffered (an injector needs it, or the request is replayable). */
  body?: Buffer;
  /** Set when the response came from a second try with the previous version. */
  fellBack?: boolean;
  outbound?: OutboundRequest;
  /** The tokens the outbound request carries (an OAuth2 access token), with their keys: dropped if the upstream refuses it. */
  fetched?: readonly FetchedToken[];
  /** Every value that went upstream as a credential, as the redactor's needles (needlesOf): redacted if the upstream echoes it. */
  readonly redactions: string[];
  upstreamStatus?: number;
  /** Milliseconds from sending upstream to its response headers. */
  upstreamMs?: number;
  /** The request holds one of its caller's in-flight slots (released when it is recorded). */
  holdsSlot: boolean;
  decision: Decision;
  reason: string;
}

export type Step = (ctx: RequestContext) => void | Promise<void>;
