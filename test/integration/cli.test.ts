import { spawn } from 'node:child_process';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { BIN, ROOT, runCli } from '../helpers/cli.ts';
import { envFor, makeTempDir } from '../helpers/proxy.ts';

const SECRET = 'sk_test_CANARY_cli_5e7b';
let dir: string;
let env: Record<string, string>;

beforeEach(async () => {
  dir = await makeTempDir('egress-cli-');
  env = envFor(dir);
  await mkdir(join(dir, 'routes'));
});

describe('master-key', () => {
  it('init creates a 0600 keyring once; status reports what each key version wraps', async () => {
    const init = await runCli(['master-key', 'init'], env);
    expect(init.code).toBe(0);
    expect((await stat(join(dir, 'master.key'))).mode & 0o777).toBe(0o600);
    const again = await runCli(['master-key', 'init'], env);
    expect(again.code).toBe(1);
    expect(again.stderr).toContain('already exists');

    await runCli(['keys', 'put', 'plaid', '--from-stdin'], env, JSON.stringify({ client_id: 'c', secret: SECRET }));
    const status = await runCli(['master-key', 'status', '--json'], env);
    expect(status.code).toBe(0);
    const data = JSON.parse(status.stdout) as { versions: { version: number; active: boolean; wraps: number }[] };
    expect(data.versions).toEqual([expect.objectContaining({ version: 1, active: true, wraps: 1 })]);
    const keyText = await readFile(join(dir, 'master.key'), 'utf8');
    const key = (JSON.parse(keyText) as { keys: { key: string }[] }).keys[0]!.key;
    expect(status.stdout + init.stdout + init.stderr).not.toContain(key);
  });
});

describe('keys', () => {
  beforeEach(async () => {
    await runCli(['master-key', 'init'], env);
  });

  it('put from a file or stdin, list and show print metadata only', async () => {
    const file = join(dir, 'plaid.json');
    await writeFile(file, JSON.stringify({ client_id: 'client-1', secret: SECRET }));
    const put = await runCli(['keys', 'put', 'plaid-sandbox', '--from-file', file], env);
    expect(put.code).toBe(0);
    const stdinPut = await runCli(['keys', 'put', 'alpaca', '--from-stdin', '--json'], env, JSON.stringify({ key_id: 'k', secret_key: `${SECRET}-2` }));
    expect(stdinPut.code).toBe(0);
    const list = await runCli(['keys', 'list', '--json'], env);
    expect(JSON.parse(list.stdout)).toMatchObject({ credentials: [{ id: 'plaid-sandbox', current_version: 1 }, { id: 'alpaca', current_version: 1 }] });
    const show = await runCli(['keys', 'show', 'plaid-sandbox'], env);
    expect(show.code).toBe(0);
    expect(show.stdout).toContain('current');
    expect(show.stdout).toContain('client_id,secret');
    for (const out of [put, stdinPut, list, show]) expect(out.stdout + out.stderr).not.toContain(SECRET);
    expect(await readFile(join(dir, 'store.json'), 'utf8')).not.toContain(SECRET);
  });

  it('keys due: a key rolled back to is as old as it was; --max-age is checked (exit 2 for a bad one), --json lists what is due', async () => {
    expect((await runCli(['keys', 'put', 'plaid', '--from-stdin'], env, JSON.stringify({ secret: SECRET }))).code).toBe(0);
    // Version 1 has been live for 100 days.
    const storePath = join(dir, 'store.json');
    const doc = JSON.parse(await readFile(storePath, 'utf8')) as { credentials: { plaid: { versions: { created_at: string; activated_at: string }[] } } };
    const old = new Date(Date.now() - 100 * 86_400_000).toISOString();
    Object.assign(doc.credentials.plaid.versions[0]!, { created_at: old, activated_at: old });
    await writeFile(storePath, JSON.stringify(doc));
    const due = async () => {
      const res = await runCli(['keys', 'due', '--max-age', '90d', '--json'], env);
      return { code: res.code, data: JSON.parse(res.stdout) as { due: { id: string; version: number; age_days: number }[] } };
    };
    expect(await due()).toEqual({ code: 1, data: expect.objectContaining({ due: [{ id: 'plaid', version: 1, age_days: 100 }] }) });
    expect((await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ secret: `${SECRET}-2` }))).code).toBe(0);
    expect(await due()).toEqual({ code: 0, data: expect.objectContaining({ due: [] }) });
    // The new key is refused by the provider: back to the old one, which is still 100 days old.
    expect((await runCli(['keys', 'rollback', 'plaid'], env)).code).toBe(0);
    expect(await due()).toEqual({ code: 1, data: expect.objectContaining({ due: [{ id: 'plaid', version: 1, age_days: 100 }] }) });
    const list = JSON.parse((await runCli(['keys', 'list', '--json'], env)).stdout) as { credentials: { current_age_days: number }[] };
    expect(list.credentials[0]!.current_age_days).toBe(100);
    for (const bad of ['-1d', '90', '90days', '']) expect((await runCli(['keys', 'due', '--max-age', bad], env)).code, bad).toBe(2);
  });

  it('an option the subcommand does not take is a usage error (exit 2), not ignored: "revoke --grace 24h" revokes nothing', async () => {
    expect((await runCli(['keys', 'put', 'plaid', '--from-stdin'], env, JSON.stringify({ secret: SECRET }))).code).toBe(0);
    expect((await runCli(['callers', 'add', 'svc'], env)).code).toBe(0);
    for (const args of [
      ['keys', 'revoke', 'plaid', '--grace', '24h'],
      ['keys', 'rollback', 'plaid', '--version', '1'],
      ['keys', 'promote', 'plaid', '--version', '2'],
      ['keys', 'put', 'other', '--from-stdin', '--stage'],
      ['keys', 'due', '--grace', '1h'],
      ['callers', 'revoke', 'svc', '--grace', '1h'],
      ['admin-token', 'revoke', 'svc', '--grace', '1h'],
    ]) {
      const res = await runCli([...args, '--json'], env, JSON.stringify({ secret: SECRET }));
      expect(res.code, args.join(' ')).toBe(2);
      expect(JSON.parse(res.stdout), args.join(' ')).toEqual({ error: { code: 'usage', message: expect.stringContaining(`--${args.find((a) => a.startsWith('--') && a !== '--from-stdin')!.slice(2)}`) } });
    }
    const show = JSON.parse((await runCli(['keys', 'show', 'plaid', '--json'], env)).stdout) as { versions: { state: string }[] };
    expect(show.versions.map((v) => v.state)).toEqual(['current']);
    expect((await runCli(['keys', 'show', 'other'], env)).code).toBe(1);
    const callers = JSON.parse((await runCli(['callers', 'list', '--json'], env)).stdout) as { callers: { name: string; revoked_at: string | null }[] };
    expect(callers.callers).toEqual([expect.objectContaining({ name: 'svc', revoked_at: null })]);
  });

  it('keys rotate --stage with --grace is a usage error (exit 2) that says the grace goes to keys promote; nothing is staged (the grace was dropped without a word)', async () => {
    expect((await runCli(['keys', 'put', 'plaid', '--from-stdin'], env, JSON.stringify({ secret: SECRET }))).code).toBe(0);
    for (const json of [false, true]) {
      const res = await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--stage', '--grace', '7d', ...(json ? ['--json'] : [])], env, JSON.stringify({ secret: `${SECRET}-2` }));
      expect(res.code, res.stdout + res.stderr).toBe(2);
      const message = json ? (JSON.parse(res.stdout) as { error: { code: string; message: string } }).error.message : res.stderr;
      expect(message).toContain('--grace applies when a version becomes current');
      expect(message).toContain('egress keys promote plaid --grace 7d');
      expect(res.stdout + res.stderr).not.toContain(SECRET);
    }
    const show = JSON.parse((await runCli(['keys', 'show', 'plaid', '--json'], env)).stdout) as { versions: { state: string }[] };
    expect(show.versions.map((v) => v.state)).toEqual(['current']);
    // Staging without --grace, then promoting with it, is the way.
    expect((await runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--stage'], env, JSON.stringify({ secret: `${SECRET}-2` }))).code).toBe(0);
    const promoted = await runCli(['keys', 'promote', 'plaid', '--grace', '7d'], env);
    expect(promoted.stdout.split('\n')[0]).toBe('version 2 of "plaid" is current; the previous version keeps working for 7d');
  });

  it('rollback says which version went back to pending, and claims none when the current one had been revoked', async () => {
    expect((await runCli(['keys', 'put', 'plaid', '--from-stdin'], env, JSON.stringify({ secret: SECRET }))).code).toBe(0);
    const rotate = () => runCli(['keys', 'rotate', 'plaid', '--from-stdin', '--grace', '1h'], env, JSON.stringify({ secret: `${SECRET}-2` }));
    expect((await rotate()).code).toBe(0);
    const first = await runCli(['keys', 'rollback', 'plaid'], env);
    expect(first.stdout.split('\n')[0]).toBe('rolled back: version 1 of "plaid" is current again; version 2 is pending');
    expect((await runCli(['keys', 'revoke', 'plaid', '--version', '2'], env)).code).toBe(0);
    expect((await rotate()).code).toBe(0);
    // The compromise path: the new current version is revoked, then the previous one brought back.
    expect((await runCli(['keys', 'revoke', 'plaid'], env)).code).toBe(0);
    const second = await runCli(['keys', 'rollback', 'plaid'], env);
    expect(second.code).toBe(0);
    expect(second.stdout.split('\n')[0]).toBe('rolled back: version 1 of "plaid" is current again');
  });

  it('refuses a second put, bad JSON, non-string fields, and values on the command line', async () => {
    await runCli(['keys', 'put', 'k1', '--from-stdin'], env, '{"secret":"abcdef"}');
    const dup = await runCli(['keys', 'put', 'k1', '--from-stdin'], env, '{"secret":"abcdef"}');
    expect(dup.code).toBe(1);
    expect((await runCli(['keys', 'put', 'k2', '--from-stdin'], env, '{"secret":')).code).toBe(1);
    expect((await runCli(['keys', 'put', 'k2', '--from-stdin'], env, '{"secret":42}')).code).toBe(1);
    expect((await runCli(['keys', 'put', 'k2', '--from-stdin'], env, '{}')).code).toBe(1);
    const argv = await runCli(['keys', 'put', 'k2', `{"secret":"${SECRET}"}`], env);
    expect(argv.code).toBe(2);
    expect(argv.stderr).not.toContain(SECRET);
    expect((await runCli(['keys', 'put', 'k2'], env)).code).toBe(2);
    expect((await runCli(['keys', 'put', 'Bad/Id', '--from-stdin'], env, '{"secret":"abcdef"}')).code).toBe(2);
    expect((await runCli(['keys', 'show', 'nope'], env)).code).toBe(1);
  });

  it('does not echo a value typed where a file name or an ID belongs (a secret, or the fields themselves)', async () => {
    const typed = [
      ['keys', 'put', 'k3', '--from-file', `{"secret":"${SECRET}"}`],
      ['keys', 'rotate', 'k1', '--from-file', SECRET],
      ['keys', 'put', 'k3', `--from-file=${SECRET}`, '--json'],
      ['keys', 'show', SECRET],
      ['keys', 'show', SECRET, '--json'],
    ];
    for (const args of typed) {
      const res = await runCli(args, env);
      expect(res.code, args.join(' ')).not.toBe(0);
      expect(res.stdout + res.stderr, args.join(' ')).not.toContain(SECRET);
    }
    const missing = await runCli(['keys', 'put', 'k3', '--from-file', join(dir, 'no-such.json')], env);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain('ENOENT');
  });

  it('--from-stdin on a terminal does not echo what is typed or pasted', async () => {
    // `script` gives the CLI a pseudo-terminal; its transcript is what the terminal showed.
    const command = [process.execPath, BIN, 'keys', 'put', 'typed', '--from-stdin'].map((a) => `'${a}'`).join(' ');
    const child = spawn('script', ['-qec', command, '/dev/null'], { cwd: ROOT, env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let shown = '';
    child.stdout!.on('data', (d: Buffer) => (shown += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (shown += d.toString()));
    const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    // Typed once the CLI is reading: a terminal in line mode echoes it at once, whoever reads it.
    await new Promise((r) => setTimeout(r, 1_000));
    child.stdin!.write(`{"client_id": "c", "secret": "${SECRET}x"}\n`);
    await new Promise((r) => setTimeout(r, 300));
    child.stdin!.write('\x04');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    const code = await exited;
    clearTimeout(timer);
    expect(code, shown).toBe(0);
    expect(shown).toContain('stored credential "typed"');
    expect(shown).not.toContain(SECRET);
    const show = await runCli(['keys', 'show', 'typed', '--json'], env);
    expect(JSON.parse(show.stdout)).toMatchObject({ versions: [{ fields: ['client_id', 'secret'] }] });
  });

  it('concurrent keys rotate: no rotation is lost, and every writer that lost the race exits 3 with error code "conflict"', async () => {
    expect((await runCli(['keys', 'put', 'raced', '--from-stdin'], env, '{"token":"tok_race_00000000"}')).code).toBe(0);
    const results = await Promise.all(Array.from({ length: 6 }, (_, i) => runCli(['keys', 'rotate', 'raced', '--from-stdin', '--grace', '1h', '--json'], env, `{"token":"tok_race_${i}_1111111"}`)));
    const won = results.filter((r) => r.code === 0);
    expect(won.length).toBeGreaterThanOrEqual(1);
    for (const r of results.filter((x) => x.code !== 0)) {
      expect(r.code, r.stderr).toBe(3);
      expect(JSON.parse(r.stdout)).toMatchObject({ error: { code: 'conflict' } });
    }
    const doc = JSON.parse(await readFile(join(dir, 'store.json'), 'utf8')) as { credentials: Record<string, { versions: { version: number; state: string }[] }> };
    const versions = doc.credentials.raced!.versions;
    expect(versions.map((v) => v.version)).toEqual(Array.from({ length: won.length + 1 }, (_, i) => i + 1));
    expect(versions.filter((v) => v.state === 'current')).toHaveLength(1);
    expect(versions.filter((v) => v.state === 'previous')).toHaveLength(1);
  });

  it('without a keyring, put fails with a clear message and stores nothing', async () => {
    const other = envFor(await makeTempDir());
    const res = await runCli(['keys', 'put', 'k', '--from-stdin'], other, '{"secret":"abcdef"}');
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('master-key init');
  });
});

describe('callers', () => {
  it('add prints an egt_ token once, list never shows it, revoke is immediate', async () => {
    const add = await runCli(['callers', 'add', 'sync-worker', '--json'], env);
    expect(add.code).toBe(0);
    const token = (JSON.parse(add.stdout) as { token: string }).token;
    expect(token).toMatch(/^egt_[A-Za-z0-9_-]{43}$/);
    expect(Buffer.from(token.slice(4), 'base64url').length).toBeGreaterThanOrEqual(32);
    const store = await readFile(join(dir, 'store.json'), 'utf8');
    expect(store).not.toContain(token);
    expect(store).not.toContain(token.slice(4));
    const list = await runCli(['callers', 'list'], env);
    expect(list.stdout).toContain('sync-worker');
    expect(list.stdout).not.toContain(token);
    expect((await runCli(['callers', 'add', 'sync-worker'], env)).code).toBe(1);
    expect((await runCli(['callers', 'revoke', 'sync-worker'], env)).code).toBe(0);
    expect((await runCli(['callers', 'list'], env)).stdout).toContain('revoked');
    expect((await runCli(['callers', 'revoke', 'nobody'], env)).code).toBe(1);
  });

  it('--json names the caller under "caller" for add, rotate and revoke alike, as the admin API does; revoke keeps "name" for scripts written against it; admin-token says "name" throughout', async () => {
    const added = JSON.parse((await runCli(['callers', 'add', 'keyed', '--json'], env)).stdout) as Record<string, unknown>;
    const rotated = JSON.parse((await runCli(['callers', 'rotate', 'keyed', '--grace', '0', '--json'], env)).stdout) as Record<string, unknown>;
    const revoked = JSON.parse((await runCli(['callers', 'revoke', 'keyed', '--json'], env)).stdout) as Record<string, unknown>;
    for (const out of [added, rotated, revoked]) expect(out.caller).toBe('keyed');
    expect(revoked).toMatchObject({ caller: 'keyed', name: 'keyed', revoked_at: expect.any(String) });
    const created = JSON.parse((await runCli(['admin-token', 'create', 'keyed', '--json'], env)).stdout) as Record<string, unknown>;
    const adminRotated = JSON.parse((await runCli(['admin-token', 'rotate', 'keyed', '--grace', '0', '--json'], env)).stdout) as Record<string, unknown>;
    const adminRevoked = JSON.parse((await runCli(['admin-token', 'revoke', 'keyed', '--json'], env)).stdout) as Record<string, unknown>;
    for (const out of [created, adminRotated, adminRevoked]) expect(out.name).toBe('keyed');
  });

  it('concurrent writers to one record: exactly one wins, the others fail cleanly (exit 1 or 3)', async () => {
    const results = await Promise.all(Array.from({ length: 5 }, () => runCli(['callers', 'add', 'race', '--json'], env)));
    const winners = results.filter((r) => r.code === 0);
    expect(winners).toHaveLength(1);
    for (const r of results.filter((x) => x.code !== 0)) expect([1, 3]).toContain(r.code);
    expect(results.some((r) => r.code === 3 || r.stderr.includes('already exists'))).toBe(true);
    const doc = JSON.parse(await readFile(join(dir, 'store.json'), 'utf8')) as { callers: Record<string, { tokens: unknown[] }> };
    expect(doc.callers.race!.tokens).toHaveLength(1);
  });
});

describe('routes', () => {
  const good = `name: plaid
prefix: /plaid
upstream: https://sandbox.plaid.com
allow_private_addresses: true
credential: plaid-sandbox
inject:
  scheme: headers
  headers:
    PLAID-SECRET: "{secret}"
allow:
  - caller: sync-worker
    methods: [POST]
    paths: [/accounts/get, /item/*]
`;

  it('check: exit 0 for a valid folder, exit 1 with file:line:col for an invalid one', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    const okRun = await runCli(['routes', 'check'], env);
    expect(okRun.code).toBe(0);
    expect(okRun.stdout).toContain('1 route OK');
    await writeFile(join(dir, 'routes', 'bad.yaml'), 'name: bad\nprefix: /bad\nupstream: https://x.example\ncredential: c\ninject: { scheme: bearer }\nallow:\n  - caller: a\n    methods: [post]\n    paths: [/x]\n');
    const bad = await runCli(['routes', 'check', join(dir, 'routes')], env);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/bad\.yaml:8:\d+: allow\.0\.methods\.0/);
    const json = JSON.parse((await runCli(['routes', 'check', '--json'], env)).stdout) as { ok: boolean; errors: { line: number }[] };
    expect(json.ok).toBe(false);
    expect(json.errors[0]!.line).toBe(8);
  });

  it('check notes a host that two routes share as their upstream without naming it in hosts: (forward mode does not intercept it); naming it in one route\'s hosts: settles it', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    await writeFile(join(dir, 'routes', 'plaid-link.yaml'), good.replace('name: plaid', 'name: plaid-link').replace('prefix: /plaid', 'prefix: /plaid-link'));
    const text = await runCli(['routes', 'check'], env);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toContain('2 routes OK');
    expect(text.stdout).toContain('note: sandbox.plaid.com is the upstream host of plaid-link.yaml and plaid.yaml, and neither names it in hosts:');
    const json = JSON.parse((await runCli(['routes', 'check', '--json'], env)).stdout) as { ok: boolean; notes: { host: string; files: string[] }[] };
    expect(json.ok).toBe(true);
    expect(json.notes).toEqual([{ host: 'sandbox.plaid.com', files: [join(dir, 'routes', 'plaid.yaml'), join(dir, 'routes', 'plaid-link.yaml')].sort(), message: expect.stringContaining('forward mode does not intercept it') }]);
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good.replace('credential:', 'hosts: [sandbox.plaid.com]\ncredential:'));
    const settled = await runCli(['routes', 'check', '--json'], env);
    expect(settled.code).toBe(0);
    expect((JSON.parse(settled.stdout) as { notes: unknown[] }).notes).toEqual([]);
  });

  it('check points at a bad template without repeating it (a literal there may be a key pasted in by mistake)', async () => {
    const route = (value: string) => `name: tpl\nprefix: /tpl\nupstream: https://x.example\ncredential: c\ninject:\n  scheme: headers\n  headers:\n    X-Key: "${value}"\nallow:\n  - caller: a\n    methods: [GET]\n    paths: [/x]\n`;
    for (const value of [`${SECRET}{`, `${SECRET}}`, `{secret}${SECRET}{ bad }`]) {
      await writeFile(join(dir, 'routes', 'tpl.yaml'), route(value));
      const res = await runCli(['routes', 'check'], env);
      expect(res.code).toBe(1);
      expect(res.stdout).toMatch(/tpl\.yaml:8:\d+: inject\.headers\.X-Key: .*character \d+/);
      expect(res.stdout + res.stderr).not.toContain(SECRET);
    }
  });

  it('check names a file nested too deeply to read, at its line, beside the other files\' problems (exit 1, not a crash)', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    await writeFile(join(dir, 'routes', 'deep.yaml'), `name: deep\nallow: ${'['.repeat(200_000)}${']'.repeat(200_000)}\n`);
    const res = await runCli(['routes', 'check', '--json'], env);
    expect(res.code, res.stderr).toBe(1);
    const data = JSON.parse(res.stdout) as { ok: boolean; errors: { file: string; line: number; message: string }[] };
    expect(data.ok).toBe(false);
    expect(data.errors).toEqual([expect.objectContaining({ file: join(dir, 'routes', 'deep.yaml'), line: 2, message: expect.stringContaining('nested') })]);
  });

  it('--caller belongs to explain only: on check or schema it is a usage error (exit 2), not ignored', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    for (const args of [['routes', 'check', '--caller', 'web'], ['routes', 'schema', '--caller', 'web']]) {
      const res = await runCli([...args, '--json'], env);
      expect(res.code, args.join(' ')).toBe(2);
      expect(JSON.parse(res.stdout), args.join(' ')).toEqual({ error: { code: 'usage', message: expect.stringContaining('--caller') } });
    }
  });

  it('the shipped example routes load cleanly', async () => {
    const res = await runCli(['routes', 'check', join(ROOT, 'routes')], env);
    expect(res.code).toBe(0);
    expect(res.stdout).toContain('2 routes OK');
  });

  it('schema prints a JSON Schema of a route file', async () => {
    const res = await runCli(['routes', 'schema'], env);
    expect(res.code).toBe(0);
    const schema = JSON.parse(res.stdout) as { type: string; properties: Record<string, unknown>; additionalProperties: boolean; required: string[] };
    expect(schema.type).toBe('object');
    expect(schema.additionalProperties).toBe(false);
    expect(Object.keys(schema.properties)).toEqual(expect.arrayContaining(['name', 'prefix', 'upstream', 'credential', 'inject', 'allow', 'max_body', 'timeouts']));
    expect(schema.required).toEqual(expect.arrayContaining(['name', 'credential']));
    // prefix, upstream and inject: required unless a preset supplies them.
    expect((schema as unknown as { anyOf: unknown }).anyOf).toEqual([{ required: ['preset'] }, { required: ['prefix', 'upstream', 'inject'] }]);
  });

  it('explain says which rule allows, or why not, with exit 0 / 1', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    const allow = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', 'http://egress:8080/plaid/item/get?x=1'], env);
    expect(allow.code).toBe(0);
    expect(allow.stdout).toContain('ALLOW');
    expect(allow.stdout).toContain('allow[0] permits POST /item/*');
    expect(allow.stdout).toContain('https://sandbox.plaid.com/item/get?x=1');
    const method = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'GET', '/plaid/accounts/get', '--json'], env);
    expect(method.code).toBe(1);
    expect(JSON.parse(method.stdout)).toMatchObject({ decision: 'deny', status: 403, reason: expect.stringContaining('method GET') });
    const unknown = await runCli(['routes', 'explain', '--caller', 'web', 'POST', '/plaid/accounts/get'], env);
    expect(unknown.code).toBe(1);
    expect(unknown.stdout).toContain('no allow entry');
    const notFound = await runCli(['routes', 'explain', '--caller', 'web', 'POST', '/nothing'], env);
    expect(notFound.stdout).toContain('404');
    const bad = await runCli(['routes', 'explain', '--caller', 'web', 'POST', '/plaid/%2e%2e/x'], env);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toContain('400');
  });

  it('explain judges a URL with a fragment as the request a client sends for it: without the fragment', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    // fetch, curl and every other client keep "#…" to themselves; the proxy never sees it.
    const url = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', 'http://egress:8080/plaid/item/get?x=1#top', '--json'], env);
    expect(url.code).toBe(0);
    expect(JSON.parse(url.stdout)).toMatchObject({ decision: 'allow', path: '/item/get', upstream_url: 'https://sandbox.plaid.com/item/get?x=1' });
    const forward = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', 'https://sandbox.plaid.com/item/get#top', '--json'], env);
    expect(forward.code).toBe(0);
    expect(JSON.parse(forward.stdout)).toMatchObject({ decision: 'allow', mode: 'forward', upstream_url: 'https://sandbox.plaid.com/item/get' });
    // A bare request target is what goes on the wire: "#" there is refused, as the proxy refuses it.
    const raw = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', '/plaid/item/get#top', '--json'], env);
    expect(raw.code).toBe(1);
    expect(JSON.parse(raw.stdout)).toMatchObject({ decision: 'deny', status: 400 });
  });

  it('explain says when a route takes the caller only with a client certificate (a token alone is refused)', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good.replace('credential: plaid-sandbox\n', 'credential: plaid-sandbox\nrequire_client_cert: true\n'));
    const text = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', '/plaid/item/get'], env);
    expect(text.code).toBe(0);
    expect(text.stdout).toContain('client certificate');
    const json = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', '/plaid/item/get', '--json'], env);
    expect(JSON.parse(json.stdout)).toMatchObject({ decision: 'allow', require_client_cert: true });
    // Without the setting, it says nothing of the kind.
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    const plain = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', '/plaid/item/get', '--json'], env);
    expect(JSON.parse(plain.stdout)).toMatchObject({ decision: 'allow', require_client_cert: false });
  });

  it('explain judges a URL on a host a route intercepts as the forward-mode request it is', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    // Through HTTPS_PROXY the whole path is route-relative: /item/get is allowed...
    const allow = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', 'https://sandbox.plaid.com/item/get', '--json'], env);
    expect(allow.code, allow.stdout).toBe(0);
    expect(JSON.parse(allow.stdout)).toMatchObject({ decision: 'allow', mode: 'forward', path: '/item/get', upstream_url: 'https://sandbox.plaid.com/item/get' });
    // ...and the reverse prefix is not stripped: the proxy checks /plaid/item/get, which no rule names.
    const deny = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', 'https://sandbox.plaid.com/plaid/item/get', '--json'], env);
    expect(deny.code, deny.stdout).toBe(1);
    expect(JSON.parse(deny.stdout)).toMatchObject({ decision: 'deny', status: 403, mode: 'forward', path: '/plaid/item/get' });
  });

  it('explain refuses a forward-mode URL on a port the route does not intercept, as the proxy does', async () => {
    await writeFile(join(dir, 'routes', 'plaid.yaml'), good);
    // A CONNECT to another port is refused with 403; a plain-HTTP proxy request to one is not
    // intercepted at all, and absolute-form is then a 400.
    for (const [url, status, code] of [['https://sandbox.plaid.com:8443/item/get', 403, 'route_forbidden'], ['https://sandbox.plaid.com:22/item/get', 403, 'route_forbidden'], ['http://sandbox.plaid.com:6379/item/get', 400, 'bad_request']] as const) {
      const res = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', url, '--json'], env);
      expect(res.code, url).toBe(1);
      expect(JSON.parse(res.stdout), url).toMatchObject({ decision: 'deny', status, code, mode: 'forward' });
    }
    // The ports it does intercept: 443, and 80 for a plain-HTTP proxy request.
    for (const url of ['https://sandbox.plaid.com:443/item/get', 'http://sandbox.plaid.com/item/get', 'http://sandbox.plaid.com:80/item/get']) {
      const res = await runCli(['routes', 'explain', '--caller', 'sync-worker', 'POST', url, '--json'], env);
      expect(res.code, url).toBe(0);
    }
  });
});

describe('after a writer was killed', () => {
  it('its leftover temp copies of the store and the keyring are removed by the next write', async () => {
    await runCli(['master-key', 'init'], env);
    // pid 2^22 + 1 is above the kernel's pid_max default: no live process has it.
    const dead = 4194305;
    await writeFile(join(dir, `.store.json.${dead}.1700000000000.tmp`), '{"copy":"of the store"}');
    await writeFile(join(dir, `.master.key.${dead}.tmp`), '{"copy":"of the keyring"}', { mode: 0o600 });
    await writeFile(join(dir, `.store.json.${process.pid}.1.tmp`), 'a live writer: left alone');
    expect((await runCli(['callers', 'add', 'svc'], env)).code).toBe(0);
    expect((await runCli(['master-key', 'rotate'], env)).code).toBe(0);
    const { readdir } = await import('node:fs/promises');
    const names = await readdir(dir);
    expect(names.filter((n) => n.includes(String(dead)))).toEqual([]);
    expect(names).toContain(`.store.json.${process.pid}.1.tmp`);
  });
});

describe('usage', () => {
  it('help names every certs subcommand: issue-caller and revoke-caller as well as init', async () => {
    for (const args of [['--help'], ['certs', '--help'], ['certs', 'issue-caller', '--help']]) {
      const res = await runCli(args, env);
      expect(res.code, args.join(' ')).toBe(0);
      expect(res.stdout, args.join(' ')).toContain('egress certs issue-caller NAME');
      expect(res.stdout, args.join(' ')).toContain('egress certs revoke-caller NAME');
    }
  });

  it('unknown commands and flags are usage errors (exit 2); help exits 0', async () => {
    expect((await runCli(['frobnicate'], env)).code).toBe(2);
    expect((await runCli(['keys', 'list', '--bogus'], env)).code).toBe(2);
    expect((await runCli(['keys'], env)).code).toBe(2);
    const json = await runCli(['keys', 'frob', '--json'], env);
    expect(json.code).toBe(2);
    expect(JSON.parse(json.stdout)).toMatchObject({ error: { code: 'usage' } });
    expect((await runCli(['--help'], env)).code).toBe(0);
  });

  it('--json errors have one shape, {"error":{"code","message"}}, for every command that finds nothing', async () => {
    for (const args of [['keys', 'show', 'nope'], ['keys', 'promote', 'nope'], ['keys', 'rollback', 'nope'], ['callers', 'revoke', 'nope'], ['callers', 'rotate', 'nope']]) {
      const res = await runCli([...args, '--json'], env);
      expect(res.code, args.join(' ')).toBe(1);
      expect(JSON.parse(res.stdout), args.join(' ')).toEqual({ error: { code: 'not_found', message: expect.stringContaining('nope') } });
    }
  });

  it('audit verify with EGRESS_AUDIT_LOG=- (stdout) is a usage error naming it; "-" as FILE reads standard input', async () => {
    const none = await runCli(['audit', 'verify'], { ...env, EGRESS_AUDIT_LOG: '-' });
    expect(none.code).toBe(2);
    expect(none.stderr).toContain('EGRESS_AUDIT_LOG');
    const bad = await runCli(['audit', 'verify', '-', '--json'], env, 'not a line of the log\n');
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.stdout)).toMatchObject({ ok: false, firstBad: { file: '-', line: 1 } });
    expect((await runCli(['audit', 'verify', '-'], env, '')).code).toBe(0);
  });

  it('--help after a command prints the usage and exits 0, and never runs the command', async () => {
    for (const args of [['serve', '--help'], ['keys', '--help'], ['keys', 'put', 'x', '-h'], ['routes', 'check', '--help'], ['master-key', 'init', '--help']]) {
      const res = await runCli(args, env);
      expect(res.code, args.join(' ')).toBe(0);
      expect(res.stdout, args.join(' ')).toContain('egress keys put ID');
      expect(res.stderr, args.join(' ')).toBe('');
    }
  });
});
