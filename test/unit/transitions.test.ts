import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.ts';
import type { Actor } from '../../src/rotation/transitions.ts';
import { assertInvariant, expire, inGrace, promote, revoke, rewrap, rollback, rotate } from '../../src/rotation/transitions.ts';
import type { FieldValues } from '../../src/store/credentials.ts';
import { newCredentialRecord, openVersion, unwrapDek, wrapDek } from '../../src/store/credentials.ts';
import { IntegrityError } from '../../src/store/crypto.ts';
import type { Keyring } from '../../src/store/keyring.ts';
import { createKeyring } from '../../src/store/keyring.ts';
import type { CredentialRecord, CredentialVersionRecord } from '../../src/store/records.ts';

const ID = 'plaid-production';
const T0 = new Date('2025-03-01T12:00:00.000Z');
const HOUR = 3_600_000;

let dir: string;
let keyring: Keyring;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'egress-transitions-'));
  keyring = await createKeyring(join(dir, 'master.key'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const at = (ms: number, actor = 'alice'): Actor => ({ actor, now: new Date(T0.getTime() + ms) });
const fieldsOf = (n: number): FieldValues => ({ client_id: `client-${n}`, secret: `sk_live_v${n}_${'x'.repeat(n % 7)}` });

function fresh(): CredentialRecord {
  return newCredentialRecord(keyring, ID, fieldsOf(1), T0, 'seed');
}

function v(record: CredentialRecord, version: number): CredentialVersionRecord {
  const found = record.versions.find((x) => x.version === version);
  if (!found) throw new Error(`no version ${version} in the record`);
  return found;
}

function states(record: CredentialRecord): Record<number, string> {
  return Object.fromEntries(record.versions.map((x) => [x.version, x.state]));
}

function decrypted(kr: Keyring, record: CredentialRecord, version: number): Record<string, string> {
  const resolved = openVersion(kr, record.id, v(record, version));
  expect(resolved.version).toBe(version);
  return Object.fromEntries([...resolved.fields].map(([name, secret]) => [name, secret.reveal()]));
}

function expectUserError(fn: () => unknown, message: RegExp): void {
  let thrown: unknown;
  try {
    fn();
  } catch (err) {
    thrown = err;
  }
  expect(thrown, 'expected a UserError').toBeInstanceOf(UserError);
  expect((thrown as Error).message).toMatch(message);
}

function expectDestroyed(x: CredentialVersionRecord): void {
  expect(x.dek).toBeUndefined();
  expect(x.data).toBeUndefined();
  expect(x.grace_until).toBeUndefined();
  expect(Object.hasOwn(x, 'dek')).toBe(false);
  expect(Object.hasOwn(x, 'data')).toBe(false);
}

/** v1 current -> v2 current with v1 previous (grace 1h), at T0 + 1 min. */
function withPrevious(): CredentialRecord {
  return rotate(fresh(), keyring, fieldsOf(2), { stage: false, graceMs: HOUR }, at(60_000));
}

describe('rotate', () => {
  it('without --stage makes the new version current at once, the old one previous for the grace', () => {
    const before = fresh();
    const after = rotate(before, keyring, fieldsOf(2), { stage: false, graceMs: HOUR }, at(1_000));
    expect(states(after)).toEqual({ 1: 'previous', 2: 'current' });
    expect(v(after, 2).activated_at).toBe(at(1_000).now.toISOString());
    expect(v(after, 1).grace_until).toBe(new Date(T0.getTime() + 1_000 + HOUR).toISOString());
    expect(decrypted(keyring, after, 2)).toEqual(fieldsOf(2));
    expect(decrypted(keyring, after, 1)).toEqual(fieldsOf(1));
    expect(v(after, 2).fields).toEqual(['client_id', 'secret']);
    // The input record is left alone (pure function).
    expect(states(before)).toEqual({ 1: 'current' });
    expect(before.revision).toBe(1);
  });

  it('without --stage and grace 0 retires the old current at once', () => {
    const after = rotate(fresh(), keyring, fieldsOf(2), { stage: false, graceMs: 0 }, at(1_000));
    expect(states(after)).toEqual({ 1: 'retired', 2: 'current' });
    expectDestroyed(v(after, 1));
  });

  it('with --stage adds a pending version and leaves the current one in place', () => {
    const after = rotate(fresh(), keyring, fieldsOf(2), { stage: true, graceMs: HOUR }, at(1_000));
    expect(states(after)).toEqual({ 1: 'current', 2: 'pending' });
    expect(v(after, 2).activated_at).toBeUndefined();
    expect(decrypted(keyring, after, 2)).toEqual(fieldsOf(2));
  });

  it('is refused while a pending version exists, whether staging or not', () => {
    const staged = rotate(fresh(), keyring, fieldsOf(2), { stage: true, graceMs: HOUR }, at(1_000));
    const snapshot = structuredClone(staged);
    expectUserError(() => rotate(staged, keyring, fieldsOf(3), { stage: true, graceMs: HOUR }, at(2_000)), /already has a pending version 2/);
    expectUserError(() => rotate(staged, keyring, fieldsOf(3), { stage: false, graceMs: HOUR }, at(2_000)), /pending version 2; promote or revoke it first/);
    expect(staged).toEqual(snapshot);
  });

  it('numbers the new version after the highest one, even when the highest was revoked', () => {
    let r = rotate(fresh(), keyring, fieldsOf(2), { stage: true, graceMs: HOUR }, at(1_000));
    r = revoke(r, 2, at(2_000));
    r = rotate(r, keyring, fieldsOf(3), { stage: false, graceMs: HOUR }, at(3_000));
    expect(states(r)).toEqual({ 1: 'previous', 2: 'revoked', 3: 'current' });
  });
});

describe('promote', () => {
  it('with grace > 0: pending -> current, current -> previous until now + grace, an older previous -> retired', () => {
    const start = rotate(withPrevious(), keyring, fieldsOf(3), { stage: true, graceMs: HOUR }, at(120_000));
    expect(states(start)).toEqual({ 1: 'previous', 2: 'current', 3: 'pending' });
    const oldPrevious = v(start, 1);
    const after = promote(start, { graceMs: 2 * HOUR }, at(180_000));
    expect(states(after)).toEqual({ 1: 'retired', 2: 'previous', 3: 'current' });
    expect(v(after, 2).grace_until).toBe(new Date(T0.getTime() + 180_000 + 2 * HOUR).toISOString());
    expect(v(after, 3).activated_at).toBe(at(180_000).now.toISOString());
    // The retired one keeps its metadata, not its ciphertext.
    const retired = v(after, 1);
    expectDestroyed(retired);
    expect(retired.retired_at).toBe(at(180_000).now.toISOString());
    expect(retired).toMatchObject({ version: 1, created_at: oldPrevious.created_at, fields: oldPrevious.fields, kek: oldPrevious.kek });
    expect(() => openVersion(keyring, ID, retired)).toThrow(IntegrityError);
    // The previous keeps its ciphertext and still decrypts.
    expect(v(after, 2).data).toEqual(v(start, 2).data);
    expect(decrypted(keyring, after, 2)).toEqual(fieldsOf(2));
    expect(decrypted(keyring, after, 3)).toEqual(fieldsOf(3));
  });

  it('with grace 0 (cutover): the old current is retired at once and there is no previous', () => {
    const start = rotate(fresh(), keyring, fieldsOf(2), { stage: true, graceMs: HOUR }, at(1_000));
    const after = promote(start, { graceMs: 0 }, at(2_000));
    expect(states(after)).toEqual({ 1: 'retired', 2: 'current' });
    expectDestroyed(v(after, 1));
    expect(v(after, 1).retired_at).toBe(at(2_000).now.toISOString());
    expect(after.versions.some((x) => x.state === 'previous')).toBe(false);
  });

  it('with grace 0 also retires an older previous', () => {
    const start = rotate(withPrevious(), keyring, fieldsOf(3), { stage: true, graceMs: HOUR }, at(120_000));
    const after = promote(start, { graceMs: 0 }, at(180_000));
    expect(states(after)).toEqual({ 1: 'retired', 2: 'retired', 3: 'current' });
    expectDestroyed(v(after, 1));
    expectDestroyed(v(after, 2));
  });

  it('is refused without a pending version', () => {
    const r = withPrevious();
    const snapshot = structuredClone(r);
    expectUserError(() => promote(r, { graceMs: HOUR }, at(120_000)), /no pending version to promote/);
    expect(r).toEqual(snapshot);
  });
});

describe('rollback', () => {
  it('inside the grace: previous -> current, the rolled-back current -> pending with its ciphertext', () => {
    const start = withPrevious();
    const after = rollback(start, at(30 * 60_000));
    expect(states(after)).toEqual({ 1: 'current', 2: 'pending' });
    expect(v(after, 1).grace_until).toBeUndefined();
    // As old as it was: a rollback does not restart the key's age (keys due, credential_max_age).
    expect(v(after, 1).activated_at).toBe(v(start, 1).activated_at);
    expect(v(after, 2).activated_at).toBeUndefined();
    expect(v(after, 2).dek).toEqual(v(start, 2).dek);
    expect(v(after, 2).data).toEqual(v(start, 2).data);
    expect(decrypted(keyring, after, 1)).toEqual(fieldsOf(1));
    expect(decrypted(keyring, after, 2)).toEqual(fieldsOf(2));
    // The rolled-back version can be promoted again.
    const again = promote(after, { graceMs: HOUR }, at(40 * 60_000));
    expect(states(again)).toEqual({ 1: 'previous', 2: 'current' });
  });

  it('is refused once the grace has ended (at grace_until and after)', () => {
    const start = withPrevious();
    const graceEnd = Date.parse(v(start, 1).grace_until!) - T0.getTime();
    expect(inGrace(v(start, 1), at(graceEnd - 1).now)).toBe(true);
    expect(inGrace(v(start, 1), at(graceEnd).now)).toBe(false);
    expectUserError(() => rollback(start, at(graceEnd)), /no previous version inside its grace window/);
    expectUserError(() => rollback(start, at(graceEnd + 1)), /no previous version inside its grace window/);
    expect(states(rollback(start, at(graceEnd - 1)))).toEqual({ 1: 'current', 2: 'pending' });
  });

  it('is refused when a pending version exists', () => {
    const start = rotate(withPrevious(), keyring, fieldsOf(3), { stage: true, graceMs: HOUR }, at(120_000));
    const snapshot = structuredClone(start);
    expectUserError(() => rollback(start, at(180_000)), /has a pending version; promote or revoke it before rolling back/);
    expect(start).toEqual(snapshot);
  });

  it('is refused with no previous version at all', () => {
    expectUserError(() => rollback(fresh(), at(1_000)), /no previous version/);
  });
});

describe('revoke', () => {
  it('without a version revokes the current one and destroys its ciphertext', () => {
    const start = withPrevious();
    const after = revoke(start, undefined, at(120_000));
    expect(states(after)).toEqual({ 1: 'previous', 2: 'revoked' });
    expectDestroyed(v(after, 2));
    expect(v(after, 2).revoked_at).toBe(at(120_000).now.toISOString());
    expect(v(after, 2).fields).toEqual(['client_id', 'secret']);
    // The other versions are untouched.
    expect(v(after, 1)).toEqual(v(start, 1));
  });

  it('with --version revokes any version: previous, pending, retired', () => {
    const start = rotate(withPrevious(), keyring, fieldsOf(3), { stage: true, graceMs: HOUR }, at(120_000));
    const noPrevious = revoke(start, 1, at(130_000));
    expect(states(noPrevious)).toEqual({ 1: 'revoked', 2: 'current', 3: 'pending' });
    expectDestroyed(v(noPrevious, 1));
    const noPending = revoke(noPrevious, 3, at(140_000));
    expect(states(noPending)).toEqual({ 1: 'revoked', 2: 'current', 3: 'revoked' });
    expectDestroyed(v(noPending, 3));
    const cut = promote(rotate(fresh(), keyring, fieldsOf(2), { stage: true, graceMs: 0 }, at(1_000)), { graceMs: 0 }, at(2_000));
    const revokedRetired = revoke(cut, 1, at(3_000));
    expect(states(revokedRetired)).toEqual({ 1: 'revoked', 2: 'current' });
  });

  it('refuses an already revoked version, a missing version, and a missing current', () => {
    const once = revoke(withPrevious(), 1, at(120_000));
    const snapshot = structuredClone(once);
    expectUserError(() => revoke(once, 1, at(130_000)), /version 1 of "plaid-production" is already revoked/);
    expectUserError(() => revoke(once, 9, at(130_000)), /has no version 9/);
    const noCurrent = revoke(once, undefined, at(130_000));
    expectUserError(() => revoke(noCurrent, undefined, at(140_000)), /has no current version/);
    expect(once).toEqual(snapshot);
  });
});

describe('expire', () => {
  it('retires exactly the previous version past its grace, and nothing else', () => {
    // v1 retired, v2 previous (grace 1h from +2 min), v3 current, v4 pending.
    let r = withPrevious();
    r = rotate(r, keyring, fieldsOf(3), { stage: false, graceMs: HOUR }, at(120_000));
    r = rotate(r, keyring, fieldsOf(4), { stage: true, graceMs: HOUR }, at(180_000));
    expect(states(r)).toEqual({ 1: 'retired', 2: 'previous', 3: 'current', 4: 'pending' });
    const graceEnd = Date.parse(v(r, 2).grace_until!) - T0.getTime();

    expect(expire(r, at(graceEnd - 1))).toBeUndefined();
    const after = expire(r, at(graceEnd))!;
    expect(after).toBeDefined();
    expect(states(after)).toEqual({ 1: 'retired', 2: 'retired', 3: 'current', 4: 'pending' });
    expectDestroyed(v(after, 2));
    expect(v(after, 2).retired_at).toBe(at(graceEnd).now.toISOString());
    for (const n of [1, 3, 4]) expect(v(after, n)).toEqual(v(r, n));
    // Nothing more is due.
    expect(expire(after, at(graceEnd + 10 * HOUR))).toBeUndefined();
  });

  it('returns undefined when there is no previous version', () => {
    expect(expire(fresh(), at(1000 * HOUR))).toBeUndefined();
    const cut = rotate(fresh(), keyring, fieldsOf(2), { stage: false, graceMs: 0 }, at(1_000));
    expect(expire(cut, at(1000 * HOUR))).toBeUndefined();
  });
});

describe('revision and history', () => {
  const cases: [string, () => CredentialRecord, (r: CredentialRecord, by: Actor) => CredentialRecord | undefined, string][] = [
    ['rotate --stage', fresh, (r, by) => rotate(r, keyring, fieldsOf(2), { stage: true, graceMs: HOUR }, by), 'stage'],
    ['promote', () => rotate(fresh(), keyring, fieldsOf(2), { stage: true, graceMs: HOUR }, at(1_000)), (r, by) => promote(r, { graceMs: HOUR }, by), 'promote'],
    ['rollback', withPrevious, (r, by) => rollback(r, by), 'rollback'],
    ['revoke', withPrevious, (r, by) => revoke(r, undefined, by), 'revoke'],
    ['expire', withPrevious, (r, by) => expire(r, { ...by, now: new Date(by.now.getTime() + 2 * HOUR) }), 'retire'],
    ['rewrap', fresh, (r, by) => {
      const next = keyring.withNewKey(by.now);
      return rewrap(r, next, (x) => unwrapDek(next, r.id, x), (dek, x) => wrapDek(next, r.id, x, dek), by);
    }, 'rewrap'],
  ];

  it.each(cases)('%s bumps the revision by 1 and appends one history entry with actor and action', (_name, make, apply, action) => {
    const before = make();
    const by = at(5 * 60_000, 'cli:bob');
    const after = apply(before, by)!;
    expect(after).toBeDefined();
    expect(after.revision).toBe(before.revision + 1);
    expect(after.history).toHaveLength((before.history ?? []).length + 1);
    const last = after.history!.at(-1)!;
    expect(last.actor).toBe('cli:bob');
    expect(last.action).toBe(action);
    expect(Date.parse(last.at)).toBeGreaterThanOrEqual(by.now.getTime());
    expect(after.updated_at).toBe(last.at);
    // The earlier history is kept as it was.
    expect(after.history!.slice(0, -1)).toEqual(before.history ?? []);
  });

  it('rotate without --stage is one transition too: revision + 1 and one history entry for the new version', () => {
    const before = fresh();
    const after = rotate(before, keyring, fieldsOf(2), { stage: false, graceMs: HOUR }, at(60_000, 'cli:bob'));
    expect(after.history!.at(-1)).toMatchObject({ actor: 'cli:bob', action: 'rotate', version: 2 });
    expect(after.history).toHaveLength(before.history!.length + 1);
    expect(after.revision).toBe(before.revision + 1);
  });

  it('refused transitions change nothing', () => {
    const r = fresh();
    const snapshot = structuredClone(r);
    expect(() => promote(r, { graceMs: 0 }, at(1))).toThrow(UserError);
    expect(() => rollback(r, at(1))).toThrow(UserError);
    expect(() => revoke(r, 5, at(1))).toThrow(UserError);
    expect(r).toEqual(snapshot);
  });
});

describe('rewrap', () => {
  it('changes only kek/dek of versions wrapped by an old KEK; data stays byte-identical and decrypts the same', async () => {
    const kr1 = await createKeyring(join(await mkdtemp(join(dir, 'rewrap-')), 'master.key'));
    // v1 retired, v2 previous, v3 current, v4 pending: all under KEK 1.
    let r = newCredentialRecord(kr1, ID, fieldsOf(1), T0);
    r = rotate(r, kr1, fieldsOf(2), { stage: false, graceMs: HOUR }, at(1_000));
    r = rotate(r, kr1, fieldsOf(3), { stage: false, graceMs: HOUR }, at(2_000));
    r = rotate(r, kr1, fieldsOf(4), { stage: true, graceMs: HOUR }, at(3_000));
    expect(states(r)).toEqual({ 1: 'retired', 2: 'previous', 3: 'current', 4: 'pending' });

    const kr2 = kr1.withNewKey(at(4_000).now);
    expect(kr2.active).toBe(2);
    const after = rewrap(r, kr2, (x) => unwrapDek(kr2, ID, x), (dek, x) => wrapDek(kr2, ID, x, dek), at(5_000))!;
    expect(after).toBeDefined();
    for (const n of [2, 3, 4]) {
      const old = v(r, n);
      const now = v(after, n);
      expect(now.kek).toBe(2);
      expect(now.dek).toBeDefined();
      expect(now.dek).not.toEqual(old.dek);
      expect(JSON.stringify(now.data)).toBe(JSON.stringify(old.data));
      // Nothing else about the version changed.
      const { kek: _k1, dek: _d1, ...restOld } = old;
      const { kek: _k2, dek: _d2, ...restNew } = now;
      expect(restNew).toEqual(restOld);
      expect(decrypted(kr2, after, n)).toEqual(fieldsOf(n));
      // The old KEK alone no longer opens it; the new KEK alone does.
      expect(() => openVersion(kr1, ID, now)).toThrow(IntegrityError);
      expect(decrypted(kr2.without(1), after, n)).toEqual(fieldsOf(n));
    }
    // The retired version has no data key to re-wrap: untouched.
    expect(v(after, 1)).toEqual(v(r, 1));
    // Nothing left to do: undefined.
    expect(rewrap(after, kr2, (x) => unwrapDek(kr2, ID, x), (dek, x) => wrapDek(kr2, ID, x, dek), at(6_000))).toBeUndefined();
  });

  it('leaves versions already wrapped by the active KEK exactly as they were', async () => {
    const kr1 = await createKeyring(join(await mkdtemp(join(dir, 'rewrap-')), 'master.key'));
    const kr2 = kr1.withNewKey(T0);
    let r = newCredentialRecord(kr1, ID, fieldsOf(1), T0);
    r = rotate(r, kr2, fieldsOf(2), { stage: false, graceMs: HOUR }, at(1_000));
    expect([v(r, 1).kek, v(r, 2).kek]).toEqual([1, 2]);
    const kr3 = kr2.withNewKey(T0);
    const partial = rewrap(r, kr2, (x) => unwrapDek(kr2, ID, x), (dek, x) => wrapDek(kr2, ID, x, dek), at(2_000))!;
    expect(v(partial, 2)).toEqual(v(r, 2));
    expect(v(partial, 1).kek).toBe(2);
    expect(JSON.stringify(v(partial, 1).data)).toBe(JSON.stringify(v(r, 1).data));
    const all = rewrap(partial, kr3, (x) => unwrapDek(kr3, ID, x), (dek, x) => wrapDek(kr3, ID, x, dek), at(3_000))!;
    expect(all.versions.map((x) => x.kek)).toEqual([3, 3]);
    expect(decrypted(kr3.without(1).without(2), all, 1)).toEqual(fieldsOf(1));
    expect(decrypted(kr3.without(1).without(2), all, 2)).toEqual(fieldsOf(2));
  });
});

// ---------------------------------------------------------------------------------------------
// Property: random sequences of operations keep the record consistent.

type Op =
  | { kind: 'rotate'; stage: boolean; graceMs: number; fields: Record<string, string>; dt: number }
  | { kind: 'promote'; graceMs: number; dt: number }
  | { kind: 'rollback'; dt: number }
  | { kind: 'revoke'; version: number | undefined; dt: number }
  | { kind: 'expire'; dt: number };

const dt = fc.oneof({ arbitrary: fc.integer({ min: 0, max: 10 * 60_000 }), weight: 3 }, { arbitrary: fc.integer({ min: 0, max: 3 * HOUR }), weight: 1 });
const grace = fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 4 * HOUR }));
const fieldName = fc.constantFrom('client_id', 'secret', 'key_id', 'token', 'a_b');
const fieldsArb = fc.dictionary(fieldName, fc.string({ minLength: 1, maxLength: 24 }), { minKeys: 1, maxKeys: 3 });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant('rotate' as const), stage: fc.boolean(), graceMs: grace, fields: fieldsArb, dt }), weight: 3 },
  { arbitrary: fc.record({ kind: fc.constant('promote' as const), graceMs: grace, dt }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant('rollback' as const), dt }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant('revoke' as const), version: fc.option(fc.integer({ min: 1, max: 16 }), { nil: undefined }), dt }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('expire' as const), dt: fc.integer({ min: 0, max: 6 * HOUR }) }), weight: 1 },
);
const opsArb = fc.array(opArb, { maxLength: 30, size: 'max' });

interface RunResult {
  readonly record: CredentialRecord;
  readonly successes: number;
}

/** Apply `ops` one by one, checking the invariants after each; returns the final record. */
function run(ops: readonly Op[], initialFields: Record<string, string>): RunResult {
  let record = newCredentialRecord(keyring, ID, initialFields, T0, 'seed');
  const expected = new Map<number, Record<string, string>>([[1, initialFields]]);
  let clock = T0.getTime();
  let successes = 0;
  for (const op of ops) {
    clock += op.dt;
    const by: Actor = { actor: 'prop', now: new Date(clock) };
    const before = JSON.stringify(record);
    let after: CredentialRecord | undefined;
    try {
      switch (op.kind) {
        case 'rotate':
          after = rotate(record, keyring, op.fields, { stage: op.stage, graceMs: op.graceMs }, by);
          break;
        case 'promote':
          after = promote(record, { graceMs: op.graceMs }, by);
          break;
        case 'rollback':
          after = rollback(record, by);
          break;
        case 'revoke':
          after = revoke(record, op.version, by);
          break;
        case 'expire':
          after = expire(record, by);
          break;
      }
    } catch (err) {
      // Refusals are UserErrors; an invariant violation (plain Error) or anything else fails the property.
      if (!(err instanceof UserError)) throw err;
      after = undefined;
    }
    // Transitions are pure: the input record is never changed, refused or not.
    expect(JSON.stringify(record)).toBe(before);
    if (after === undefined) continue;
    successes++;
    if (op.kind === 'rotate') {
      const newest = Math.max(...after.versions.map((x) => x.version));
      expect(after.versions).toHaveLength(record.versions.length + 1);
      expect(v(after, newest).state).toBe(op.stage ? 'pending' : 'current');
      expected.set(newest, op.fields);
    }
    record = after;
    check(record, expected);
  }
  return { record, successes };
}

function check(record: CredentialRecord, expected: ReadonlyMap<number, Record<string, string>>): void {
  assertInvariant(record);
  for (const state of ['pending', 'current', 'previous'] as const) {
    expect(record.versions.filter((x) => x.state === state).length).toBeLessThanOrEqual(1);
  }
  const numbers = record.versions.map((x) => x.version);
  for (let i = 1; i < numbers.length; i++) expect(numbers[i]!).toBeGreaterThan(numbers[i - 1]!);
  expect(numbers[0]).toBe(1);
  for (const x of record.versions) {
    if (x.state === 'retired' || x.state === 'revoked') {
      expect(x.dek).toBeUndefined();
      expect(x.data).toBeUndefined();
      expect(x.state === 'retired' ? x.retired_at : x.revoked_at).toBeDefined();
    } else {
      expect(x.dek).toBeDefined();
      expect(x.data).toBeDefined();
      expect(decrypted(keyring, record, x.version)).toEqual(expected.get(x.version));
      expect(x.fields).toEqual(Object.keys(expected.get(x.version)!).sort());
    }
    if (x.state === 'previous') expect(x.grace_until).toBeDefined();
    else expect(x.grace_until).toBeUndefined();
  }
}

describe('property: random operation sequences', () => {
  it('keep at most one pending/current/previous, no ciphertext on dead versions, live versions decrypting to their fields', () => {
    fc.assert(
      fc.property(fieldsArb, opsArb, (initial, ops) => {
        run(ops, initial);
      }),
      { numRuns: 250 },
    );
  });

  it('revision equals 1 + the number of successful transitions, with one history entry each', () => {
    fc.assert(
      fc.property(fieldsArb, opsArb, (initial, ops) => {
        const { record, successes } = run(ops, initial);
        expect(record.revision).toBe(1 + successes);
        expect(record.history).toHaveLength(1 + successes);
      }),
      { numRuns: 250 },
    );
  });
});
