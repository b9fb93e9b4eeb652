import { X509Certificate } from 'node:crypto';
import { constants, type BigIntStats } from 'node:fs';
import { lstat, open, readdir, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { isMap, isScalar, isSeq, LineCounter, Parser, parseDocument, visit, type Document, type Node } from 'yaml';
import type { z } from 'zod';
import { UserError } from '../errors.ts';
import type { CompiledConfig, CompiledRoute } from './compile-routes.ts';
import { applyPreset } from './apply-preset.ts';
import { compileRoute, crossCheck } from './compile-routes.ts';
import { routeFileSchema } from './route-schema.ts';

export interface ConfigProblem {
  readonly file: string;
  readonly line: number;
  readonly col: number;
  readonly message: string;
}

export class ConfigError extends UserError {
  readonly problems: readonly ConfigProblem[];
  constructor(problems: readonly ConfigProblem[]) {
    super(problems.map(formatProblem).join('\n'));
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

export function formatProblem(p: ConfigProblem): string {
  return `${p.file}:${p.line}:${p.col}: ${p.message}`;
}

const ROUTE_FILE = /\.ya?ml$/;

/**
 * Load a folder of route files. Every file is checked and every problem reported; any problem
 * rejects the folder whole, so a caller keeps its last good configuration. `named` collects the
 * files the routes name (upstream_ca), resolved, also those that could not be read, and route files
 * that are links to files elsewhere: the reloader watches them.
 */
export async function loadRoutes(dir: string, named = new Set<string>()): Promise<CompiledConfig> {
  // Files are read one after another: a folder that changes meanwhile (a deploy writing several
  // files, a new release swapped in under a link) would give a mix of two states, which is
  // applied, or refused although neither state is wrong. Read again until what was read is still,
  // unchanged, what the folder holds.
  for (let attempt = 1; ; attempt++) {
    const stamps = new Map<string, string>();
    const outcome = await loadOnce(resolve(dir), named, stamps).then((config) => ({ config }), (error: unknown) => ({ error }));
    if (attempt === MAX_READS || (await stillCurrent(stamps))) {
      if ('error' in outcome) throw outcome.error;
      readings.set(outcome.config, stamps);
      return outcome.config;
    }
  }
}

/** What each loaded configuration was read from, to tell later whether it is still what the folder holds. */
const readings = new WeakMap<CompiledConfig, ReadonlyMap<string, string>>();

/**
 * Whether the folder or a file `config` was read from has changed since it was read. A watch armed
 * after the first load (the proxy opens its store and audit log in between) sees no event for an
 * edit made meanwhile: the watcher asks this once it is armed.
 */
export async function changedSinceLoad(config: CompiledConfig): Promise<boolean> {
  const stamps = readings.get(config);
  return stamps !== undefined && !(await stillCurrent(stamps));
}

/** How many times a folder that keeps changing while it is read is read; the last reading stands (its changes reload it again). */
const MAX_READS = 3;

/** What a path names, to tell whether it changed: device, inode, size, modification and change times. */
function stampOf(info: BigIntStats): string {
  return `${info.dev}:${info.ino}:${info.size}:${info.mtimeNs}:${info.ctimeNs}`;
}

async function stillCurrent(stamps: ReadonlyMap<string, string>): Promise<boolean> {
  for (const [key, stamp] of stamps) {
    const now = key.startsWith('folder:')
      ? await listing(key.slice('folder:'.length)).then((names) => JSON.stringify(names), () => 'absent')
      : await stat(key, { bigint: true }).then(stampOf, () => 'absent');
    if (now !== stamp) return false;
  }
  return true;
}

async function listing(root: string): Promise<string[]> {
  return (await readdir(root)).sort();
}

async function loadOnce(root: string, named: Set<string>, stamps: Map<string, string>): Promise<CompiledConfig> {
  let entries: string[];
  try {
    const all = await listing(root);
    stamps.set(`folder:${root}`, JSON.stringify(all));
    entries = all.filter((n) => !n.startsWith('.'));
  } catch (err) {
    throw new ConfigError([{ file: root, line: 0, col: 0, message: `cannot read the routes folder (${(err as NodeJS.ErrnoException).code ?? 'error'})` }]);
  }
  const names = entries.filter((n) => ROUTE_FILE.test(n));
  const problems: ConfigProblem[] = [];
  // "stripe.YAML" is meant as a route file: skipped silently, its route would just be missing.
  for (const n of entries) {
    if (!ROUTE_FILE.test(n) && /\.ya?ml$/i.test(n)) problems.push({ file: join(root, n), line: 0, col: 0, message: 'route files end in .yaml or .yml, in lower case: rename it, or it is not loaded' });
  }
  const routes: CompiledRoute[] = [];
  const keyPositions = new Map<CompiledRoute, ParsedRoute['keyAt']>();
  for (const name of names) {
    const file = join(root, name);
    // A route file linked in from elsewhere (a config-management checkout): an edit made there
    // changes nothing in this folder, so the folder's watch never sees it. Watched as named files are.
    if (await isLink(file)) named.add(file);
    const result = await loadRouteFile(file, named, stamps);
    if ('problems' in result) problems.push(...result.problems);
    else {
      routes.push(result.route);
      keyPositions.set(result.route, result.keyAt);
    }
  }
  problems.push(...crossCheck(routes, (route, path) => keyPositions.get(route)!(path)));
  if (problems.length > 0) throw new ConfigError(problems);
  return Object.freeze({ routes: Object.freeze(routes), files: Object.freeze(names.map((n) => join(root, n))), namedFiles: Object.freeze([...named].sort()), loadedAt: new Date() });
}

async function isLink(path: string): Promise<boolean> {
  try {
    return (await lstat(path)).isSymbolicLink();
  } catch {
    return false;
  }
}

/** A route file (or a CA file it names) larger than this is refused, not read. */
export const MAX_ROUTE_FILE_BYTES = 1024 * 1024;

/**
 * A regular file's text, up to `max` bytes. Opened without blocking and checked before reading: a
 * FIFO, a device (/dev/zero) or a huge file under a route file's name would otherwise hang every
 * later reload behind it, or fill memory.
 */
export async function readRegularFile(path: string, max = MAX_ROUTE_FILE_BYTES, stamps?: Map<string, string>): Promise<string> {
  return (await readRegularBytes(path, max, stamps)).toString('utf8');
}

/** readRegularFile's bytes, undecoded; `stamps` records what was read (or that nothing was there). */
export async function readRegularBytes(path: string, max = MAX_ROUTE_FILE_BYTES, stamps?: Map<string, string>): Promise<Buffer> {
  stamps?.set(path, 'absent');
  const handle = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    const info = await handle.stat({ bigint: true });
    stamps?.set(path, stampOf(info));
    if (!info.isFile()) throw Object.assign(new Error(`${path} is not a regular file`), { code: 'ENOTREGULAR' });
    if (info.size > BigInt(max)) throw Object.assign(new Error(`${path} is larger than ${max} bytes`), { code: 'EFBIG' });
    return await handle.readFile();
  } finally {
    await handle.close();
  }
}

/**
 * A route file's text. YAML streams are Unicode (YAML 1.2 §5.2), and a byte that is not UTF-8 read
 * leniently became U+FFFD: a value (a body_contains, a header template's literal) silently differed
 * from the file. Such a file is refused at its first bad byte. A byte order mark is dropped.
 */
function decodeRouteFile(bytes: Buffer): string | { line: number; col: number } {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    // Walk the lenient decoding beside the bytes: the first U+FFFD that the file did not spell out
    // (EF BF BD) stands where the first bad byte was.
    const lenient = bytes.toString('utf8');
    let at = 0;
    let line = 1;
    let lineStart = 0;
    for (let i = 0; i < lenient.length; i++) {
      const code = lenient.codePointAt(i)!;
      if (code === 0xfffd && !(bytes[at] === 0xef && bytes[at + 1] === 0xbf && bytes[at + 2] === 0xbd)) return { line, col: i - lineStart + 1 };
      if (code === 0x0a) {
        line++;
        lineStart = i + 1;
      }
      if (code > 0xffff) i++;
      at += code < 0x80 ? 1 : code < 0x800 ? 2 : code < 0x10000 ? 3 : 4;
    }
    return { line, col: 1 };
  }
}

export async function loadRouteFile(file: string, named?: Set<string>, stamps?: Map<string, string>): Promise<ParsedRoute | { problems: ConfigProblem[] }> {
  let bytes: Buffer;
  try {
    bytes = await readRegularBytes(file, MAX_ROUTE_FILE_BYTES, stamps);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOTREGULAR' ? 'not a regular file' : code === 'EFBIG' ? `larger than ${MAX_ROUTE_FILE_BYTES / 1024 / 1024} MiB` : (code ?? 'error');
    return { problems: [{ file, line: 0, col: 0, message: `cannot read (${why})` }] };
  }
  const text = decodeRouteFile(bytes);
  if (typeof text !== 'string') return { problems: [{ file, ...text, message: 'not UTF-8: route files are UTF-8 text (save the file as UTF-8)' }] };
  return parseRouteText(text, file, async (caPath) => {
    const path = resolve(dirname(file), caPath);
    named?.add(path);
    return readRegularFile(path, MAX_ROUTE_FILE_BYTES, stamps);
  });
}

/** A route file that compiled, and where its keys are written (for problems found across files). */
export interface ParsedRoute {
  readonly route: CompiledRoute;
  readonly keyAt: (path: readonly string[]) => { line: number; col: number };
}

/**
 * YAML 1.2 core schema only: no `<<` merge keys, no custom tags, duplicate keys are errors.
 * Keys reach zod as own properties, and the strict schema refuses any it does not name,
 * `__proto__` included.
 */
export async function parseRouteText(text: string, file: string, readCa: (path: string) => Promise<string>): Promise<ParsedRoute | { problems: ConfigProblem[] }> {
  const deep = tooDeep(text);
  if (deep !== undefined) return { problems: [{ file, ...positionIn(text, deep), message: `collections nested more than ${MAX_NESTING} deep (a route file needs about six levels)` }] };
  const lineCounter = new LineCounter();
  // Duplicate keys are found below, in one pass: the library's own check (uniqueKeys) compares each
  // key with every earlier key of its map, and 50,000 keys held the event loop for half a minute.
  const doc = parseDocument(text, { lineCounter, uniqueKeys: false, merge: false, schema: 'core', prettyErrors: false, strict: true });
  const at = (offset: number | undefined): { line: number; col: number } => {
    const pos = lineCounter.linePos(offset ?? 0);
    return { line: pos.line, col: pos.col };
  };
  if (doc.errors.length > 0) {
    return { problems: firstProblems(doc.errors, (e) => ({ file, ...at(e.pos[0]), message: e.message.split('\n')[0] ?? e.message })) };
  }
  if (doc.warnings.length > 0) {
    return { problems: firstProblems(doc.warnings, (e) => ({ file, ...at(e.pos[0]), message: e.message.split('\n')[0] ?? e.message })) };
  }
  // Anchors and aliases make one value stand for another: in an allowlist that is a way to hide
  // what a rule permits, and aliases are how merge-key pollution travels. Refuse both.
  const refused: ConfigProblem[] = [];
  visit(doc, {
    Alias(_key, node) {
      refused.push({ file, ...at(node.range?.[0]), message: `aliases (*${node.source}) are not allowed in route files` });
    },
    Node(_key, node) {
      if ('anchor' in node && node.anchor) refused.push({ file, ...at(node.range?.[0]), message: `anchors (&${node.anchor}) are not allowed in route files` });
    },
    // The strict schemas refuse it as an unknown key, but a map of names (inject headers, query
    // params, body fields) is a zod record, which skips "__proto__" without a word: that header
    // was simply not sent. Refused wherever it stands.
    // Keys as they are once loaded: 1 and "1" are one key there, and the later one would win.
    Map(_key, map) {
      const seen = new Set<string>();
      for (const { key } of map.items) {
        if (!isScalar(key)) continue;
        const name = key.value === null ? '' : String(key.value);
        if (seen.has(name)) refused.push({ file, ...at(key.range?.[0]), message: `map keys must be unique: "${name}" is written twice` });
        seen.add(name);
      }
    },
    Pair(_key, pair) {
      if (isScalar(pair.key) && pair.key.value === '__proto__') refused.push({ file, ...at(pair.key.range?.[0]), message: 'key "__proto__" is not allowed in route files' });
    },
  });
  if (refused.length > 0) return { problems: firstProblems(refused, (p) => p) };
  // Said plainly: the schema's own words for this are "expected object, received null".
  if (!isMap(doc.contents)) {
    const what = 'a route file is a map of keys (name, prefix, upstream, credential, inject, allow, …)';
    const empty = doc.contents === null || (isScalar(doc.contents) && doc.contents.value === null);
    return { problems: [{ file, ...at(doc.contents?.range?.[0]), message: empty ? `the file is empty: ${what}` : what }] };
  }
  const expanded = applyPreset(doc.toJS({ maxAliasCount: 0 }));
  if ('problem' in expanded) {
    return { problems: [{ file, ...at(issueOffset(doc, expanded.problem)), message: expanded.problem.message }] };
  }
  const parsed = routeFileSchema.safeParse(expanded.data);
  if (!parsed.success) {
    return {
      problems: firstProblems(flattenUnions(parsed.error.issues), (issue) => {
        // A value the file did not write came from its preset: point at the preset line.
        const inherited = typeof issue.path[0] === 'string' && expanded.fromPreset.has(issue.path[0]);
        return inherited
          ? { file, ...at(issueOffset(doc, { path: ['preset'] })), message: `(from preset "${expanded.preset}") ${issueMessage(issue)}` }
          : { file, ...at(issueOffset(doc, issue)), message: issueMessage(issue) };
      }),
    };
  }
  let ca: string | undefined;
  if (parsed.data.upstream_ca) {
    try {
      ca = await readCa(parsed.data.upstream_ca);
    } catch (err) {
      return { problems: [{ file, ...at(issueOffset(doc, { path: ['upstream_ca'] })), message: `upstream_ca: cannot read "${parsed.data.upstream_ca}" (${(err as NodeJS.ErrnoException).code ?? 'error'})` }] };
    }
    const problem = caProblem(ca);
    if (problem !== undefined) {
      return { problems: [{ file, ...at(issueOffset(doc, { path: ['upstream_ca'] })), message: `upstream_ca: ${problem}` }] };
    }
  }
  const stem = basename(file).replace(ROUTE_FILE, '');
  if (stem !== parsed.data.name) {
    return { problems: [{ file, ...at(issueOffset(doc, { path: ['name'] })), message: `name "${parsed.data.name}" must match the file name "${stem}"` }] };
  }
  const keyAt = (path: readonly string[]): { line: number; col: number } => {
    // A key the file did not write came from its preset (a prefix): point at the preset line.
    if (expanded.fromPreset.has(path[0]!)) return at(issueOffset(doc, { path: ['preset'] }));
    const list = path.length === 2 ? doc.getIn([path[0]], true) : undefined;
    const item = isSeq(list) ? list.items.findIndex((node) => isScalar(node) && node.value === path[1]) : -1;
    return at(issueOffset(doc, { path: item >= 0 ? [path[0]!, item] : path }));
  };
  return { route: compileRoute(parsed.data, file, ca), keyAt };
}

const PEM_BEGIN = '-----BEGIN CERTIFICATE-----';
const PEM_END = '-----END CERTIFICATE-----';

/**
 * What is wrong with an upstream_ca bundle, if anything: every certificate in it must parse. The
 * TLS stack skips one that does not (altered, cut short, a placeholder) without a word, and every
 * handshake with the upstream it was meant for then fails; a bundle caught half-written would be
 * loaded so too. Text between the certificates (openssl's subject= lines, comments) is allowed.
 */
function caProblem(text: string): string | undefined {
  const blocks = text.split(PEM_BEGIN).slice(1);
  if (blocks.length === 0) return 'the file holds no PEM certificate';
  for (const [i, block] of blocks.entries()) {
    const end = block.indexOf(PEM_END);
    try {
      // Base64 has no "-": another BEGIN line, or none, before this block's END means it was cut short.
      if (end < 0 || block.slice(0, end).includes('-')) throw new Error('cut short');
      new X509Certificate(`${PEM_BEGIN}${block.slice(0, end)}${PEM_END}`);
    } catch {
      return `certificate ${i + 1} of the file is not a valid PEM certificate (cut short or altered)`;
    }
  }
  return undefined;
}

/**
 * At most this many problems are reported for one file, then how many more there are. Each is
 * located by a search of its map: 45,000 bad header names took 12 s, on the event loop.
 */
export const MAX_PROBLEMS_PER_FILE = 50;

/** The first MAX_PROBLEMS_PER_FILE problems, and a last one that counts the rest, placed where the next one is. */
function firstProblems<T>(items: readonly T[], toProblem: (item: T) => ConfigProblem): ConfigProblem[] {
  const shown = items.slice(0, MAX_PROBLEMS_PER_FILE).map(toProblem);
  const more = items.length - MAX_PROBLEMS_PER_FILE;
  if (more > 0) shown.push({ ...toProblem(items[MAX_PROBLEMS_PER_FILE]!), message: `and ${more} more problem${more === 1 ? '' : 's'} in this file` });
  return shown;
}

/** Maps and lists nested deeper than this are refused before the file is composed. */
export const MAX_NESTING = 64;

interface CstToken {
  readonly type?: string;
  readonly offset?: number;
  readonly value?: CstToken;
  readonly items?: readonly { readonly key?: CstToken | null; readonly value?: CstToken | null }[];
}

/**
 * The offset of a collection nested deeper than MAX_NESTING, or undefined. The YAML composer
 * recurses once per level: a 1 MiB file holds hundreds of thousands of levels ("[[[…" or "- - -…")
 * and overflowed the call stack, a RangeError that named no file. The parser's tokens are walked
 * here with a stack of our own.
 */
function tooDeep(text: string): number | undefined {
  const pending: [CstToken | null | undefined, number][] = [];
  for (const token of new Parser().parse(text)) pending.push([token as CstToken, 0]);
  while (pending.length > 0) {
    const [token, depth] = pending.pop()!;
    if (!token) continue;
    const level = token.type === 'block-map' || token.type === 'block-seq' || token.type === 'flow-collection' ? depth + 1 : depth;
    if (level > MAX_NESTING) return token.offset ?? 0;
    if (token.type === 'document') pending.push([token.value, level]);
    for (const item of token.items ?? []) pending.push([item.key, level], [item.value, level]);
  }
  return undefined;
}

/** 1-based line and column of a string offset, counted as the YAML parser's LineCounter counts them. */
function positionIn(text: string, offset: number): { line: number; col: number } {
  let line = 1;
  let start = 0;
  for (let i = text.indexOf('\n'); i !== -1 && i < offset; i = text.indexOf('\n', i + 1)) {
    line++;
    start = i + 1;
  }
  return { line, col: offset - start + 1 };
}

/**
 * A union ("one scheme or a list of them") that fails reports "Invalid input" for the whole value.
 * Report instead the issues of the alternative that got furthest: the one that did not reject the
 * value's very type, with paths made absolute.
 */
function flattenUnions(issues: readonly z.core.$ZodIssue[]): z.core.$ZodIssue[] {
  const out: z.core.$ZodIssue[] = [];
  for (const issue of issues) {
    if (issue.code === 'invalid_union' && issue.errors.length > 0) {
      const rejectsType = (branch: readonly z.core.$ZodIssue[]) => branch.some((i) => i.path.length === 0 && i.code === 'invalid_type');
      const best = issue.errors.find((branch) => !rejectsType(branch));
      if (best) {
        out.push(...flattenUnions(best.map((i) => ({ ...i, path: [...issue.path, ...i.path] }) as z.core.$ZodIssue)));
        continue;
      }
      out.push({ ...issue, message: 'expected one injection ({scheme: …}) or a list of them' } as z.core.$ZodIssue);
      continue;
    }
    out.push(issue);
  }
  return out;
}

function issueMessage(issue: z.core.$ZodIssue): string {
  const where = issue.path.length > 0 ? `${issue.path.join('.')}: ` : '';
  if (issue.code === 'unrecognized_keys') return `${where}unknown key${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `"${k}"`).join(', ')}`;
  return `${where}${issue.message}`;
}

/** The source offset of the node an issue points at: the unknown key itself, or the nearest existing parent. */
function issueOffset(doc: Document, issue: { path: readonly PropertyKey[]; code?: string; keys?: string[] }): number | undefined {
  const path = issue.path.map((p) => (typeof p === 'symbol' ? String(p) : p));
  for (let n = path.length; n >= 0; n--) {
    const node = (n === 0 ? doc.contents : doc.getIn(path.slice(0, n), true)) as Node | null | undefined;
    if (!node || !('range' in node) || !node.range) continue;
    if (n === path.length && issue.code === 'unrecognized_keys' && isMap(node)) {
      const pair = node.items.find((item) => String((item.key as { value?: unknown } | null)?.value) === issue.keys?.[0]);
      const keyNode = pair?.key as Node | undefined;
      if (keyNode?.range) return keyNode.range[0];
    }
    return node.range[0];
  }
  return undefined;
}
