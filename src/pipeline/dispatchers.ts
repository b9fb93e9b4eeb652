import { createSecureContext, rootCertificates, type SecureContextOptions } from 'node:tls';
import { Pool } from './undici.ts';
import type { CompiledConfig, CompiledRoute } from '../config/compile-routes.ts';
import type { ResolvedCredential } from '../injectors/types.ts';
import { checkLiteral, guardedLookup } from './address-guard.ts';

/**
 * One keep-alive pool per upstream (origin, CA, connect timeout). A reload keeps the pools whose
 * key did not change and closes the others once their requests finish.
 */
export class Dispatchers {
  readonly #pools = new Map<string, Pool>();
  /**
   * Each compiled route's pool key, once its origin passed the address check: every request of a
   * route would otherwise parse its origin and serialise the key again. A route's origin and
   * policy never change (a reload compiles new routes), so neither can the outcome.
   */
  readonly #routeKeys = new WeakMap<CompiledRoute, string>();

  for(route: CompiledRoute): Pool {
    return this.#pool(this.#routeKey(route), route.origin, route);
  }

  /**
   * The pool for a route whose scheme presents a TLS client certificate (mtls): one per credential
   * version and certificate fields, so a rotation moves new requests to the new certificate while
   * the old pool drains.
   */
  forCredential(route: CompiledRoute, credential: ResolvedCredential): Pool {
    const user = certificateUser(this.#routeKey(route), route);
    const key = JSON.stringify([user, credential.version]);
    let pool = this.#pools.get(key);
    if (!pool) {
      const injection = route.clientCertificate!;
      const material = injection.injector.clientCertificate!(injection.options, credential);
      const clientCert = material.kind === 'pem' ? { cert: material.cert, key: material.key } : { pfx: material.pfx, passphrase: material.passphrase };
      pool = newPool(route.origin, route, 64, clientCert);
      this.#pools.set(key, pool);
      this.#versioned.set(key, { version: `${credential.id}\u0000${credential.version}`, user });
    }
    return pool;
  }

  /** After a store change: drain and close the pools of credential versions no longer pending, current or previous. */
  retainVersions(live: ReadonlySet<string>): void {
    for (const [key, { version }] of this.#versioned) {
      if (live.has(version)) continue;
      this.#closeVersioned(key);
    }
  }

  /** The pools of forCredential: the credential version each presents, and what uses it (certificateUser). */
  readonly #versioned = new Map<string, { readonly version: string; readonly user: string }>();

  #closeVersioned(key: string): void {
    const pool = this.#pools.get(key);
    this.#pools.delete(key);
    this.#versioned.delete(key);
    void pool?.close().catch(() => {});
  }

  /**
   * Drain and close every pool of one credential, whatever the version: a credential created again
   * (after the store lost it) numbers its versions from 1 again, and its version 1 is not the
   * certificate that the lost record's version 1 pool presents.
   */
  forgetCredential(id: string): void {
    for (const [key, { version }] of this.#versioned) {
      if (version.slice(0, version.lastIndexOf('\u0000')) !== id) continue;
      this.#closeVersioned(key);
    }
  }

  /**
   * A pool for `origin` (the upstream, or a token endpoint beside it) with the route's CA, connect
   * timeout and address policy: unless the route allows private addresses, an IP-literal host is
   * checked here and a name is resolved by guardedLookup, which connects only to the address it checked.
   */
  forOrigin(origin: string, route: PoolPolicy): Pool {
    return this.#pool(checkedKey(origin, route), origin, route);
  }

  /** The route's own pool key, worked out (and its origin checked) once per compiled route. */
  #routeKey(route: CompiledRoute): string {
    let key = this.#routeKeys.get(route);
    if (key === undefined) {
      // Throws for an IP literal the route may not reach: nothing is kept, so every request is refused alike.
      key = checkedKey(route.origin, route);
      this.#routeKeys.set(route, key);
    }
    return key;
  }

  #pool(key: string, origin: string, route: PoolPolicy): Pool {
    let pool = this.#pools.get(key);
    if (!pool) {
      pool = newPool(origin, route, 256);
      this.#pools.set(key, pool);
    }
    return pool;
  }


  /**
   * After a reload: close the pools that no route of `config` uses any more. A certificate pool
   * too, when no route presents that certificate on those connection settings any more (a route
   * removed, its upstream_ca renewed or its timeouts changed): it would otherwise stay open, with
   * its TLS context, until the credential version was retired.
   */
  retain(config: CompiledConfig): void {
    const live = new Set(config.routes.flatMap((r) => [poolKeyOf(r.origin, r), ...r.extraOrigins.map((o) => poolKeyOf(o, r))]));
    const users = new Set(config.routes.flatMap((r) => (r.clientCertificate ? [certificateUser(poolKeyOf(r.origin, r), r)] : [])));
    for (const [key, pool] of this.#pools) {
      const versioned = this.#versioned.get(key);
      if (versioned) {
        if (!users.has(versioned.user)) this.#closeVersioned(key);
        continue;
      }
      if (!live.has(key)) {
        this.#pools.delete(key);
        void pool.close().catch(() => {});
      }
    }
  }

  async close(): Promise<void> {
    const pools = [...this.#pools.values()];
    this.#pools.clear();
    await Promise.all(pools.map((p) => p.close().catch(() => {})));
  }
}

type PoolPolicy = Pick<CompiledRoute, 'upstreamCa' | 'connectTimeoutMs' | 'allowPrivateAddresses'>;

/**
 * A keep-alive pool with the route's connect policy. Upstream TLS is always verified: upstream_ca
 * adds a CA to the system roots, it replaces nothing. Unless the route allows private addresses,
 * names are resolved by guardedLookup, which connects only to the address it checked.
 *
 * The TLS context (trusted roots, client certificate) is built here, once per pool: given only
 * its options, tls.connect builds one at every handshake, and with upstream_ca that parses every
 * system root again (about 9 ms of the event loop per new connection, a PKCS#12 bundle's key
 * derivation on top for mtls). Material that does not load (a PKCS#12 passphrase that does not
 * open it) throws here, and the request that wanted the pool is refused (502).
 */
function newPool(origin: string, route: PoolPolicy, connections: number, clientCert: SecureContextOptions = {}): Pool {
  const secure = origin.startsWith('https:')
    ? { secureContext: createSecureContext({ ...(route.upstreamCa ? { ca: [...rootCertificates, route.upstreamCa] } : {}), ...clientCert }) }
    : {};
  return new Pool(origin, {
    connections,
    pipelining: 1,
    keepAliveTimeout: 30_000,
    connect: {
      timeout: route.connectTimeoutMs,
      rejectUnauthorized: true,
      ...(route.allowPrivateAddresses ? {} : { lookup: guardedLookup }),
      ...secure,
    },
  });
}

/**
 * What a certificate pool serves, but for the credential version: the route's pool key, its
 * credential and the fields the certificate is taken from (two routes to one origin may read two
 * certificates from one credential, paper and live, and must not share a pool).
 */
function certificateUser(routeKey: string, route: CompiledRoute): string {
  const injection = route.clientCertificate!;
  return JSON.stringify([routeKey, route.credential, injection.injector.templates(injection.options).map((t) => t.source)]);
}

/** The pool key for `origin`, once the address policy allows it (an IP literal is checked here; a name when it is resolved). */
function checkedKey(origin: string, route: PoolPolicy): string {
  if (!route.allowPrivateAddresses) checkLiteral(new URL(origin).hostname);
  return poolKeyOf(origin, route);
}

function poolKeyOf(origin: string, route: PoolPolicy): string {
  return JSON.stringify([origin, route.upstreamCa ?? null, route.connectTimeoutMs, route.allowPrivateAddresses]);
}
