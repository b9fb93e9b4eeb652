import { basicInjector } from './basic.ts';
import { bearerInjector } from './bearer.ts';
import { coinbaseJwtInjector } from './coinbase-jwt.ts';
import { headersInjector } from './headers.ts';
import { hmacInjector } from './hmac.ts';
import { jsonBodyInjector } from './json-body.ts';
import { krakenInjector } from './kraken.ts';
import { oauth2Injector } from './oauth2.ts';
import { mtlsInjector } from './mtls.ts';
import { queryInjector } from './query.ts';
import { snaptradeInjector } from './snaptrade.ts';
import { truelayerSigningInjector } from './truelayer-signing.ts';
import type { Injector } from './types.ts';

/** Every auth scheme, by its `inject.scheme` name. Adding a scheme is one file and one line here. */
export const INJECTORS = [
  headersInjector, bearerInjector, basicInjector, queryInjector, jsonBodyInjector,
  hmacInjector, snaptradeInjector, krakenInjector, coinbaseJwtInjector, truelayerSigningInjector, oauth2Injector, mtlsInjector,
] as const;

const byScheme = new Map<string, Injector>(INJECTORS.map((i): [string, Injector] => [i.scheme, i as unknown as Injector]));

export function injectorFor(scheme: string): Injector | undefined {
  return byScheme.get(scheme);
}

export type { Injector } from './types.ts';
