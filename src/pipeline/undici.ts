import { createRequire } from 'node:module';
import type { Agent as UndiciAgent, Pool as UndiciPool } from 'undici';

/**
 * undici's Pool and Agent, without the rest of the package. undici's index also loads fetch,
 * WebSocket, the cache stores and the mocks, which a proxy that only ever calls dispatch() does not
 * need: 13 MB resident in a bare process, 5 MB in an idle proxy. Without the index, the dispatchers have no request()/stream() methods:
 * send with dispatchExchange (upstream-exchange.ts).
 */
const require = createRequire(import.meta.url);

export const Pool: typeof UndiciPool = require('undici/lib/dispatcher/pool.js');
export type Pool = UndiciPool;
export const Agent: typeof UndiciAgent = require('undici/lib/dispatcher/agent.js');
export type Agent = UndiciAgent;
