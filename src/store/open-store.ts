import { resolve } from 'node:path';
import { UserError } from '../errors.ts';
import { FileStore } from './file-store.ts';
import { parseRedisUrl } from './redis-client.ts';
import { RedisStore } from './redis-store.ts';
import type { StoreBackend } from './types.ts';

/**
 * `file:PATH` -> the file backend; `redis://…` and friends -> the Redis backend. A malformed value
 * is a usage error (exit 2), as every other malformed EGRESS_* setting is.
 */
export function openStore(spec: string): StoreBackend {
  if (spec.startsWith('file:')) {
    const path = spec.slice('file:'.length);
    if (!path) throw new UserError('EGRESS_STORE "file:" needs a path, e.g. file:./data/store.json', 2);
    return new FileStore(resolve(path));
  }
  if (/^(rediss?|redis-sentinel|redis-cluster):\/\//.test(spec)) return new RedisStore(parseRedisUrl(spec));
  // Its scheme at most: the first characters of a URL with a mistyped scheme (tcp://:password@…)
  // were the start of its password.
  const scheme = /^([a-z][a-z0-9+.-]{0,19}):/i.exec(spec)?.[1];
  throw new UserError(`EGRESS_STORE must be file:PATH, redis://…, rediss://…, redis-sentinel://… or redis-cluster://… (${scheme ? `got scheme "${scheme}"` : 'got no scheme'})`, 2);
}
