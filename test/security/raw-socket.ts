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

  close(): void {
    this.socket.destroy();
  }
}
