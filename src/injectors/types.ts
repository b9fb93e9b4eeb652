import type { z } from 'zod';
import type { Secret } from '../secret.ts';
import type { Template } from './template.ts';
import type { Dispatcher } from 'undici';
import type { TokenSource } from '../pipeline/token-broker.ts';
import type { ClientCertificate } from '../store/tls-material.ts';

/** Outbound headers keyed by lower-case name; a Map, so `__proto__` is just another name. */
export type HeaderMap = Map<string, string[]>;

/** The request as it will be sent upstream. Injectors edit it; the inbound request is never touched. */
export interface OutboundRequest {
  readonly method: string;
  /** The upstream host (and port, when not the default), as sent in Host: signers cover it. */
  readonly host: string;
  /** Path sent upstream, without the query. */
  path: string;
  /** Raw query without the leading `?`; empty when there is none. */
  query: string;
  readonly headers: HeaderMap;
  /** The buffered body when an injector needed it; undefined means the inbound body is streamed. */
  body: Buffer | undefined;
}

/** A decrypted credential version, shared by the requests that use it while its stored record is unchanged. */
export interface ResolvedCredential {
  readonly id: string;
  readonly version: number;
  /**
   * The version's created_at: with the id and number it names this version, not the version of the
   * same number of a record the store lost (a credential put again numbers its versions from 1).
   */
  readonly createdAt?: string;
  readonly fields: ReadonlyMap<string, Secret>;
}

/** What an injector owns: caller copies of these are removed before the injector runs. */
export interface Claims {
  readonly headers: readonly string[];
  readonly query: readonly string[];
  readonly bodyFields: readonly string[];
}

export interface InjectArgs<O> {
  readonly request: OutboundRequest;
  readonly credential: ResolvedCredential;
  readonly options: O;
  /** Record a value that went upstream, so an upstream echo of it is redacted. */
  readonly redact: (value: string) => void;
  /** The time to sign with (one clock reading per request). */
  readonly now: Date;
  /**
   * A nonce strictly greater than any before for this credential, across every instance (kept in
   * Redis when the store is Redis): set when the injector declares `needsNonce`.
   */
  readonly nonce: bigint | undefined;
  /** What this injector's `prepare` returned for this request (e.g. an access token). */
  readonly prepared?: unknown;
}

/**
 * Getting a credential that must be fetched (an OAuth2 access token) is asynchronous, cached and
 * refreshable; it happens in `prepare`, before the synchronous `inject` attaches the result.
 */
export interface PrepareArgs<O> {
  readonly credential: ResolvedCredential;
  /** The previous version inside its grace, decrypted on demand: a token endpoint may be retried with it. */
  readonly previous: (() => ResolvedCredential) | undefined;
  readonly options: O;
  readonly tokens: TokenSource;
  /** A verified-TLS keep-alive pool for another origin of this route (a token endpoint). */
  readonly dispatcherFor: (origin: string) => Dispatcher;
  readonly redact: (value: string) => void;
  /** The route's response deadline: a fetch made for this request (a token endpoint) gives up by then. */
  readonly deadlineMs: number;
}

/**
 * One auth scheme. Getting the credential (async, cached) is elsewhere; attaching it is this
 * pure, synchronous step.
 */
export interface Injector<O extends { readonly scheme: string } = { readonly scheme: string }> {
  readonly scheme: O['scheme'];
  /** Route-file options for this scheme (strict); templates compile during parsing. */
  readonly schema: z.ZodType<O, any>;
  /** The body must be buffered (bounded by max_body) before inject runs. */
  readonly needsBody: boolean;
  /**
   * Set when the injector reads what the body says (parses or rewrites it) rather than signing its
   * bytes as sent: what it does, for the refusal of a body under a Content-Encoding (refuseCodedBody).
   */
  readonly readsBody?: string;
  /**
   * The pipeline fetches a strictly increasing nonce for the credential before inject runs: always
   * (true), or when these options use one (a function).
   */
  readonly needsNonce?: boolean | ((options: O) => boolean);
  /**
   * Signs the request as it will be sent (method, path, query, body). Injections run in list
   * order, so a signer must be the last one: anything after it would change what it signed.
   */
  readonly signsRequest?: boolean;
  prepare?(args: PrepareArgs<O>): Promise<unknown>;
  /** The upstream TLS client certificate this scheme presents (mtls): requests go through a pool per credential version. */
  clientCertificate?(options: O, credential: ResolvedCredential): ClientCertificate;
  /** What `routes explain` says this scheme does to a request of this method, when it depends on it (a signer that signs some methods). */
  explain?(options: O, method: string): string;
  claims(options: O): Claims;
  templates(options: O): readonly Template[];
  inject(args: InjectArgs<O>): void;
}

export const NO_CLAIMS: Claims = Object.freeze({ headers: [], query: [], bodyFields: [] });
