/**
 * Which claimed parameter a caller's name stands for, as server frameworks read names: decoded
 * ("+" as space), in any letter case (ASP.NET matches names without regard to case and binds the
 * first value), with a "[...]" suffix (qs, PHP and Rack read "api_key[]" and "api_key[0]" as
 * api_key), or as PHP names it (Laravel, Symfony): leading spaces dropped, "." and " " read as "_".
 * The query (removeParams) and form bodies (form-body.ts) are checked against the same names.
 */

/** A route's claimed names as they are compared, made once per set (every route claims one at least: `_method`). */
export function ownedNames(claimed: ReadonlySet<string>): ReadonlyMap<string, string> {
  let owned = compared.get(claimed);
  if (!owned) {
    owned = new Map([...claimed].map((name) => [phpName(name).toLowerCase(), name]));
    compared.set(claimed, owned);
  }
  return owned;
}

const compared = new WeakMap<ReadonlySet<string>, ReadonlyMap<string, string>>();

/** The claimed name a raw, percent-encoded `name=value` piece stands for, if any. */
export function claimedPiece(piece: string, owned: ReadonlyMap<string, string>): string | undefined {
  const rawName = piece.split('=', 1)[0]!;
  let name: string;
  try {
    name = decodeURIComponent(rawName.replace(/\+/g, ' '));
  } catch {
    name = rawName;
  }
  return claimedName(name, owned);
}

/**
 * The claimed name a decoded field name stands for, if any: without a "[...]" suffix; and, for a
 * "[" with no "]" after it, as PHP reads that: "_" ("api[key" is api_key).
 */
export function claimedName(name: string, owned: ReadonlyMap<string, string>): string | undefined {
  const bracket = name.indexOf('[');
  const names = [phpName(bracket > 0 ? name.slice(0, bracket) : name).toLowerCase()];
  if (bracket > 0 && !name.includes(']', bracket)) names.push(phpName(name.replaceAll('[', '_')).toLowerCase());
  for (const n of names) {
    const claimed = owned.get(n);
    if (claimed !== undefined) return claimed;
  }
  return undefined;
}

/** A name as PHP registers it in $_GET and $_POST: without leading spaces, with "." and " " as "_" (".method" is _method). */
function phpName(name: string): string {
  return name.replace(/^ +/, '').replace(/[. ]/g, '_');
}
