/**
 * A reload that may be asked for again while it runs (a burst of file events, a SIGHUP meanwhile):
 * one run at a time, and asks that come during a run make one more run after it, which reads what
 * changed meanwhile. Every ask gets the outcome of the last run that covers it.
 */
export class Coalesced<T> {
  #running: Promise<T> | undefined;
  #again = false;

  run(once: () => Promise<T>): Promise<T> {
    if (this.#running) {
      this.#again = true;
      return this.#running;
    }
    this.#running = (async () => {
      let outcome: T;
      do {
        this.#again = false;
        outcome = await once();
      } while (this.#again);
      return outcome;
    })().finally(() => {
      this.#running = undefined;
    });
    return this.#running;
  }
}
