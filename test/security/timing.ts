import { connect, type Socket } from 'node:net';

/**
 * Timing side-channel measurement for the security suite (CRED-09): per-request latency on one
 * keep-alive connection, two classes interleaved in random order so drift (other load on the
 * machine, GC, CPU frequency) falls on both alike, and a Welch t-test on the faster part of each
 * class (a trimmed mean, as dudect crops): the long tail of a noisy machine is not signal, and a
 * leak, which shifts every request of a class, shifts its faster half just as much.
 */

export interface Welch {
  readonly t: number;
  /** Standard error of the difference of the means, in the samples' unit. */
  readonly se: number;
  readonly meanA: number;
  readonly meanB: number;
  readonly n: number;
}

export function mean(xs: readonly number[]): number {
  return xs.reduce((s, x) => s + x, 0) / xs.length;
}

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

function variance(xs: readonly number[], m: number): number {
  return xs.reduce((s, x) => s + (x - m) ** 2, 0) / (xs.length - 1);
}

/**
 * Welch's t on trimmed means (Yuen's test): each class keeps its samples at or below its own
 * `cropPercentile`, and the standard error comes from the winsorized variance (samples above the
 * cut counted at the cut). A plain variance of the kept samples would understate the error, since
 * the cut itself moves from run to run: on this machine that made |t| spread about 1.5 times wider
 * than a t statistic should under no difference.
 */
export function trimmedWelch(a: readonly number[], b: readonly number[], cropPercentile = 50): Welch {
  const trimmed = (xs: readonly number[]) => {
    const sorted = [...xs].sort((x, y) => x - y);
    const kept = Math.floor((cropPercentile / 100) * (sorted.length - 1)) + 1;
    const cut = sorted[kept - 1]!;
    const winsorized = sorted.map((x) => Math.min(x, cut));
    const squaredError = ((sorted.length - 1) * variance(winsorized, mean(winsorized))) / (kept * (kept - 1));
    return { mean: mean(sorted.slice(0, kept)), squaredError, kept };
  };
  const ta = trimmed(a);
  const tb = trimmed(b);
  const se = Math.sqrt(ta.squaredError + tb.squaredError);
  return { t: (ta.mean - tb.mean) / se, se, meanA: ta.mean, meanB: tb.mean, n: Math.min(ta.kept, tb.kept) };
}

/**
 * One keep-alive HTTP/1.1 connection; `time()` sends raw request bytes and resolves with the
 * microseconds from the write until the whole response (headers and Content-Length body) arrived.
 */
export class TimedConnection {
  readonly #socket: Socket;
  #buf = '';
  #waiting: (() => void) | undefined;
  #status = 0;

  private constructor(socket: Socket) {
    this.#socket = socket;
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => {
      this.#buf += d.toString('latin1');
      this.#check();
    });
  }

  static open(port: number): Promise<TimedConnection> {
    return new Promise((resolve, reject) => {
      const socket = connect(port, '127.0.0.1');
      socket.once('connect', () => resolve(new TimedConnection(socket)));
      socket.once('error', reject);
    });
  }

  /** The status of the last response. */
  get status(): number {
    return this.#status;
  }

  #check(): void {
    const end = this.#buf.indexOf('\r\n\r\n');
    if (end === -1 || !this.#waiting) return;
    const length = Number(/\r\ncontent-length:\s*(\d+)/i.exec(this.#buf.slice(0, end))?.[1] ?? 0);
    if (this.#buf.length < end + 4 + length) return;
    this.#status = Number(this.#buf.slice(9, 12));
    this.#buf = this.#buf.slice(end + 4 + length);
    const done = this.#waiting;
    this.#waiting = undefined;
    done();
  }

  time(bytes: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const onClose = () => reject(new Error('connection closed mid-measurement'));
      this.#socket.once('close', onClose);
      const t0 = process.hrtime.bigint();
      this.#waiting = () => {
        this.#socket.off('close', onClose);
        resolve(Number(process.hrtime.bigint() - t0) / 1_000);
      };
      this.#socket.write(bytes);
    });
  }

  close(): void {
    this.#socket.destroy();
  }
}

/**
 * `n` samples of each class, each pair sent in a random order, after `warmup` discarded pairs.
 * Returns the latencies in µs and every status seen.
 */
export async function sampleInterleaved(conn: TimedConnection, requestA: string, requestB: string, n: number, warmup = 200): Promise<{ a: number[]; b: number[]; statuses: Set<number> }> {
  const a: number[] = [];
  const b: number[] = [];
  const statuses = new Set<number>();
  for (let i = 0; i < warmup + n; i++) {
    const aFirst = Math.random() < 0.5;
    const first = await conn.time(aFirst ? requestA : requestB);
    statuses.add(conn.status);
    const second = await conn.time(aFirst ? requestB : requestA);
    statuses.add(conn.status);
    if (i < warmup) continue;
    a.push(aFirst ? first : second);
    b.push(aFirst ? second : first);
  }
  return { a, b, statuses };
}
