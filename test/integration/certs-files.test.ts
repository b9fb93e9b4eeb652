import { X509Certificate, createPrivateKey } from 'node:crypto';
import { copyFile, mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { runCli, startServe } from '../helpers/cli.ts';
import { envFor, makeTempDir, seedDataDir } from '../helpers/proxy.ts';
import { makeTestPki } from '../helpers/tls.ts';

/**
 * certs/issued.json and certs/revoked.json: what `certs issue-caller` and `revoke-caller` write.
 * A serial that is not recorded can never be revoked, so the record comes first and is never
 * rebuilt from nothing.
 */
let dir: string;
let certs: string;
let env: Record<string, string>;

beforeEach(async () => {
  dir = await makeTempDir('egress-certs-files-');
  await seedDataDir(dir, { routes: {}, callers: ['svc', 'other'] });
  certs = join(dir, 'certs');
  env = envFor(dir, { EGRESS_CERTS: certs });
  expect((await runCli(['certs', 'init'], env)).code).toBe(0);
});

const exists = (path: string) => stat(path).then(() => true, () => false);

describe('issue-caller', () => {
  it('with issued.json unreadable (a folder in its place): refused, and no certificate is written that could never be revoked', async () => {
    await mkdir(join(certs, 'issued.json', 'x'), { recursive: true });
    const result = await runCli(['certs', 'issue-caller', 'svc'], env);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('issued.json cannot be read (EISDIR): which certificates were issued to which caller is unknown');
    expect(await exists(join(certs, 'callers', 'svc.pem'))).toBe(false);
    expect(await exists(join(certs, 'callers', 'svc.key'))).toBe(false);
  });

  it('with issued.json damaged: refused, the file is left as it was for a restore, and no certificate is written', async () => {
    expect((await runCli(['certs', 'issue-caller', 'other'], env)).code).toBe(0);
    const damaged = '{"other": ["0a1b2c"], "svc": 7';
    await writeFile(join(certs, 'issued.json'), damaged);
    for (const sub of ['issue-caller', 'revoke-caller']) {
      const result = await runCli(['certs', sub, 'svc'], env);
      expect(result.code, sub).toBe(1);
      expect(result.stderr, sub).toContain('issued.json is damaged (not a list of issued serials)');
    }
    expect(await readFile(join(certs, 'issued.json'), 'utf8')).toBe(damaged);
    expect(await exists(join(certs, 'callers', 'svc.pem'))).toBe(false);
  });

  it('writes its files whole through hidden temp files, removes those a killed writer left, and leaves none behind', async () => {
    // Left by writers killed between writing and renaming (pid 999999 is not running).
    await mkdir(join(certs, 'callers'), { recursive: true });
    const stale = [join(certs, '.issued.json.999999.1.tmp'), join(certs, '.revoked.json.999999.1.tmp'), join(certs, 'callers', '.svc.key.999999.1.tmp')];
    for (const path of stale) await writeFile(path, 'half a file');
    const issued = await runCli(['certs', 'issue-caller', 'svc', '--json'], env);
    expect(issued.code, issued.stderr).toBe(0);
    const serial = (JSON.parse(issued.stdout) as { serial: string }).serial.toLowerCase();
    expect(JSON.parse(await readFile(join(certs, 'issued.json'), 'utf8'))).toEqual({ svc: [serial] });
    expect((await stat(join(certs, 'callers', 'svc.key'))).mode & 0o777).toBe(0o600);
    expect(await readFile(join(certs, 'callers', 'svc.pem'), 'utf8')).toMatch(/^-----BEGIN CERTIFICATE-----/);
    expect((await runCli(['certs', 'revoke-caller', 'svc'], env)).code).toBe(0);
    expect(Object.keys((JSON.parse(await readFile(join(certs, 'revoked.json'), 'utf8')) as { serials: object }).serials)).toEqual([serial]);
    const left = [...(await readdir(certs)), ...(await readdir(join(certs, 'callers')))].filter((name) => name.endsWith('.tmp'));
    expect(left).toEqual([]);
  });
});

describe('issue-caller cut short', () => {
  it('a certificate and key that cannot both be written in full (a file size limit, as a full disk refuses): the caller\'s earlier pair is kept as it was, and still belongs together', async () => {
    const files = { cert: join(certs, 'callers', 'svc.pem'), key: join(certs, 'callers', 'svc.key') };
    expect((await runCli(['certs', 'issue-caller', 'svc'], env)).code).toBe(0);
    const before = { cert: await readFile(files.cert, 'utf8'), key: await readFile(files.key, 'utf8') };
    // 1500 bytes: more than the certificate (about 1.2 KiB) and issued.json, less than the key (about
    // 1.7 KiB), so the certificate is written in full and the key's write is refused with EFBIG.
    expect(before.cert.length).toBeLessThan(1500);
    expect(before.key.length).toBeGreaterThan(1500);
    const issued = spawnSync('prlimit', ['--fsize=1500', '--', process.execPath, 'bin/egress.js', 'certs', 'issue-caller', 'svc'], { env: { PATH: process.env.PATH ?? '', ...env }, encoding: 'utf8' });
    expect(issued.status, issued.stderr).toBe(1);
    expect(await readFile(files.cert, 'utf8'), 'the certificate').toBe(before.cert);
    expect(await readFile(files.key, 'utf8'), 'the key').toBe(before.key);
    expect(issued.stderr).toContain(`the certificate and key of caller "svc" could not be written in ${join(certs, 'callers')} (EFBIG); the ones there are unchanged`);
    expect(issued.stderr).not.toContain('PRIVATE KEY');
    expect((await readdir(join(certs, 'callers'))).filter((name) => name.endsWith('.tmp'))).toEqual([]);
  }, 30_000);
});

describe('issue-caller with EGRESS_CLIENT_CA set', () => {
  it('refuses when EGRESS_CLIENT_CA names another CA than the one it signs with (the TLS listener would refuse the certificate), and issues when it names that one', async () => {
    const other = join(dir, 'corp-ca.pem');
    await writeFile(other, makeTestPki({ commonName: 'corp client CA' }).caCert);
    const refused = await runCli(['certs', 'issue-caller', 'svc'], { ...env, EGRESS_CLIENT_CA: other });
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`EGRESS_CLIENT_CA ${other} is not the CA in ${join(certs, 'ca.pem')}`);
    expect(await exists(join(certs, 'callers', 'svc.pem'))).toBe(false);
    expect(await exists(join(certs, 'issued.json'))).toBe(false);
    const same = await runCli(['certs', 'issue-caller', 'svc'], { ...env, EGRESS_CLIENT_CA: join(certs, 'ca.pem') });
    expect(same.code, same.stderr).toBe(0);
    // A bundle (a CA change-over) pins every CA in it: one that holds this CA, in any place, will do.
    const bundle = join(dir, 'client-cas.pem');
    await writeFile(bundle, `${await readFile(other, 'utf8')}${await readFile(join(certs, 'ca.pem'), 'utf8')}`);
    const bundled = await runCli(['certs', 'issue-caller', 'other'], { ...env, EGRESS_CLIENT_CA: bundle });
    expect(bundled.code, bundled.stderr).toBe(0);
  });
});

describe('issue-caller run several times at once for one name', () => {
  it('leaves a certificate and a key that belong together, and records every serial', async () => {
    const runs = await Promise.all(Array.from({ length: 6 }, () => runCli(['certs', 'issue-caller', 'svc', '--json'], env)));
    for (const r of runs) expect(r.code, r.stderr).toBe(0);
    const { X509Certificate, createPrivateKey, createPublicKey } = await import('node:crypto');
    const cert = new X509Certificate(await readFile(join(certs, 'callers', 'svc.pem'), 'utf8'));
    const key = createPrivateKey(await readFile(join(certs, 'callers', 'svc.key'), 'utf8'));
    expect(cert.checkPrivateKey(key)).toBe(true);
    expect(createPublicKey(key).export({ format: 'pem', type: 'spki' })).toBe(cert.publicKey.export({ format: 'pem', type: 'spki' }));
    const serials = runs.map((r) => (JSON.parse(r.stdout) as { serial: string }).serial.toLowerCase());
    expect(new Set((JSON.parse(await readFile(join(certs, 'issued.json'), 'utf8')) as { svc: string[] }).svc)).toEqual(new Set(serials));
  }, 60_000);
});

describe('the forward-mode CA files', () => {
  const pairMatches = async () => new X509Certificate(await readFile(join(certs, 'ca.pem'), 'utf8')).checkPrivateKey(createPrivateKey(await readFile(join(certs, 'ca.key'), 'utf8')));

  it('certs init with ca.pem left but ca.key gone: refused, and no new key is written beside the old certificate', async () => {
    const oldCert = await readFile(join(certs, 'ca.pem'), 'utf8');
    await rm(join(certs, 'ca.key'));
    const result = await runCli(['certs', 'init'], env);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('ca.pem already exists');
    expect(await exists(join(certs, 'ca.key'))).toBe(false);
    expect(await readFile(join(certs, 'ca.pem'), 'utf8')).toBe(oldCert);
    // --refresh makes a new pair that belongs together.
    expect((await runCli(['certs', 'init', '--refresh'], env)).code).toBe(0);
    expect(await pairMatches()).toBe(true);
  });

  it('a ca.key that is not ca.pem\'s key is refused by serve and issue-caller, naming both files; nothing is issued', async () => {
    const other = await makeTempDir('egress-other-ca-');
    await seedDataDir(other, { routes: {} });
    expect((await runCli(['certs', 'init'], envFor(other, { EGRESS_CERTS: join(other, 'certs') }))).code).toBe(0);
    await copyFile(join(other, 'certs', 'ca.key'), join(certs, 'ca.key'));
    expect(await pairMatches()).toBe(false);
    const started = await startServe(env).then(async (s) => {
      await s.stop();
      return 'started';
    }, (err: Error) => err.message);
    expect(started).toContain('serve exited with 1');
    expect(started).toContain(`${join(certs, 'ca.key')} does not belong to the certificate in ${join(certs, 'ca.pem')}`);
    expect(started).not.toContain('PRIVATE KEY');
    const issued = await runCli(['certs', 'issue-caller', 'svc'], env);
    expect(issued.code).toBe(1);
    expect(issued.stderr).toContain(`${join(certs, 'ca.key')} does not belong to the certificate in ${join(certs, 'ca.pem')}`);
    expect(await exists(join(certs, 'callers', 'svc.pem'))).toBe(false);
  }, 30_000);

  it('certs init --refresh that cannot write in full (a file size limit, as a full disk refuses): the old pair is kept as it was, and still signs', async () => {
    const before = { key: await readFile(join(certs, 'ca.key'), 'utf8'), cert: await readFile(join(certs, 'ca.pem'), 'utf8') };
    // 1 KiB: less than either PEM (an RSA-2048 key is about 1.7 KiB), so the first write is cut short
    // and refused with EFBIG (Node ignores SIGXFSZ).
    const refresh = spawnSync('prlimit', ['--fsize=1024', '--', process.execPath, 'bin/egress.js', 'certs', 'init', '--refresh'], { env: { PATH: process.env.PATH ?? '', ...env }, encoding: 'utf8' });
    expect(refresh.status, refresh.stderr).toBe(1);
    expect(refresh.stderr).not.toContain('PRIVATE KEY');
    expect(await readFile(join(certs, 'ca.key'), 'utf8')).toBe(before.key);
    expect(await readFile(join(certs, 'ca.pem'), 'utf8')).toBe(before.cert);
    expect((await readdir(certs)).filter((name) => name.endsWith('.tmp'))).toEqual([]);
    expect((await runCli(['certs', 'issue-caller', 'svc'], env)).code).toBe(0);
    // Without the limit the refresh goes through, with the modes the files had.
    expect((await runCli(['certs', 'init', '--refresh'], env)).code).toBe(0);
    expect(await readFile(join(certs, 'ca.pem'), 'utf8')).not.toBe(before.cert);
    expect(await pairMatches()).toBe(true);
    expect((await stat(join(certs, 'ca.key'))).mode & 0o777).toBe(0o600);
    expect((await stat(join(certs, 'ca.pem'))).mode & 0o777).toBe(0o644);
  }, 30_000);

  it('a ca.key that does not belong to ca.pem, or a ca.pem that is gone: issue-caller says so and issues nothing', async () => {
    // ca.pem from before a `certs init --refresh`, restored beside the new key.
    await copyFile(join(certs, 'ca.pem'), join(dir, 'old-ca.pem'));
    expect((await runCli(['certs', 'init', '--refresh'], env)).code).toBe(0);
    await copyFile(join(dir, 'old-ca.pem'), join(certs, 'ca.pem'));
    const mismatched = await runCli(['certs', 'issue-caller', 'svc'], env);
    expect(mismatched.code).toBe(1);
    expect(mismatched.stderr).toContain('ca.key does not belong to the certificate in');
    expect(mismatched.stderr).not.toContain('PRIVATE KEY');
    expect(await exists(join(certs, 'callers', 'svc.pem'))).toBe(false);
    expect(await exists(join(certs, 'issued.json'))).toBe(false);
    await rm(join(certs, 'ca.pem'));
    const missing = await runCli(['certs', 'issue-caller', 'svc'], env);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/ca\.pem cannot be read \(ENOENT\)/);
    expect(missing.stderr).not.toContain('unexpected error');
    expect(await exists(join(certs, 'callers', 'svc.pem'))).toBe(false);
  });
});
