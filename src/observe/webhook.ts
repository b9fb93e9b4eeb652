import { createHmac } from 'node:crypto';
import { Agent } from '../pipeline/undici.ts';
import { dispatchExchange } from '../pipeline/upstream-exchange.ts';
import { decodeUserinfo } from '../config/userinfo.ts';
import type { Logger } from './log.ts';

export const SIGNATURE_HEADER = 'x-egress-signature';
const MAX_QUEUE = 200;
/** Which alert a full queue gives up first: the least severe, and of those the oldest. */
const RANK: Readonly<Record<string, number>> = { info: 0, warning: 1, critical: 2 };
const ATTEMPTS = 5;
const FIRST_BACKOFF_MS = 500;

/**
 * Alerts as JSON POSTs to EGRESS_ALERT_WEBHOOK, signed with HMAC-SHA256 over "<timestamp>.<body>"
 * in `X-Egress-Signature: t=<unix seconds>,v1=<hex>` (the receiver recomputes it and rejects old
 * timestamps). Delivery is in the background, retried with exponential backoff; the queue is
 * bounded, so a dead receiver never holds memory or the request path.
 */
export class WebhookSink {
  readonly #url: URL;
  /** Basic credentials from the URL's user name and password (a receiver behind basic auth); never logged. */
  readonly #authorization: Record<string, string>;
  readonly #secret: Buffer;
  readonly #log: Logger;
  readonly #agent = new Agent({ connect: { timeout: 3_000 }, headersTimeout: 5_000, bodyTimeout: 5_000 });
  readonly #queue: { readonly body: string; readonly rank: number }[] = [];
  #busy = false;
  #closed = false;

  constructor(url: string, secret: Buffer, log: Logger) {
    this.#url = new URL(url);
    // Sent as the origin and path only, so the userinfo would otherwise be dropped without a word.
    const { username, password } = this.#url;
    this.#authorization = username || password ? { authorization: `Basic ${Buffer.from(`${decodeUserinfo(username, 'EGRESS_ALERT_WEBHOOK')}:${decodeUserinfo(password, 'EGRESS_ALERT_WEBHOOK')}`).toString('base64')}` } : {};
    this.#secret = secret;
    this.#log = log;
  }

  send(payload: Record<string, unknown>): void {
    if (this.#closed) return;
    const rank = RANK[String(payload.severity)] ?? 0;
    if (this.#queue.length >= MAX_QUEUE) {
      // A flood of warnings (unknown tokens from many addresses, say) while the receiver is down
      // must not push out the critical alert that came before it: the least severe goes, oldest first.
      let drop = 0;
      for (let i = 1; i < this.#queue.length; i++) if (this.#queue[i]!.rank < this.#queue[drop]!.rank) drop = i;
      if (this.#queue[drop]!.rank > rank) {
        this.#log.warn({ dropped: 1, severity: payload.severity }, 'alert webhook queue is full of more severe alerts; this one is not sent');
        return;
      }
      this.#log.warn({ dropped: 1 }, 'alert webhook queue is full; dropping the oldest of the least severe alerts');
      this.#queue.splice(drop, 1);
    }
    this.#queue.push({ body: JSON.stringify(payload), rank });
    void this.#drain();
  }

  async #drain(): Promise<void> {
    if (this.#busy) return;
    this.#busy = true;
    try {
      while (this.#queue.length > 0 && !this.#closed) {
        await this.#deliver(this.#queue.shift()!.body);
      }
    } finally {
      this.#busy = false;
    }
  }

  async #deliver(body: string): Promise<void> {
    for (let attempt = 1; attempt <= ATTEMPTS && !this.#closed; attempt++) {
      const t = Math.floor(Date.now() / 1000);
      const signature = createHmac('sha256', this.#secret).update(`${t}.${body}`).digest('hex');
      try {
        const res = await dispatchExchange(this.#agent, {
          origin: this.#url.origin,
          path: `${this.#url.pathname}${this.#url.search}`,
          method: 'POST',
          headers: { ...this.#authorization, 'content-type': 'application/json', [SIGNATURE_HEADER]: `t=${t},v1=${signature}` },
          body,
        }).head;
        res.discard();
        if (res.status >= 200 && res.status < 300) return;
        this.#log.warn({ status: res.status, attempt }, 'alert webhook refused the alert');
      } catch (err) {
        this.#log.warn({ code: (err as { code?: string }).code ?? 'error', attempt }, 'alert webhook unreachable');
      }
      if (attempt < ATTEMPTS) await new Promise((r) => setTimeout(r, FIRST_BACKOFF_MS * 2 ** (attempt - 1)).unref());
    }
    this.#log.error({ alert_webhook: this.#url.origin }, 'alert webhook delivery failed after retries; the alert is in this log');
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#agent.close().catch(() => {});
  }
}

