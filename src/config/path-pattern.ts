/**
 * Allowlist path patterns, matched on whole segments of exactly the path sent upstream
 * (route-relative: the upstream's base path is prepended verbatim and never re-checked).
 * `*` is one non-empty segment; a final `**` is one or more further segments, the first named.
 */

const ONE = Symbol('one segment');
const REST = Symbol('rest');

export type PatternSegment = string | typeof ONE | typeof REST;

export interface PathPattern {
  readonly source: string;
  readonly segments: readonly PatternSegment[];
}

/** Split a path that starts with "/" into its segments: "/" -> [""], "/a/b/" -> ["a", "b", ""]. */
export function splitPath(path: string): string[] {
  return path.slice(1).split('/');
}

export function compilePattern(source: string): PathPattern {
  const segments = splitPath(source).map((s): PatternSegment => (s === '*' ? ONE : s === '**' ? REST : s));
  return Object.freeze({ source, segments: Object.freeze(segments) });
}

export function matchPattern(pattern: PathPattern, pathSegments: readonly string[]): boolean {
  const p = pattern.segments;
  for (let i = 0; i < p.length; i++) {
    const want = p[i];
    if (want === REST) {
      // One or more named segments remain; only the last may be empty (a trailing slash after a
      // name). "/files/" is the folder itself, which most servers treat as "/files": not under it.
      if (pathSegments.length <= i || pathSegments[i] === '') return false;
      for (let j = i; j < pathSegments.length - 1; j++) if (pathSegments[j] === '') return false;
      return true;
    }
    const got = pathSegments[i];
    if (got === undefined) return false;
    if (want === ONE) {
      if (got === '') return false;
    } else if (want !== got) {
      return false;
    }
  }
  return pathSegments.length === p.length;
}

/** Do the segments of `path` start with all of `prefix`? (Matching on segment boundaries: /plaid is not /plaidx.) */
export function hasSegmentPrefix(pathSegments: readonly string[], prefixSegments: readonly string[]): boolean {
  if (pathSegments.length < prefixSegments.length) return false;
  for (let i = 0; i < prefixSegments.length; i++) if (pathSegments[i] !== prefixSegments[i]) return false;
  return true;
}
