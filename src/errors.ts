/**
 * Every error the proxy itself answers with comes from this one table: code -> status -> message.
 * Messages are fixed text; a `detail` may add context that we composed ourselves, never a value
 * taken from a credential, a header or a body.
 */
export const ERRORS = {
  bad_request: { status: 400, message: 'The request target or framing is not acceptable.' },
  caller_unauthenticated: { status: 401, message: 'No valid caller token or certificate was presented.' },
  route_forbidden: { status: 403, message: 'This caller may not use this route, method or path.' },
  route_not_found: { status: 404, message: 'No route owns this path.' },
  misdirected_request: { status: 421, message: 'The request is for another host than its tunnel.' },
  expectation_failed: { status: 417, message: 'The request has an Expect the proxy cannot meet; only 100-continue is supported.' },
  body_too_large: { status: 413, message: 'The request body is larger than the route allows.' },
  rate_limited: { status: 429, message: 'Rate limit reached; retry later.' },
  upstream_error: { status: 502, message: 'The upstream could not be reached or answered badly.' },
  credential_unavailable: { status: 503, message: 'No usable credential is available for this route.' },
  shutting_down: { status: 503, message: 'The proxy is shutting down.' },
  too_many_connections: { status: 503, message: 'The proxy has as many caller connections open as it serves (EGRESS_MAX_CONNECTIONS); retry when one has closed.' },
  upstream_timeout: { status: 504, message: 'The upstream did not answer within the route deadline.' },
  internal_error: { status: 500, message: 'The proxy failed to handle this request.' },
} as const;

export type ErrorCode = keyof typeof ERRORS;

export class ProxyError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly detail: string | undefined;
  /** Extra response headers (Retry-After and the like). */
  readonly headers: Readonly<Record<string, string>>;

  constructor(code: ErrorCode, detail?: string, options?: { cause?: unknown; headers?: Record<string, string>; status?: ProxyStatus }) {
    super(detail ? `${ERRORS[code].message} ${detail}` : ERRORS[code].message, { cause: options?.cause });
    this.name = 'ProxyError';
    this.code = code;
    this.status = options?.status ?? ERRORS[code].status;
    this.detail = detail;
    this.headers = options?.headers ?? {};
  }
}

/** The one status an error may take besides its table's: a proxy's own 407 (see proxyAuthRequired). */
type ProxyStatus = 407;

/** The challenge of every 407 (RFC 9110 §11.7.1): Basic, the caller token as the password. */
export const PROXY_CHALLENGE = 'Basic realm="egress-proxy"';

/**
 * caller_unauthenticated as a proxy says it (RFC 9110 §15.5.8): 407 with Proxy-Authenticate.
 * Many clients (Java's HttpURLConnection, .NET's HttpClient) send proxy credentials only after
 * this challenge; a 401 or 400 instead leaves them unable to send any.
 */
export function proxyAuthRequired(detail?: string): ProxyError {
  return new ProxyError('caller_unauthenticated', detail, { status: 407, headers: { 'proxy-authenticate': PROXY_CHALLENGE } });
}

/** Raised by the CLI and config loaders for bad input; maps to exit code 1 unless said otherwise. */
export class UserError extends Error {
  readonly exitCode: number;
  constructor(message: string, exitCode = 1, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'UserError';
    this.exitCode = exitCode;
  }
}

/** The named credential, caller or version does not exist (CLI exit 1, HTTP 404). */
export class NotFoundError extends UserError {
  constructor(message: string) {
    super(message, 1);
    this.name = 'NotFoundError';
  }
}

/** The record is not in a state that allows this change, e.g. promote with nothing pending (CLI exit 1, HTTP 409). */
export class StateError extends UserError {
  constructor(message: string) {
    super(message, 1);
    this.name = 'StateError';
  }
}

/** The store cannot be used now: Redis unreachable, a replica answering READONLY, a filesystem refusing the file store's write (CLI exit 1, HTTP 503). */
export class StoreUnavailableError extends UserError {
  constructor(message: string) {
    super(message, 1);
    this.name = 'StoreUnavailableError';
  }
}

/** A compare-and-set write lost against a concurrent writer (CLI exit code 3). */
export class ConflictError extends UserError {
  constructor(message: string) {
    super(message, 3);
    this.name = 'ConflictError';
  }
}

/** Undici error codes that mean the upstream's deadline passed (504) rather than a failure (502). */
const TIMEOUT_CODES = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'UND_ERR_CONNECT_TIMEOUT']);

/**
 * The one place upstream failures become proxy errors. Only the error's code travels on, never the
 * error object itself: undici errors can carry the request options, headers included.
 */
export function upstreamFailure(err: unknown): ProxyError {
  if (err instanceof ProxyError) return err;
  const code = errorCode(err);
  if (code === 'EGRESS_PRIVATE_ADDRESS') return new ProxyError('route_forbidden', 'The upstream is a private or reserved address and this route does not allow private addresses.', { cause: code });
  if (code && TIMEOUT_CODES.has(code)) return new ProxyError('upstream_timeout', undefined, { cause: code });
  return new ProxyError('upstream_error', code ? `(${code})` : undefined, { cause: code });
}

/** The `code` of an error-like value, if it has a string one. Safe to log. */
export function errorCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string') {
    return /^[A-Z0-9_]{1,64}$/.test(err.code) ? err.code : undefined;
  }
  return undefined;
}
