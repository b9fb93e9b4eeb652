import { connect, type Socket } from 'node:net';

/** Send raw bytes to host:port and collect everything until the server closes or `idleMs` passes. */
export function rawRequest(port: number, bytes: string, idleMs = 500): Promise<string> {
  return exchangeOn((ready) => connect(port, '127.0.0.1', ready), bytes, idleMs);
}

/**
 * Write `bytes` on the socket `open` makes (it calls `ready` once the socket can be written: TCP
 * connected, or a TLS handshake done) and collect what comes back until the peer closes or nothing
 * arrives for `idleMs`. A connection error with nothing received rejects.
 */
export function exchangeOn(open: (ready: () => void) => Socket, bytes: string | Buffer, idleMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let data = '';
    let timer: NodeJS.Timeout | undefined;
    const socket = open(() => {
      socket.write(bytes);
      arm();
    });
    const done = () => {
      clearTimeout(timer);
      socket.destroy();
      resolve(data);
    };
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(done, idleMs);
    };
    socket.on('data', (d: Buffer) => {
      data += d.toString('latin1');
      arm();
    });
    socket.on('close', done);
    socket.on('error', (err) => (data ? done() : reject(err)));
  });
}

/** Status codes of every response in a raw HTTP/1.1 stream, in order. */
export function statuses(raw: string): number[] {
  return [...raw.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => Number(m[1]));
}
