import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { RequestAudit } from '../../src/observe/audit.ts';
import { AuditLog, GENESIS, lineHash } from '../../src/observe/audit.ts';
import { verifyAudit } from '../../src/observe/audit-read.ts';
import type { Logger } from '../../src/observe/log.ts';
import { eventually } from '../helpers/proxy.ts';
import { useTempDirs } from '../helpers/temp-dir.ts';

const tempDir = useTempDirs('egress-audit-');

const errors: unknown[] = [];
const log = { error: (...args: unknown[]) => void errors.push(args), warn() {}, info() {} } as unknown as Logger;

function entry(i: number): RequestAudit {
  return {
    requestId: `req-${i}`,
    caller: 'sync-worker',
    route: 'plaid',
    method: 'POST',
    path: `/plaid/accounts/get/${i}`,
    decision: 'allow',
    reason: 'allow[0]',
    upstreamStatus: 200,
    durationMs: i,
    credential: 'plaid-production',
    credentialVersion: 1,
  };
}

/** Write `n` lines (requests and one admin action) through AuditLog, and return the file's lines. */
async function writeChain(n: number, path?: string): Promise<{ path: string; lines: string[] }> {
  const file = path ?? join(await tempDir(), 'logs', 'audit.log');
  const audit = new AuditLog(file, log);
  await audit.open();
  for (let i = 0; i < n; i++) {
    if (i === 2) audit.admin({ actor: 'cli', action: 'keys.rotate', target: 'plaid-production', decision: 'allow', reason: 'ok' });
    else audit.request(entry(i));
  }
  await audit.close();
  const text = await readFile(file, 'utf8');
  return { path: file, lines: text.split('\n').filter((l) => l !== '') };
}

function verifyText(text: string, file = 'audit.log') {
  return verifyAudit([file], async () => text);
}

const join1 = (lines: readonly string[]) => `${lines.join('\n')}\n`;

describe('AuditLog writes a hash chain', () => {
  it('each line carries the hash of the line before; the first carries GENESIS', async () => {
    const { lines } = await writeChain(6);
    expect(lines).toHaveLength(6);
    const parsed = lines.map((l) => JSON.parse(l) as { prev: string; kind: string });
    expect(parsed[0]!.prev).toBe(GENESIS);
    for (let i = 1; i < lines.length; i++) expect(parsed[i]!.prev).toBe(lineHash(lines[i - 1]!));
    expect(parsed[2]!.kind).toBe('admin');
    expect(parsed[3]!.kind).toBe('request');
    expect(errors).toEqual([]);
  });

  it('lineHash is the SHA-256 hex of the line', () => {
    expect(lineHash('')).toBe('e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
    expect(lineHash('a')).toMatch(/^[0-9a-f]{64}$/);
  });

  it('an intact chain verifies, with its line count', async () => {
    const { path, lines } = await writeChain(8);
    const result = await verifyAudit([path], (f) => readFile(f, 'utf8'));
    expect(result).toEqual({ ok: true, lines: 8 });
    expect(await verifyText(join1(lines))).toEqual({ ok: true, lines: 8 });
    // A missing final newline is tolerated.
    expect((await verifyText(lines.join('\n'))).ok).toBe(true);
  });

  it('continues the chain across a reopen (restart)', async () => {
    const first = await writeChain(3);
    const second = await writeChain(3, first.path);
    expect(second.lines).toHaveLength(6);
    expect((JSON.parse(second.lines[3]!) as { prev: string }).prev).toBe(lineHash(second.lines[2]!));
    expect(await verifyText(join1(second.lines))).toEqual({ ok: true, lines: 6 });
  });

  it('continues across rotated files verified in order', async () => {
    const { lines } = await writeChain(6);
    const files: Record<string, string> = { 'audit.log.1': join1(lines.slice(0, 4)), 'audit.log': join1(lines.slice(4)) };
    const read = async (f: string) => files[f]!;
    expect(await verifyAudit(['audit.log.1', 'audit.log'], read)).toEqual({ ok: true, lines: 6 });
    const reversed = await verifyAudit(['audit.log', 'audit.log.1'], read);
    expect(reversed.ok).toBe(false);
    expect(reversed.firstBad).toMatchObject({ file: 'audit.log', line: 1 });
    const reversedPartial = await verifyAudit(['audit.log', 'audit.log.1'], read, { partial: true });
    expect(reversedPartial.firstBad).toMatchObject({ file: 'audit.log.1', line: 1 });
  });

  it('the chain must start at genesis: removing the first lines is caught, unless a later segment is declared partial', async () => {
    const { lines } = await writeChain(5);
    const rest = join1(lines.slice(2));
    const cut = await verifyAudit(['audit.log'], async () => rest);
    expect(cut.ok).toBe(false);
    expect(cut.firstBad).toMatchObject({ line: 1, reason: expect.stringContaining('genesis') });
    expect(await verifyAudit(['audit.log'], async () => rest, { partial: true })).toEqual({ ok: true, lines: 3 });
  });
});

describe('verifyAudit detects tampering', () => {
  it('an edited line breaks the chain at the next line', async () => {
    const { lines } = await writeChain(6);
    const edited = [...lines];
    edited[2] = edited[2]!.replace('keys.rotate', 'keys.rotatE');
    expect(edited[2]).not.toBe(lines[2]);
    const result = await verifyText(join1(edited));
    expect(result.ok).toBe(false);
    expect(result.firstBad).toMatchObject({ file: 'audit.log', line: 4 });
    expect(result.firstBad!.reason).toContain('prev hash');
    expect(result.lines).toBe(3);
  });

  it('an edited prev hash is caught on that line', async () => {
    const { lines } = await writeChain(6);
    const edited = [...lines];
    edited[3] = edited[3]!.replace(/"prev":"[0-9a-f]{64}"/, `"prev":"${'f'.repeat(64)}"`);
    const result = await verifyText(join1(edited));
    expect(result.firstBad).toMatchObject({ line: 4 });
  });

  it('a whitespace-only edit is detected too', async () => {
    const { lines } = await writeChain(4);
    const edited = [...lines];
    edited[1] = `${edited[1]!} `;
    expect((await verifyText(join1(edited))).firstBad).toMatchObject({ line: 3 });
  });

  it('a deleted line is caught where the gap is', async () => {
    const { lines } = await writeChain(6);
    const result = await verifyText(join1([...lines.slice(0, 3), ...lines.slice(4)]));
    expect(result.ok).toBe(false);
    expect(result.firstBad).toMatchObject({ line: 4 });
  });

  it('two swapped lines are caught at the first of them', async () => {
    const { lines } = await writeChain(6);
    const swapped = [...lines];
    [swapped[2], swapped[3]] = [swapped[3]!, swapped[2]!];
    const result = await verifyText(join1(swapped));
    expect(result.ok).toBe(false);
    expect(result.firstBad).toMatchObject({ line: 3 });
  });

  it('an inserted forged line is caught', async () => {
    const { lines } = await writeChain(4);
    const forged = JSON.stringify({ ...(JSON.parse(lines[1]!) as object), request_id: 'forged' });
    const result = await verifyText(join1([...lines.slice(0, 2), forged, ...lines.slice(2)]));
    expect(result.ok).toBe(false);
    expect(result.firstBad).toMatchObject({ line: 3 });
  });

  it('a line that is not JSON, or has no prev, is reported with its number', async () => {
    const { lines } = await writeChain(4);
    const notJson = await verifyText(join1([lines[0]!, 'garbage', ...lines.slice(1)]));
    expect(notJson.firstBad).toMatchObject({ line: 2, reason: 'not a JSON line' });
    const noPrev = [...lines];
    noPrev[1] = JSON.stringify({ ...(JSON.parse(lines[1]!) as object), prev: undefined });
    expect((await verifyText(join1(noPrev))).firstBad).toMatchObject({ line: 2, reason: 'no prev hash' });
    const blank = await verifyText(join1([lines[0]!, '', ...lines.slice(1)]));
    expect(blank.ok).toBe(false);
    expect(blank.firstBad!.line).toBe(2);
  });

  it('a tampered file on disk fails verification through the file reader', async () => {
    const { path, lines } = await writeChain(5);
    await writeFile(path, join1([...lines.slice(0, 1), ...lines.slice(2)]));
    const result = await verifyAudit([path], (f) => readFile(f, 'utf8'));
    expect(result.ok).toBe(false);
    expect(result.firstBad).toMatchObject({ file: path, line: 2 });
  });
});

describe('torn lines and recovery lines', () => {
  const recovery = (torn: string, prev: string, extra: object = {}) => JSON.stringify({ time: 't', kind: 'recovery', reason: 'write_failed', ...extra, torn_sha256: lineHash(torn), torn_bytes: torn.length, prev });

  it('lines cut short are accepted only before the recovery line that carries their hash, which continues the chain', async () => {
    const { lines } = await writeChain(3);
    const fragment = lines[2]!.slice(0, 40);
    const good = [lines[0]!, lines[1]!, fragment, recovery(fragment, lineHash(lines[1]!), { lost_lines: 1 })];
    expect(await verifyText(join1(good))).toEqual({ ok: true, lines: 3, torn: [{ file: 'audit.log', line: 3 }], lost: [{ file: 'audit.log', line: 4, lines: 1 }] });
    // Two in a row (a recovery attempt refused in turn): one hash over both.
    const two = [lines[0]!, fragment, '{"time":"t","kin', recovery(`${fragment}\n{"time":"t","kin`, lineHash(lines[0]!))];
    expect((await verifyText(join1(two))).ok).toBe(true);
    // The fragment changed, or removed from before its recovery line: caught.
    const changed = [...good];
    changed[2] = `${fragment.slice(0, -1)}X`;
    expect((await verifyText(join1(changed))).firstBad).toMatchObject({ line: 3, reason: 'not a JSON line' });
    const removed = [lines[0]!, lines[1]!, good[3]!];
    expect((await verifyText(join1(removed))).firstBad).toMatchObject({ line: 3, reason: expect.stringContaining('missing') });
    // A fragment at the very end is a file cut short.
    expect((await verifyText(join1([lines[0]!, fragment]))).firstBad).toMatchObject({ line: 2, reason: expect.stringContaining('the last line is incomplete') });
  });
});

describe("the writer's head: the last line known to be in the file", () => {
  const lastHash = async (path: string) => lineHash((await readFile(path, 'utf8')).split('\n').filter((l) => l !== '').at(-1)!);

  it('is GENESIS with nothing written, then the hash of the last line each write put in the file, with the count of lines this process wrote', async () => {
    const path = join(await tempDir(), 'audit.log');
    const audit = new AuditLog(path, log);
    await audit.open();
    try {
      expect(audit.head()).toMatchObject({ file: path, hash: GENESIS, lines_written: 0, pending: 0 });
      for (let i = 0; i < 4; i++) audit.request(entry(i));
      // Taken but not yet in the file: not in the head, and counted as pending.
      expect(audit.head()).toMatchObject({ hash: GENESIS, lines_written: 0, pending: 4 });
      await eventually(() => audit.head().lines_written === 4, 2_000, 'the lines to land');
      expect(audit.head()).toMatchObject({ hash: await lastHash(path), pending: 0 });
      expect(Date.parse(audit.head().time)).toBeGreaterThan(Date.now() - 5_000);
    } finally {
      await audit.close();
    }
  });

  it('a restarted writer starts from the last line already in the file (none written by it yet); after a torn line, from its recovery line', async () => {
    const { path } = await writeChain(3);
    const reopened = new AuditLog(path, log);
    await reopened.open();
    expect(reopened.head()).toMatchObject({ hash: await lastHash(path), lines_written: 0, pending: 0 });
    await reopened.close();
    const text = await readFile(path, 'utf8');
    await writeFile(path, text.slice(0, -20));
    const recovered = new AuditLog(path, log);
    await recovered.open();
    try {
      const lines = (await readFile(path, 'utf8')).split('\n').filter((l) => l !== '');
      expect(JSON.parse(lines.at(-1)!)).toMatchObject({ kind: 'recovery', reason: 'torn_line' });
      expect(recovered.head()).toMatchObject({ hash: lineHash(lines.at(-1)!), lines_written: 1, pending: 0 });
    } finally {
      await recovered.close();
    }
  });

  it('follows the lines across a rotation (the head line may then be in audit.log.1), and after close says what the file ends with', async () => {
    const path = join(await tempDir(), 'audit.log');
    const audit = new AuditLog(path, log, { maxBytes: 1_000, keep: 3, alsoStdout: false });
    await audit.open();
    // One line at a time: each rotation waits for the file the one before it opened.
    for (let i = 0; i < 12; i++) {
      audit.request(entry(i));
      await eventually(() => audit.head().lines_written === i + 1, 2_000, 'the line to land');
    }
    await audit.close();
    expect(await readFile(`${path}.1`, 'utf8')).not.toBe('');
    expect(audit.head()).toMatchObject({ hash: await lastHash(path), lines_written: 12, pending: 0 });
  });
});

describe('verifyAudit against a recorded head', () => {
  it('finds the line whose hash is the head, and says where; a file cut before that line is intact but does not reach it', async () => {
    const { lines } = await writeChain(6);
    const head = lineHash(lines[3]!);
    expect(await verifyText(join1(lines), 'audit.log')).toEqual({ ok: true, lines: 6 });
    expect(await verifyAudit(['audit.log'], async () => join1(lines), { head })).toEqual({ ok: true, lines: 6, head: { hash: head, found: true, file: 'audit.log', line: 4 } });
    // Cut down to the head's line: still there. Cut before it: the chain is intact, the head is not.
    expect((await verifyAudit(['audit.log'], async () => join1(lines.slice(0, 4)), { head })).head).toMatchObject({ found: true, line: 4 });
    const cut = await verifyAudit(['audit.log'], async () => join1(lines.slice(0, 3)), { head });
    expect(cut).toEqual({ ok: true, lines: 3, head: { hash: head, found: false } });
    // Across rotated files, in the older one.
    const files: Record<string, string> = { 'audit.log.1': join1(lines.slice(0, 4)), 'audit.log': join1(lines.slice(4)) };
    expect((await verifyAudit(['audit.log.1', 'audit.log'], async (f) => files[f]!, { head })).head).toEqual({ hash: head, found: true, file: 'audit.log.1', line: 4 });
  });

  it('GENESIS (recorded before any line) is reached by any chain checked from its start; a later segment whose first line follows the head reaches it too', async () => {
    const { lines } = await writeChain(4);
    expect((await verifyAudit(['audit.log'], async () => '', { head: GENESIS })).head).toEqual({ hash: GENESIS, found: true });
    expect((await verifyAudit(['audit.log'], async () => join1(lines), { head: GENESIS })).head).toEqual({ hash: GENESIS, found: true });
    expect((await verifyAudit(['audit.log'], async () => join1(lines.slice(2)), { head: GENESIS, partial: true })).head).toEqual({ hash: GENESIS, found: false });
    const before = lineHash(lines[1]!);
    expect((await verifyAudit(['audit.log'], async () => join1(lines.slice(2)), { head: before, partial: true })).head).toEqual({ hash: before, found: true });
  });
});

describe('rotation never removes rotated files it has not replaced', () => {
  const fileLines = async (file: string) => (await readFile(file, 'utf8').catch(() => '')).split('\n').filter((l) => l !== '');

  it('a rotation that fails (the file at the path removed) leaves the rotated files as they were, however many lines follow', async () => {
    const path = join(await tempDir(), 'audit.log');
    const audit = new AuditLog(path, log, { maxBytes: 1_000, keep: 3, alsoStdout: false });
    await audit.open();
    for (let i = 0; i < 8; i++) {
      audit.request(entry(i));
      await eventually(() => audit.head().lines_written === i + 1, 2_000, 'the line to land');
    }
    const rotated = await Promise.all([1, 2, 3].map((n) => fileLines(`${path}.${n}`)));
    expect(rotated[0]!.length).toBeGreaterThan(0);
    // Removed while it is due for rotation: every line until the writer notices asks for a rotation.
    await rm(path);
    for (let i = 8; i < 20; i++) audit.request(entry(i));
    await audit.close();
    expect(await Promise.all([1, 2, 3].map((n) => fileLines(`${path}.${n}`)))).toEqual(rotated);
  });
});

describe('a rotation waits for the file its stream writes to be open', () => {
  const fileLines = async (file: string) => (await readFile(file, 'utf8').catch(() => '')).split('\n').filter((l) => l !== '');

  it('a file already at its size when the writer starts: lines queued before the first rotation land in audit.log.1, after the lines it had', async () => {
    const { path, lines: before } = await writeChain(3);
    const size = (await readFile(path)).length;
    const lineBytes = before[0]!.length + 1;
    // The first line fits; the second is due for rotation while the writer's stream is still opening its file.
    const audit = new AuditLog(path, log, { maxBytes: size + Math.floor(lineBytes * 1.5), keep: 3, alsoStdout: false });
    await audit.open();
    audit.request(entry(0));
    audit.request(entry(1));
    let n = 2;
    for (; n < 8 && !(await fileLines(`${path}.1`)).some((l) => l.includes('"req-')); n++) {
      await eventually(() => audit.head().lines_written === n, 2_000, 'the lines to land');
      audit.request(entry(n));
    }
    await audit.close();
    const rotated = await fileLines(`${path}.1`);
    const current = await fileLines(path);
    expect(rotated.slice(0, before.length)).toEqual(before);
    expect(rotated.slice(before.length).map((l) => JSON.parse(l).request_id)[0]).toBe('req-0');
    expect(current.some((l) => l.includes('"req-0"'))).toBe(false);
    expect(await fileLines(`${path}.2`)).toEqual([]);
    expect(await verifyAudit([`${path}.1`, path], (f) => readFile(f, 'utf8'))).toEqual({ ok: true, lines: before.length + n });
  });
});
