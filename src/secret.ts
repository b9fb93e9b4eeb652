import { inspect } from 'node:util';

const REDACTED = '[REDACTED]';

/**
 * A decrypted credential value. Printing, logging or serialising it shows `[REDACTED]`; only an
 * injector calls `reveal()`, at the moment it attaches the value to an outbound request.
 */
export class Secret {
  readonly #value: string;

  constructor(value: string) {
    this.#value = value;
  }

  reveal(): string {
    return this.#value;
  }

  toString(): string {
    return REDACTED;
  }

  toJSON(): string {
    return REDACTED;
  }

  [inspect.custom](): string {
    return REDACTED;
  }
}

export { REDACTED };
