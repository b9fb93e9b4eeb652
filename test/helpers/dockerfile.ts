import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ROOT } from './cli.ts';

/** One instruction of the Dockerfile: its keyword and its arguments, continuation lines joined. */
export interface Instruction {
  readonly keyword: string;
  readonly args: string;
}

/** A build stage: what it starts FROM and its instructions in order. */
export interface Stage {
  readonly from: string;
  readonly instructions: readonly Instruction[];
}

/**
 * The repository's Dockerfile, read into stages: enough of the format for the tests that check the
 * image against `npm start` and lay the image out on disk (comments dropped, `\` continuations
 * joined, one instruction per line). It throws on anything it does not expect, so a Dockerfile
 * change the tests cannot follow fails them instead of passing unnoticed.
 */
export async function readDockerfile(): Promise<Stage[]> {
  const text = await readFile(join(ROOT, 'Dockerfile'), 'utf8');
  const logical: string[] = [];
  let pending = '';
  for (const raw of text.split('\n')) {
    const line = raw.trimEnd();
    if (pending === '' && (line.trim() === '' || line.trimStart().startsWith('#'))) continue;
    if (line.endsWith('\\')) {
      pending += `${line.slice(0, -1).trim()} `;
      continue;
    }
    logical.push(pending + line.trim());
    pending = '';
  }
  if (pending !== '') throw new Error('Dockerfile: a continuation line at the end of the file');
  const stages: { from: string; instructions: Instruction[] }[] = [];
  for (const line of logical) {
    const match = /^([A-Z]+)\s+(.*)$/.exec(line);
    if (!match) throw new Error(`Dockerfile: cannot read the line ${JSON.stringify(line)}`);
    const [, keyword, args] = match as unknown as [string, string, string];
    if (keyword === 'FROM') stages.push({ from: args, instructions: [] });
    else if (stages.length === 0) throw new Error(`Dockerfile: ${keyword} before the first FROM`);
    else stages.at(-1)!.instructions.push({ keyword, args });
  }
  return stages;
}

/** The final stage's `ENV NAME=value …` pairs (values without spaces or quotes, as ours are). */
export function imageEnv(stage: Stage): Record<string, string> {
  const env: Record<string, string> = {};
  for (const { args } of stage.instructions.filter((i) => i.keyword === 'ENV')) {
    for (const word of args.split(/\s+/).filter(Boolean)) {
      const eq = word.indexOf('=');
      if (eq <= 0 || /["']/.test(word)) throw new Error(`Dockerfile: ENV ${JSON.stringify(word)} is not NAME=value`);
      env[word.slice(0, eq)] = word.slice(eq + 1);
    }
  }
  return env;
}

/** The arguments of the stage's only `keyword` instruction (ENTRYPOINT, USER, …). */
export function only(stage: Stage, keyword: string): string {
  const found = stage.instructions.filter((i) => i.keyword === keyword);
  if (found.length !== 1) throw new Error(`Dockerfile: expected one ${keyword} in the stage FROM ${stage.from}, found ${found.length}`);
  return found[0]!.args;
}
