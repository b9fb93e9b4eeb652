import { resolve } from 'node:path';
import { UserError } from '../errors.ts';
import { FileStore } from './file-store.ts';
import type { StoreBackend } from './types.ts';

/** `file:PATH` -> the file backend. */
export function openStore(spec: string): StoreBackend {
  if (spec.startsWith('file:')) {
    const path = spec.slice('file:'.length);
    if (!path) throw new UserError('EGRESS_STORE "file:" needs a path, e.g. file:./data/store.json');
    return new FileStore(resolve(path));
  }
  if (/^rediss?:\/\//.test(spec)) {
    throw new UserError('the Redis store backend is not available in this version; use EGRESS_STORE=file:PATH');
  }
  throw new UserError(`EGRESS_STORE must be file:PATH (got a value starting "${spec.slice(0, 8)}")`);
}
