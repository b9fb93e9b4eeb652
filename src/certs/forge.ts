import { createRequire } from 'node:module';
import type Forge from 'node-forge';

const require = createRequire(import.meta.url);

/**
 * node-forge, loaded by the first certificate operation (forward mode's CA, a PKCS#12 check): a
 * proxy that does neither does not carry it.
 */
export function loadForge(): typeof Forge {
  return require('node-forge');
}
