import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { ALL_ADDRESSES, AlertRules, addressGroup } from '../../src/observe/alert-rules.ts';
import { alertSettingsSchema, defaultAlertSettings } from '../../src/observe/alert-settings.ts';
import { Alerts, WindowCounter } from '../../src/observe/alerts.ts';
import { createLogger } from '../../src/observe/log.ts';
import { Metrics } from '../../src/observe/metrics.ts';

/** A one-minute window: one slot is a second. */
const MINUTE = 60_000;

describe('WindowCounter', () => {
  it('counts the events of one key inside the window, this one included, and forgets what slid out', () => {
    const c = new WindowCounter(MINUTE);
    expect(c.hit('a', 0)).toBe(1);
    expect(c.hit('a', 10_000)).toBe(2);
    expect(c.hit('a', 59_000)).toBe(3);
    // 0 and 10 s slid out; 59 s is still in.
    expect(c.hit('a', 70_500)).toBe(2);
    // Much later: only this one.
    expect(c.hit('a', 500_000)).toBe(1);
  });

  it('keeps keys apart', () => {
    const c = new WindowCounter(MINUTE);
    for (let i = 0; i < 5; i++) c.hit('10.0.0.1', i);
    expect(c.hit('10.0.0.2', 5)).toBe(1);
    expect(c.hit('10.0.0.1', 6)).toBe(6);
  });

  it('is exact to within one slot at the edge of the window', () => {
    const c = new WindowCounter(MINUTE);
    c.hit('a', 1_000);
    // 59.5 s later: inside the window whichever way the slots fall.
    expect(c.hit('a', 60_400)).toBe(2);
    // 61 s after the first: outside.
    expect(c.hit('a', 62_000)).toBe(2);
  });

  it('a flood on one key is counted exactly at a bounded cost per hit (100,000 events in 1 s)', () => {
    // Keeping every event's time made each hit copy all of them: this loop then took about 40 s
    // (20,000 hits: 1.6 s), past the test's timeout; now it takes milliseconds.
    const c = new WindowCounter(MINUTE);
    let n = 0;
    for (let i = 0; i < 100_000; i++) n = c.hit('flood', i / 100);
    expect(n).toBe(100_000);
    // A minute after the flood ended, the window holds only what follows.
    expect(c.hit('flood', 1_000 + MINUTE + 1_000)).toBe(1);
  });
});

describe('Alerts cool-downs', () => {
  it('stay bounded when the subjects are unbounded (one per remote address): past 10,000, the oldest are forgotten', async () => {
    let lines = 0;
    const sink = new Writable({ write: (_chunk, _enc, done) => { lines++; done(); } });
    const alerts = new Alerts(createLogger('warn', sink), new Metrics(), 5 * 60_000);
    alerts.raise('unknown_token', 'warning', '10.0.0.0', 'unknown caller tokens from one address');
    // Inside its cool-down: counted, not raised again.
    alerts.raise('unknown_token', 'warning', '10.0.0.0', 'unknown caller tokens from one address');
    expect(alerts.recent().length).toBe(1);
    for (let i = 1; i <= 10_000; i++) alerts.raise('unknown_token', 'warning', `10.${i >> 16}.${(i >> 8) & 255}.${i & 255}`, 'unknown caller tokens from one address');
    // The map of cool-downs filled up and started afresh: the first subject is raised again.
    alerts.raise('unknown_token', 'warning', '10.0.0.0', 'unknown caller tokens from one address');
    expect(alerts.recent().at(-1)).toMatchObject({ subject: '10.0.0.0', repeats_suppressed: 0 });
    await new Promise((r) => setTimeout(r, 50));
    expect(lines).toBeGreaterThan(10_000);
  });
});

describe('unknown_token counts an IPv6 /64 as one address', () => {
  const rules = () => new AlertRules(new Alerts(createLogger('silent', new Writable({ write: (_c, _e, done) => done() })), new Metrics(), 5 * 60_000), defaultAlertSettings());
  const refused = (remote: string) => ({ caller: null, remote, route: null, decision: 'deny', reason: 'caller_unauthenticated', credential: null });

  it('ten unknown tokens, each from another address of one /64, raise the alert for that /64', () => {
    const r = rules();
    for (let i = 1; i <= 10; i++) r.onRequest(refused(`2001:db8:1:2:${i.toString(16)}::${i}`), 1_000 + i);
    expect(r.alerts.recent().map((a) => [a.id, a.subject])).toEqual([['unknown_token', '2001:db8:1:2::/64']]);
  });

  it('other /64s, IPv4 and IPv4-mapped addresses are counted apart, and one address in any spelling is one', () => {
    expect(addressGroup('2001:0db8:0001:0002:0000:0000:0000:0001')).toBe('2001:db8:1:2::/64');
    expect(addressGroup('2001:db8:1:2::1')).toBe('2001:db8:1:2::/64');
    expect(addressGroup('2001:DB8:1:2::ffff')).toBe('2001:db8:1:2::/64');
    expect(addressGroup('::1')).toBe('0:0:0:0::/64');
    expect(addressGroup('fe80::1%eth0')).toBe('fe80:0:0:0::/64');
    expect(addressGroup('::ffff:10.1.2.3')).toBe('10.1.2.3');
    expect(addressGroup('10.1.2.3')).toBe('10.1.2.3');
    expect(addressGroup('unknown')).toBe('unknown');
    const r = rules();
    for (let i = 1; i <= 9; i++) r.onRequest(refused(`2001:db8:1:${i.toString(16)}::1`), 1_000 + i);
    for (let i = 1; i <= 9; i++) r.onRequest(refused(`10.0.0.${i}`), 2_000 + i);
    expect(r.alerts.recent()).toEqual([]);
  });
});

describe('unknown_token over all addresses', () => {
  const rules = (alerts = '') => new AlertRules(new Alerts(createLogger('silent', new Writable({ write: (_c, _e, done) => done() })), new Metrics(), 5 * 60_000), alerts ? alertSettingsSchema.parse(alerts) : defaultAlertSettings());
  const refused = (remote: string) => ({ caller: null, remote, route: null, decision: 'deny', reason: 'caller_unauthenticated', credential: null });

  it('100 unknown tokens in a minute from 100 addresses, each under its own count, raise it once for all addresses', () => {
    const r = rules();
    for (let i = 1; i <= 99; i++) r.onRequest(refused(`198.51.${i >> 8}.${i & 255}`), 1_000 + i * 500);
    expect(r.alerts.recent()).toEqual([]);
    r.onRequest(refused('203.0.113.7'), 51_000);
    expect(r.alerts.recent().map((a) => [a.id, a.subject])).toEqual([['unknown_token', ALL_ADDRESSES]]);
    expect(r.alerts.recent()[0]!.facts).toEqual({ attempts: 100, window_ms: MINUTE });
  });

  it('the same attempts spread over more than the window do not', () => {
    const r = rules();
    // 200 attempts, one every 0.7 s: at most 86 inside any minute.
    for (let i = 1; i <= 200; i++) r.onRequest(refused(`198.51.${i >> 8}.${i & 255}`), i * 700);
    expect(r.alerts.recent()).toEqual([]);
  });

  it('one loud address has its own alert and does not also raise the total', () => {
    const r = rules();
    for (let i = 0; i < 150; i++) r.onRequest(refused('192.0.2.9'), 1_000 + i);
    expect(r.alerts.recent().map((a) => a.subject)).toEqual(['192.0.2.9']);
  });

  it('EGRESS_ALERTS sets the total; it must be a whole number of at least 1', () => {
    const r = rules({ unknown_token: { total: 3 } } as never);
    for (const remote of ['192.0.2.1', '192.0.2.2', '192.0.2.3']) r.onRequest(refused(remote), 1_000);
    expect(r.alerts.recent().map((a) => a.subject)).toEqual([ALL_ADDRESSES]);
    expect(() => alertSettingsSchema.parse({ unknown_token: { total: 0 } })).toThrow();
    expect(() => alertSettingsSchema.parse({ unknown_token: { total: 2.5 } })).toThrow();
  });
});
