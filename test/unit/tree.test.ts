import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..', '..');

describe('the tracked files', () => {
  // A merge whose conflict was committed unresolved leaves both sides in a file: in code it breaks
  // the type check, in README.md it says two things at once, and nothing else would notice.
  it('hold no merge conflict markers', () => {
    const files = execFileSync('git', ['ls-files', '-z'], { cwd: root, encoding: 'utf8' }).split('\0').filter((f) => f !== '' && !f.endsWith('.json'));
    const marker = new RegExp(`^(${'<'.repeat(7)}|${'>'.repeat(7)}) `, 'm');
    const conflicted = files.filter((f) => {
      let text: string;
      try {
        text = readFileSync(join(root, f), 'utf8');
      } catch {
        return false;
      }
      return marker.test(text);
    });
    expect(files.length).toBeGreaterThan(50);
    expect(conflicted).toEqual([]);
  });
});
