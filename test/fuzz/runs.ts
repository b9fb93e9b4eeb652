/** Property runs: short in `npm test` (and CI), long under `npm run fuzz` (FUZZ_RUNS). */
export function runs(short: number): number {
  const n = Number(process.env.FUZZ_RUNS);
  return Number.isSafeInteger(n) && n > 0 ? n : short;
}
