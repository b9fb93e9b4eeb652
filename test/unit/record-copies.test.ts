import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { addToken, revokeToken } from '../../src/rotation/operations.ts';
import { FileStore } from '../../src/store/file-store.ts';
import { compareCopies, laterIncarnation } from '../../src/store/records.ts';

/** Which of two copies of one record the store view keeps: by incarnation (created_at), then revision. */
const copy = (created_at: string, revision: number) => ({ created_at, revision });
const T1 = '2026-03-01T12:00:00.000Z';
const T2 = '2026-03-02T08:30:00.000Z';

describe('compareCopies', () => {
  it('one incarnation: the higher revision is newer, an equal one is neither', () => {
    expect(compareCopies(copy(T1, 3), copy(T1, 2))).toBeGreaterThan(0);
    expect(compareCopies(copy(T1, 2), copy(T1, 3))).toBeLessThan(0);
    expect(compareCopies(copy(T1, 2), copy(T1, 2))).toBe(0);
  });

  it('a record created again is newer at any revision; a copy of an earlier incarnation is older at any revision', () => {
    expect(compareCopies(copy(T2, 1), copy(T1, 40))).toBeGreaterThan(0);
    expect(compareCopies(copy(T1, 99), copy(T2, 1))).toBeLessThan(0);
    expect(laterIncarnation(copy(T2, 1), copy(T1, 40))).toBe(true);
    expect(laterIncarnation(copy(T1, 99), copy(T2, 1))).toBe(false);
  });

  it('a created_at that is not a time as the proxy writes it decides nothing: revisions alone are compared', () => {
    for (const odd of ['', 'yesterday', '2026-03-03', 'March 3, 2026', '2026-03-03T00:00:00+01:00', '9999-99-99T99:99:99.999Z']) {
      expect(compareCopies(copy(odd, 1), copy(T1, 2)), odd).toBeLessThan(0);
      expect(compareCopies(copy(T1, 1), copy(odd, 2)), odd).toBeLessThan(0);
      expect(compareCopies(copy(odd, 3), copy(T1, 2)), odd).toBeGreaterThan(0);
      expect(laterIncarnation(copy(odd, 1), copy(T1, 1)), odd).toBe(false);
    }
  });
});

describe('callers add of a revoked name', () => {
  it('is a later incarnation than the revoked record even when this host\'s clock is behind the one that added it first', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'egress-copies-'));
    try {
      const store = new FileStore(join(dir, 'store.json'));
      const first = (await addToken({ store, actor: 'host-a', now: () => new Date(T2) }, 'caller', 'svc')).record;
      const revoked = await revokeToken({ store, actor: 'host-a', now: () => new Date(T2) }, 'caller', 'svc');
      // Host b's clock is a day behind.
      const again = (await addToken({ store, actor: 'host-b', now: () => new Date(T1) }, 'caller', 'svc')).record;
      expect(again.revision).toBe(3);
      expect(again.created_at).toBe('2026-03-02T08:30:00.001Z');
      expect(compareCopies(again, revoked)).toBeGreaterThan(0);
      expect(laterIncarnation(again, first)).toBe(true);
      // With the clocks right, the time it was added again.
      await revokeToken({ store, actor: 'host-a', now: () => new Date('2026-03-05T00:00:00.000Z') }, 'caller', 'svc');
      expect((await addToken({ store, actor: 'host-a', now: () => new Date('2026-03-05T00:00:01.000Z') }, 'caller', 'svc')).record.created_at).toBe('2026-03-05T00:00:01.000Z');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
