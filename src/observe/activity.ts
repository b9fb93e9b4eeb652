/** Requests and denials per minute over the last hour, for the status page's charts. */
export class Activity {
  static readonly MINUTES = 60;
  readonly #requests = new Array<number>(Activity.MINUTES).fill(0);
  readonly #denied = new Array<number>(Activity.MINUTES).fill(0);
  #minute = Math.floor(Date.now() / 60_000);

  record(denied: boolean, now = Date.now()): void {
    this.#advance(now);
    const i = this.#minute % Activity.MINUTES;
    this.#requests[i]!++;
    if (denied) this.#denied[i]!++;
  }

  /** Oldest first: [{minute start, requests, denied}] for the last hour, the current minute last. */
  series(now = Date.now()): { at: number; requests: number; denied: number }[] {
    this.#advance(now);
    const out = [];
    for (let k = Activity.MINUTES - 1; k >= 0; k--) {
      const m = this.#minute - k;
      const i = ((m % Activity.MINUTES) + Activity.MINUTES) % Activity.MINUTES;
      out.push({ at: m * 60_000, requests: this.#requests[i]!, denied: this.#denied[i]! });
    }
    return out;
  }

  #advance(now: number): void {
    const minute = Math.floor(now / 60_000);
    for (let m = this.#minute + 1; m <= Math.min(minute, this.#minute + Activity.MINUTES); m++) {
      this.#requests[m % Activity.MINUTES] = 0;
      this.#denied[m % Activity.MINUTES] = 0;
    }
    if (minute > this.#minute) this.#minute = minute;
  }
}
