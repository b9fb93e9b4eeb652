import type { IncomingMessage, ServerResponse } from 'node:http';
import type { CompiledConfig } from '../config/compile-routes.ts';
import type { Activity } from '../observe/activity.ts';
import type { Alerts } from '../observe/alerts.ts';
import type { CredentialProblem } from '../observe/route-credentials.ts';
import { lastUseByVersion } from '../observe/usage.ts';
import type { StoreView } from '../store/store-view.ts';

/**
 * The ops status page: plain server-rendered HTML, no scripts, no build step. It shows names,
 * states, ages and counts only; it never has a credential value to show.
 */
export interface StatusPageDeps {
  readonly store: StoreView;
  readonly alerts: Alerts;
  readonly activity: Activity;
  readonly routes: () => CompiledConfig;
  /** The routes their credential cannot serve, as route_credential_missing last said them (RouteCredentialCheck). */
  readonly credentialProblems: () => readonly CredentialProblem[];
}

export async function renderStatusPage(deps: StatusPageDeps, now = Date.now()): Promise<string> {
  const config = deps.routes();
  const snapshot = deps.store.snapshot();
  const status = deps.store.status();
  const series = deps.activity.series(now);
  const total = series.reduce((a, s) => a + s.requests, 0);
  const denied = series.reduce((a, s) => a + s.denied, 0);

  // As route_credential_missing and /readyz have it: the routes every request of which gets 503.
  const problems = new Map(deps.credentialProblems().map((p) => [p.route, p]));
  const routeRows = config.routes.map((r) => {
    const callers = [...new Set(r.rules.map((rule) => rule.caller))].join(', ');
    const problem = problems.get(r.name);
    const credential = problem ? `${esc(r.credential)}<br><span class="bad">${problemText(problem)}</span>` : esc(r.credential);
    return `<tr><td>${esc(r.name)}</td><td><code>${esc(r.prefix)}</code></td><td>${esc(r.origin + r.basePath)}</td><td>${credential}</td><td>${esc(r.injections.map((i) => i.options.scheme).join(' + '))}</td><td>${esc(callers || '(none)')}</td></tr>`;
  });

  const credentialBlocks: string[] = [];
  const records = [...(snapshot?.credentials.values() ?? [])];
  // Read together: with the store down each read waits out its connect timeout, and one after the
  // other they held the page for a second per credential, when the page is most needed.
  const usages = await Promise.all(records.map((record) => deps.store.backend.readUsage(record.id).catch(() => [])));
  for (const [i, record] of records.entries()) {
    const usage = lastUseByVersion(usages[i]!);
    const rows = record.versions.map((v) => {
      const age = formatAge(now - Date.parse(v.activated_at ?? v.created_at));
      const until = v.grace_until ? `${esc(v.grace_until)} (${formatAge(Date.parse(v.grace_until) - now)} left)` : '';
      const used = usage.get(v.version)?.map((u) => `${esc(u.caller)} ${esc(u.at)}`).join('<br>') ?? '';
      return `<tr class="state-${v.state}"><td>${v.version}</td><td>${v.state}</td><td>${age}</td><td>${until}</td><td>${used || '–'}</td></tr>`;
    });
    credentialBlocks.push(`<h3>${esc(record.id)}</h3><table class="versions"><tr><th>version</th><th>state</th><th>age</th><th>grace ends</th><th>last use</th></tr>${rows.join('')}</table>`);
  }
  const damaged = [...(snapshot?.damaged.keys() ?? [])];

  const alertRows = [...deps.alerts.recent()].reverse().slice(0, 20).map((a) =>
    `<tr class="sev-${a.severity}"><td>${esc(a.at)}</td><td>${esc(a.severity)}</td><td>${esc(a.id)}</td><td>${esc(a.subject)}</td><td>${esc(a.message)}${a.repeats_suppressed ? ` (+${a.repeats_suppressed} repeats)` : ''}</td></tr>`);

  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>egress-proxy status</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem auto;max-width:1100px;padding:0 1rem;color:#1d2330}
h1{font-size:1.4rem;margin:0 0 .25rem}h2{font-size:1.1rem;margin:1.5rem 0 .5rem;border-bottom:1px solid #d6dae3}h3{font-size:1rem;margin:1rem 0 .25rem}
table{border-collapse:collapse;width:100%}table.versions{table-layout:fixed}td,th{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #eceef3;vertical-align:top}th{color:#5b6477;font-weight:600}
code{font-size:.95em}.muted{color:#5b6477}.ok{color:#137333}.bad{color:#b3261e}
.charts{display:flex;gap:1.5rem;flex-wrap:wrap}.chart{flex:1;min-width:320px}
.state-current td:nth-child(2){color:#137333;font-weight:600}.state-previous td:nth-child(2){color:#8a5a00}.state-retired,.state-revoked{color:#8b93a7}
.sev-critical td:nth-child(2){color:#b3261e;font-weight:600}.sev-warning td:nth-child(2){color:#8a5a00}
</style></head><body>
<h1>egress-proxy</h1>
<p class="muted">${esc(new Date(now).toISOString())} · store ${esc(deps.store.backend.description)}: <span class="${status.reachable ? 'ok' : 'bad'}">${status.reachable ? 'reachable' : `unreachable (${esc(status.error ?? '')})`}</span> · ${config.routes.length} routes loaded ${esc(config.loadedAt.toISOString())}</p>
<h2>Traffic, last hour</h2>
<div class="charts">
<div class="chart"><div>requests per minute · ${total} in the hour</div>${chart(series.map((s) => s.requests), '#3367d6')}</div>
<div class="chart"><div>denied per minute · ${denied} in the hour</div>${chart(series.map((s) => s.denied), '#b3261e')}</div>
</div>
<h2>Routes</h2>
<table><tr><th>route</th><th>prefix</th><th>upstream</th><th>credential</th><th>inject</th><th>callers</th></tr>${routeRows.join('') || '<tr><td colspan="6">no routes</td></tr>'}</table>
<h2>Credentials</h2>
${credentialBlocks.join('') || '<p>no credentials</p>'}
${damaged.length ? `<p class="bad">damaged records (fail closed): ${damaged.map(esc).join(', ')}</p>` : ''}
<h2>Recent alerts</h2>
<table><tr><th>time</th><th>severity</th><th>alert</th><th>subject</th><th>message</th></tr>${alertRows.join('') || '<tr><td colspan="5">none</td></tr>'}</table>
</body></html>`;
}

/** Why the route's credential cannot serve it, in a few words (HTML). */
function problemText(p: CredentialProblem): string {
  switch (p.problem) {
    case 'not_in_store':
      return 'not in the store';
    case 'damaged':
      return 'record damaged';
    case 'no_current_version':
      return 'no current version';
    case 'missing_fields':
      return `current version lacks field ${(p.missing_fields ?? []).map((f) => `<code>${esc(f)}</code>`).join(', ')}`;
  }
}

/** A bar chart of 60 values as inline SVG. */
function chart(values: readonly number[], color: string): string {
  const width = 480;
  const height = 90;
  const max = Math.max(1, ...values);
  const barWidth = width / values.length;
  const bars = values.map((v, i) => {
    const h = Math.round((v / max) * (height - 14));
    return `<rect x="${(i * barWidth).toFixed(1)}" y="${height - h}" width="${Math.max(1, barWidth - 1).toFixed(1)}" height="${h}" fill="${color}"><title>${v}</title></rect>`;
  });
  return `<svg viewBox="0 0 ${width} ${height}" width="100%" height="${height}" role="img" aria-label="per-minute counts, peak ${max}"><text x="0" y="10" font-size="10" fill="#5b6477">peak ${max}/min</text>${bars.join('')}</svg>`;
}

/** 45s, 12m, 23h 59m, 90d: coarse enough to read at a glance. */
function formatAge(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d`;
}

function esc(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

export async function handleStatusPage(_req: IncomingMessage, res: ServerResponse, deps: StatusPageDeps): Promise<void> {
  const html = await renderStatusPage(deps);
  res.writeHead(200, {
    'content-type': 'text/html; charset=utf-8',
    'content-length': Buffer.byteLength(html),
    'cache-control': 'no-store',
    // Nothing on the page runs or loads anything, and no other page may frame it (clickjacking):
    // frame-ancestors, base-uri and form-action are not covered by default-src.
    'content-security-policy': "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    'x-frame-options': 'DENY',
  });
  res.end(html);
}
