/**
 * Requests of each caller being answered at once. A caller's slow requests would otherwise take
 * every connection of an upstream's pool, and every other caller of that upstream would queue
 * behind them: past the limit a caller's requests are refused (429) instead.
 */
export class CallerSlots {
  readonly #max: number;
  readonly #taken = new Map<string, number>();

  constructor(max: number) {
    this.#max = max;
  }

  /** Take a slot for one request of `caller`; false when the caller already holds them all. */
  take(caller: string): boolean {
    const taken = this.#taken.get(caller) ?? 0;
    if (taken >= this.#max) return false;
    this.#taken.set(caller, taken + 1);
    return true;
  }

  release(caller: string): void {
    const left = (this.#taken.get(caller) ?? 1) - 1;
    if (left > 0) this.#taken.set(caller, left);
    else this.#taken.delete(caller);
  }
}
