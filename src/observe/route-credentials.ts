import type { CompiledRoute } from '../config/compile-routes.ts';
import { currentVersion } from '../store/credentials.ts';
import type { StoreSnapshot } from '../store/types.ts';
import type { Alerts } from './alerts.ts';
import type { Logger } from './log.ts';

export const ROUTE_CREDENTIAL_MISSING = 'route_credential_missing';

/** Why a route's credential cannot serve it; each refuses every request on the route (resolve-credential.ts). */
export type CredentialProblemKind = 'not_in_store' | 'damaged' | 'no_current_version' | 'missing_fields';

export interface CredentialProblem {
  readonly route: string;
  readonly file: string;
  readonly credential: string;
  readonly problem: CredentialProblemKind;
  /** The fields the route's templates read that the current version lacks: names, never values. */
  readonly missing_fields?: readonly string[];
}

/**
 * The routes whose every request would get 503 credential_unavailable as the store is now: the
 * checks resolveCredential makes, short of decrypting anything. A route folder is not refused for
 * them, as the store may be filled after the routes are deployed.
 */
export function credentialProblems(routes: readonly CompiledRoute[], snapshot: StoreSnapshot): CredentialProblem[] {
  const problems: CredentialProblem[] = [];
  for (const route of routes) {
    const named = { route: route.name, file: route.file, credential: route.credential };
    if (snapshot.damaged.has(`credential:${route.credential}`)) {
      problems.push({ ...named, problem: 'damaged' });
      continue;
    }
    const record = snapshot.credentials.get(route.credential);
    if (!record) {
      problems.push({ ...named, problem: 'not_in_store' });
      continue;
    }
    const version = currentVersion(record);
    if (!version) {
      problems.push({ ...named, problem: 'no_current_version' });
      continue;
    }
    const missing = route.fields.filter((f) => !version.fields.includes(f));
    if (missing.length > 0) problems.push({ ...named, problem: 'missing_fields', missing_fields: missing });
  }
  return problems;
}

/** What the operator reads: what is wrong, and what to do about it. */
export function describeProblem(p: CredentialProblem): string {
  const start = `route "${p.route}" names credential "${p.credential}"`;
  const refused = 'its requests get 503 credential_unavailable';
  switch (p.problem) {
    case 'not_in_store':
      return `${start}, which is not in the store: ${refused} until it is added ("egress keys put ${p.credential}") or the route file names the right one`;
    case 'damaged':
      return `${start}, whose record in the store is damaged (see store_record_damaged): ${refused}`;
    case 'no_current_version':
      return `${start}, which has no current version (each one was revoked or retired): ${refused} until a new version is added ("egress keys rotate ${p.credential}")`;
    case 'missing_fields':
      return `${start}, whose current version lacks field ${(p.missing_fields ?? []).map((f) => `"${f}"`).join(', ')} that the route's templates read: ${refused} until a version with it is current ("egress keys rotate ${p.credential}")`;
  }
}

/**
 * Says which routes their credential cannot serve, when the routes or the store change (never per
 * request): one route_credential_missing alert per route each time its answer changes, and one
 * line when it is cleared. The answer last computed is what /readyz and the status page show.
 */
export class RouteCredentialCheck {
  readonly #log: Logger;
  readonly #alerts: Alerts;
  /** The answer last said for each route, by route name: a route is said again only when it changes. */
  #said = new Map<string, string>();
  #problems: readonly CredentialProblem[] = [];

  constructor(log: Logger, alerts: Alerts) {
    this.#log = log;
    this.#alerts = alerts;
  }

  /** `snapshot` undefined: the store was never read, and its own status says why; nothing to judge yet. */
  check(routes: readonly CompiledRoute[], snapshot: StoreSnapshot | undefined): void {
    if (!snapshot) return;
    const problems = credentialProblems(routes, snapshot);
    const said = new Map<string, string>();
    for (const p of problems) {
      const answer = JSON.stringify([p.file, p.credential, p.problem, p.missing_fields ?? []]);
      said.set(p.route, answer);
      if (this.#said.get(p.route) === answer) continue;
      // A changed answer is news (another credential, another field), not a repeat in the cool-down.
      this.#alerts.clear(ROUTE_CREDENTIAL_MISSING, p.route);
      this.#alerts.raise(ROUTE_CREDENTIAL_MISSING, 'warning', p.route, describeProblem(p), {
        route: p.route,
        file: p.file,
        credential: p.credential,
        problem: p.problem,
        ...(p.missing_fields ? { missing_fields: p.missing_fields } : {}),
      });
    }
    for (const name of this.#said.keys()) {
      if (said.has(name)) continue;
      this.#alerts.clear(ROUTE_CREDENTIAL_MISSING, name);
      // A route removed or renamed is in the reload's own line; only one still loaded is news here.
      const route = routes.find((r) => r.name === name);
      if (route) this.#log.info({ cleared: ROUTE_CREDENTIAL_MISSING, route: name, file: route.file, credential: route.credential }, 'route_credential_missing cleared: the route\'s credential can serve it again');
    }
    this.#said = said;
    this.#problems = Object.freeze(problems);
  }

  problems(): readonly CredentialProblem[] {
    return this.#problems;
  }
}
