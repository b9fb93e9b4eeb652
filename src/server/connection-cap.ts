import type { Server, Socket } from 'node:net';
import { markOverCap } from '../pipeline/connection-state.ts';

export type CapListener = 'plain' | 'tls' | 'admin';

/**
 * One cap on the caller connections of this process's proxy listeners, the plain and the TLS one
 * together (EGRESS_MAX_CONNECTIONS). Every connection is a file descriptor and memory of the whole
 * process, which upstream connections, the store and the audit log need too; a flood of idle
 * connections (DOS-09) was bounded only by the process's descriptor limit.
 *
 * Past the cap a connection is still taken, so that its client is told why: its request is
 * answered 503 too_many_connections and the connection closed. Past twice as many on a listener,
 * Node closes a new connection as it accepts it, unanswered: refused connections cannot hold
 * descriptors without bound either. TLS connections count once their handshake is done (the
 * listener's own bound covers those still shaking hands). The admin listener has a cap of its own
 * (ADMIN_LIMITS), counted apart.
 */
export class ConnectionCap {
  readonly limit: number;
  readonly #over: (listener: CapListener, outcome: 'answered' | 'closed') => void;
  #open = 0;

  constructor(limit: number, over: (listener: CapListener, outcome: 'answered' | 'closed') => void) {
    this.limit = limit;
    this.#over = over;
  }

  /** Count `server`'s connections (`event` hands over the socket requests arrive on). */
  attach(server: Server, listener: CapListener, event: 'connection' | 'secureConnection'): void {
    server.maxConnections = 2 * this.limit;
    server.on('drop', () => this.#over(listener, 'closed'));
    server.on(event, (socket: Socket) => {
      if (this.#open >= this.limit) {
        markOverCap(socket);
        this.#over(listener, 'answered');
        return;
      }
      this.#open++;
      socket.once('close', () => this.#open--);
    });
  }
}
