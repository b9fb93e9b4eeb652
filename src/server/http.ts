/**
 * node:http's createServer, taken from the CommonJS module. An ES import of node:http builds the
 * module namespace from every export, and that reads the lazy WebSocket, MessageEvent and
 * CloseEvent getters: Node's bundled undici (fetch, WebSocket) and web streams get loaded and
 * compiled for nothing, 13 MB resident in a bare process. Type-only imports of node:http are
 * erased and cost nothing.
 */
export const { createServer, STATUS_CODES } = process.getBuiltinModule('node:http');
