import { describe, expect, it } from 'vitest';
import { serverMajorVersion } from '../../src/store/redis-client.ts';

describe('serverMajorVersion', () => {
  it('reads the major version from a HELLO reply', () => {
    expect(serverMajorVersion(['server', 'redis', 'version', '7.0.15', 'proto', 3])).toBe(7);
    expect(serverMajorVersion(['server', 'redis', 'version', '6.2.14', 'proto', 2])).toBe(6);
    expect(serverMajorVersion(['server', 'valkey', 'version', '8.0.1', 'proto', 3])).toBe(8);
  });
  it('is 0 (the script as written) for a reply it cannot read', () => {
    expect(serverMajorVersion(['server', 'redis', 'proto', 2])).toBe(0);
    expect(serverMajorVersion(['server', 'redis', 'version', 'unknown'])).toBe(0);
    expect(serverMajorVersion({ version: '7.0.0' })).toBe(0);
    expect(serverMajorVersion(null)).toBe(0);
  });
});
