import { connect, type Socket } from 'node:net';

export interface RawAnswer {
  /** Everything the proxy sent, latin1. */
  readonly data: string;
  /** True when the proxy closed (or reset) the connection before `idleMs` of silence. */
  readonly closed: boolean;
}

/** Like rawRequest, but also says whether the proxy closed the connection itself. */
export function rawExchange(port: number, bytes: string | Buffer, idleMs = 600): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    let data = '';
    let timer: NodeJS.Timeout | undefined;
    let settled = false;
    const finish = (closed: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      resolve({ data, closed });
    };
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => finish(false), idleMs);
    };
    socket.on('connect', () => {
      socket.write(bytes);
      arm();
    });
    socket.on('data', (d: Buffer) => {
      data += d.toString('latin1');
      arm();
    });
    socket.on('end', () => finish(true));
    socket.on('close', () => finish(true));
    socket.on('error', (err) => (data ? finish(true) : reject(err)));
  });
}

/** A keep-alive connection driven step by step: write bytes, then read until quiet. */
export class RawConnection {
  private data = '';
  private closedFlag = false;
  private readonly socket: Socket;
  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => (this.data += d.toString('latin1')));
    socket.on('close', () => (this.closedFlag = true));
    socket.on('error', () => (this.closedFlag = true));
  }

  /** Drive a connection the test opened itself (a TLS connection, say), once it can be written. */
  static over(socket: Socket): RawConnection {
    return new RawConnection(socket);
  }

  static open(port: number): Promise<RawConnection> {
    return new Promise((resolve, reject) => {
      const socket = connect(port, '127.0.0.1');
      socket.once('connect', () => resolve(new RawConnection(socket)));
      socket.once('error', reject);
    });
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  /** Write, then wait until nothing arrives for `idleMs`; returns what arrived since the write. */
  async exchange(bytes: string, idleMs = 400): Promise<string> {
    const start = this.data.length;
    if (!this.closedFlag) this.socket.write(bytes);
    let last = -1;
    while (last !== this.data.length && !this.closedFlag) {
      last = this.data.length;
      await new Promise((r) => setTimeout(r, idleMs));
    }
    return this.data.slice(start);
  }

  /**
   * Write one request, then wait for its whole answer (head and body, by length or chunked), the close,
   * or `timeoutMs`; returns what arrived since the write. Slow answers on a loaded machine are
   * waited for, where exchange would stop at the first silence.
   */
  async request(bytes: string, timeoutMs = 5_000): Promise<string> {
    const start = this.data.length;
    if (!this.closedFlag) this.socket.write(bytes);
    const deadline = Date.now() + timeoutMs;
    while (!this.closedFlag && Date.now() < deadline) {
      const got = this.data.slice(start);
      const end = got.indexOf('\r\n\r\n');
      if (end !== -1) {
        const head = got.slice(0, end);
        const length = /\r\ncontent-length: *(\d+)/i.exec(head)?.[1];
        if (length !== undefined ? got.length >= end + 4 + Number(length) : /\r\ntransfer-encoding: *chunked/i.test(head) && got.endsWith('\r\n0\r\n\r\n')) break;
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    // A close follows a refusal at once: let it arrive, so `closed` says whether it came.
    await new Promise((r) => setTimeout(r, 50));
    return this.data.slice(start);
  }

  close(): void {
    this.socket.destroy();
  }
}

/**
 * Open `n` connections that send nothing, each given 3 s: what it received and whether the server
 * closed it (a listener past its connection cap closes one as it accepts it, unanswered).
 */
export function closedAtAccept(port: number, n: number): Promise<{ bytes: number; closed: boolean }[]> {
  return Promise.all(Array.from({ length: n }, () => new Promise<{ bytes: number; closed: boolean }>((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let bytes = 0;
    socket.on('data', (d: Buffer) => void (bytes += d.length));
    socket.on('error', () => {});
    const timer = setTimeout(() => (socket.destroy(), resolve({ bytes, closed: false })), 3_000);
    socket.once('close', () => (clearTimeout(timer), resolve({ bytes, closed: true })));
  })));
}

/**
 * Once connections a test closed are gone on the server's side too (a client's close reaches it a
 * moment later), `n` new connections that each get a 200 for `request`. Batches answered otherwise
 * (503 past a connection cap) are closed and tried again; `refused` counts those answers, which the
 * server counted and audited too.
 */
export async function servedBatch(port: number, n: number, request: string, timeoutMs = 5_000): Promise<{ connections: RawConnection[]; refused: number }> {
  const deadline = Date.now() + timeoutMs;
  let refused = 0;
  for (;;) {
    const connections = await Promise.all(Array.from({ length: n }, () => RawConnection.open(port)));
    const codes = (await Promise.all(connections.map((c) => c.request(request)))).map((a) => /^HTTP\/1\.1 (\d{3})/.exec(a)?.[1]);
    if (codes.every((code) => code === '200')) return { connections, refused };
    refused += codes.filter((code) => code === '503').length;
    for (const c of connections) c.close();
    if (Date.now() > deadline) throw new Error(`no batch of ${n} connections all served within ${timeoutMs} ms (last: ${codes.join(' ')})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
