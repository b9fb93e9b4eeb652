import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { rootCertificates } from 'node:tls';
import { describe, expect, it } from 'vitest';
import type { CompiledRoute } from '../../src/config/compile-routes.ts';
import type { ConfigProblem } from '../../src/config/load-routes.ts';
import { ConfigError, formatProblem, loadRoutes, parseRouteText } from '../../src/config/load-routes.ts';
import { routeJsonSchema } from '../../src/config/route-schema.ts';
import { useTempDirs } from '../helpers/temp-dir.ts';

const tempDir = useTempDirs('egress-routes-');

/** A real certificate: upstream_ca's certificates must parse. */
const PEM = `${rootCertificates[0]!}\n`;

/** A complete, valid route file; line numbers below are counted on this text. */
const PLAID = `name: plaid
prefix: /plaid
upstream: https://production.plaid.com
credential: plaid-production
inject:
  scheme: headers
  headers:
    PLAID-CLIENT-ID: "{client_id}"
    PLAID-SECRET: "{secret}"
timeouts: { connect: 5s, response: 30s }
max_body: 1mb
upstream_rate: { rate: 100/s, burst: 200 }
allow:
  - caller: sync-worker
    methods: [POST]
    paths: [/accounts/get, /transactions/sync, /item/*]
    rate: { rate: 20/s, burst: 40 }
  - caller: web
    methods: [POST]
    paths: [/link/token/create]
    rate: { rate: 300/min }
`;

/** The smallest valid file for a given name and prefix; extra lines are appended. */
function minimal(name: string, prefix: string, extra = ''): string {
  return `name: ${name}\nprefix: ${prefix}\nupstream: https://${name}.example\ncredential: ${name}-key\ninject: { scheme: bearer }\n${extra}`;
}

const noCa = async (path: string): Promise<string> => {
  throw Object.assign(new Error(`no such file ${path}`), { code: 'ENOENT' });
};

async function compiles(text: string, file = '/x/plaid.yaml', readCa = noCa): Promise<CompiledRoute> {
  const result = await parseRouteText(text, file, readCa);
  if ('problems' in result) throw new Error(`expected a route, got problems: ${result.problems.map(formatProblem).join('; ')}`);
  return result.route;
}

async function problemsOf(text: string, file = '/x/plaid.yaml', readCa = noCa): Promise<ConfigProblem[]> {
  const result = await parseRouteText(text, file, readCa);
  if ('route' in result) throw new Error('expected problems, but the file compiled');
  expect(result.problems.length).toBeGreaterThan(0);
  for (const p of result.problems) expect(p.file).toBe(file);
  return result.problems;
}

describe('parseRouteText: a valid file', () => {
  it('compiles into the domain object', async () => {
    const route = await compiles(PLAID);
    expect(route.name).toBe('plaid');
    expect(route.file).toBe('/x/plaid.yaml');
    expect(route.prefix).toBe('/plaid');
    expect(route.prefixSegments).toEqual(['plaid']);
    expect(route.origin).toBe('https://production.plaid.com');
    expect(route.upstreamHost).toBe('production.plaid.com');
    expect(route.basePath).toBe('');
    expect(route.credential).toBe('plaid-production');
    expect(route.connectTimeoutMs).toBe(5000);
    expect(route.responseTimeoutMs).toBe(30_000);
    expect(route.maxBody).toBe(1024 * 1024);
    expect(route.upstreamRate).toEqual({ rate: { count: 100, periodMs: 1000 }, burst: 200 });
    expect([...route.claims.headers].sort()).toEqual(['plaid-client-id', 'plaid-secret']);
    expect([...route.fields].sort()).toEqual(['client_id', 'secret']);
    expect(route.rules).toHaveLength(2);
    expect(route.rules[0]!.caller).toBe('sync-worker');
    expect([...route.rules[0]!.methods]).toEqual(['POST']);
    expect(route.rules[0]!.paths.map((p) => p.source)).toEqual(['/accounts/get', '/transactions/sync', '/item/*']);
    expect(route.rules[1]!.rate).toEqual({ rate: { count: 300, periodMs: 60_000 } });
    expect(route.rulesByCaller.get('web')).toEqual([route.rules[1]]);
  });

  it('is frozen: the route, its rules, their patterns and the injections', async () => {
    const route = await compiles(PLAID);
    expect(Object.isFrozen(route)).toBe(true);
    expect(Object.isFrozen(route.rules)).toBe(true);
    for (const rule of route.rules) {
      expect(Object.isFrozen(rule)).toBe(true);
      expect(Object.isFrozen(rule.paths)).toBe(true);
      for (const p of rule.paths) expect(Object.isFrozen(p)).toBe(true);
    }
    expect(Object.isFrozen(route.injections)).toBe(true);
    expect(Object.isFrozen(route.prefixSegments)).toBe(true);
    expect(() => {
      (route as { prefix: string }).prefix = '/other';
    }).toThrow(TypeError);
  });

  it('applies defaults and keeps an upstream base path without its trailing slash', async () => {
    const route = await compiles(minimal('plaid', '/plaid').replace('https://plaid.example', 'https://plaid.example/api/v1/'));
    expect(route.basePath).toBe('/api/v1');
    expect(route.connectTimeoutMs).toBe(5000);
    expect(route.maxBody).toBe(1024 * 1024);
    expect(route.rules).toEqual([]);
  });
});

describe('parseRouteText: problems point at file:line:col', () => {
  it('an unknown top-level key names the key, its line and column', async () => {
    const text = PLAID.replace('max_body: 1mb\n', 'max_body: 1mb\nbogus: 1\n');
    const [p, ...others] = await problemsOf(text);
    expect(others).toEqual([]);
    expect(p).toMatchObject({ line: 12, col: 1 });
    expect(p!.message).toContain('"bogus"');
    expect(formatProblem(p!)).toMatch(/^\/x\/plaid\.yaml:12:1: /);
  });

  it('an unknown nested key points at the key itself', async () => {
    const text = PLAID.replace('    rate: { rate: 300/min }\n', '    rate: { rate: 300/min }\n    colour: red\n');
    const [p] = await problemsOf(text);
    expect(p).toMatchObject({ line: 22, col: 5 });
    expect(p!.message).toContain('"colour"');
    expect(p!.message).toContain('allow.1');
  });

  it('an unknown key inside an inline map points at its column', async () => {
    const text = PLAID.replace('timeouts: { connect: 5s, response: 30s }', 'timeouts: { connect: 5s, idle: 30s }');
    const [p] = await problemsOf(text);
    expect(p).toMatchObject({ line: 10, col: 26 });
    expect(p!.message).toContain('"idle"');
  });

  it('a duplicate key is refused at the duplicate', async () => {
    const [p] = await problemsOf(`${PLAID}name: plaid\n`);
    expect(p!.line).toBe(22);
    expect(p!.message.toLowerCase()).toContain('unique');
  });

  it('a bad value points at that value', async () => {
    const [p] = await problemsOf(PLAID.replace('max_body: 1mb', 'max_body: lots'));
    expect(p!.line).toBe(11);
    expect(p!.message).toContain('max_body');
  });
});

describe('parseRouteText: prototype pollution and YAML features (FLT-10)', () => {
  it('refuses a YAML merge key "<<" (CVE-2025-64718 class)', async () => {
    const problems = await problemsOf(`${PLAID}<<: { max_body: 5 }\n`);
    expect(problems[0]!.line).toBe(22);
    expect(problems[0]!.message).toContain('"<<"');
    expect(({} as Record<string, unknown>).max_body).toBeUndefined();
  });

  it('refuses a "__proto__" key, top-level and nested, without polluting Object.prototype', async () => {
    const top = await problemsOf(`${PLAID}__proto__: { polluted: yes }\n`);
    expect(top[0]!.message).toContain('"__proto__"');
    expect(top[0]!.line).toBe(22);
    const nested = await problemsOf(PLAID.replace('    rate: { rate: 300/min }\n', '    rate: { rate: 300/min }\n    __proto__: { polluted: yes }\n'));
    expect(nested[0]!.message).toContain('"__proto__"');
    const inInject = await problemsOf(PLAID.replace('  scheme: headers\n', '  scheme: headers\n  __proto__: { polluted: yes }\n'));
    expect(inInject.length).toBeGreaterThan(0);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
    expect(Object.prototype).not.toHaveProperty('polluted');
  });

  it('refuses aliases, a "<<: *anchor" merge included, as problems with a position, not a thrown exception', async () => {
    const alias = PLAID.replace('credential: plaid-production', 'credential: &c plaid-production').replace('  - caller: web', '  - caller: *c');
    const merge = `defaults: &d { max_body: 5 }\n${PLAID.replace('name: plaid\n', 'name: plaid\n<<: *d\n')}`;
    for (const text of [alias, merge]) {
      const result = await parseRouteText(text, '/x/plaid.yaml', noCa).catch((err: unknown) => ({ threw: err }));
      expect(result).toHaveProperty('problems');
    }
    const problems = ((await parseRouteText(alias, '/x/plaid.yaml', noCa).catch(() => ({}))) as { problems?: ConfigProblem[] }).problems;
    // Both the anchor (line 4) and the alias (line 18) are reported, each where it stands.
    expect(problems?.map((p) => p.line)).toEqual([4, 18]);
    expect(problems?.[0]?.message).toContain('anchors');
    expect(problems?.[1]?.message).toContain('aliases');
  });

  it('refuses an anchor even with no alias using it', async () => {
    const problems = ((await parseRouteText(PLAID.replace('credential: plaid-production', 'credential: &c plaid-production'), '/x/plaid.yaml', noCa)) as { problems?: ConfigProblem[] }).problems;
    expect(problems?.map((p) => p.line)).toEqual([4]);
  });

  it('refuses a custom tag', async () => {
    const [p] = await problemsOf(PLAID.replace('max_body: 1mb', 'max_body: !custom 1mb'));
    expect(p!.line).toBe(11);
  });
});

describe('parseRouteText: field rules', () => {
  it.each([
    ['{}', 'an empty placeholder'],
    ['{a', 'an unclosed placeholder'],
    ['}', 'a lone closing brace'],
    ['x{1a}', 'a placeholder that is not a field name'],
  ])('refuses the template %j (%s)', async (template) => {
    const [p] = await problemsOf(PLAID.replace('"{secret}"', JSON.stringify(template)));
    expect(p!.line).toBeGreaterThanOrEqual(5);
    expect(p!.line).toBeLessThanOrEqual(9);
    expect(p!.message).toContain('inject');
  });

  it('a bad template is reported at the template, saying what is wrong with it', async () => {
    const [p] = await problemsOf(PLAID.replace('"{secret}"', '"{a"'));
    expect(p).toMatchObject({ line: 9, col: 19 });
    expect(p!.message).toContain('placeholder');
  });

  it.each(['/plaid/', '/plaid/*', '/pl*', '/pl%61id', '/', 'plaid', '/plaid//x', ''])('refuses the prefix %j', async (prefix) => {
    const [p] = await problemsOf(PLAID.replace('prefix: /plaid', `prefix: ${JSON.stringify(prefix)}`));
    expect(p!.line).toBe(2);
    expect(p!.message).toContain('prefix');
  });

  // A dot segment can never be matched (parseTarget refuses it), so such a rule or route is silently dead.
  it('refuses dot segments in a prefix or an allow path', async () => {
    for (const prefix of ['/..', '/plaid/.', '/plaid/..']) {
      const [p] = await problemsOf(PLAID.replace('prefix: /plaid', `prefix: ${JSON.stringify(prefix)}`));
      expect(p!.line).toBe(2);
    }
    for (const path of ['/link/../token', '/./x', '/a/..']) {
      const [p] = await problemsOf(PLAID.replace('/link/token/create', path));
      expect(p!.line).toBe(20);
    }
  });

  it.each(['post', 'Post', 'TRACE', 'CONNECT', 'PROPFIND'])('refuses the method %j', async (method) => {
    const [p] = await problemsOf(PLAID.replace('    methods: [POST]\n    paths: [/link', `    methods: [${method}]\n    paths: [/link`));
    expect(p!.line).toBe(19);
    expect(p!.message).toContain('allow.1.methods.0');
  });

  it.each(['/a/**/b', 'a/b', '/a//b', '/a/b*', '/a/%2e', '/a/**x'])('refuses the path pattern %j', async (pattern) => {
    const [p] = await problemsOf(PLAID.replace('/link/token/create', pattern));
    expect(p!.line).toBe(20);
    expect(p!.message).toContain('allow.1.paths.0');
  });

  it.each([
    ['20/s', { count: 20, periodMs: 1000 }],
    ['300/min', { count: 300, periodMs: 60_000 }],
    ['10000/day', { count: 10_000, periodMs: 86_400_000 }],
    ['5/hour', { count: 5, periodMs: 3_600_000 }],
  ])('accepts the rate %j', async (rate, expected) => {
    const route = await compiles(PLAID.replace('rate: 300/min', `rate: ${rate}`));
    expect(route.rules[1]!.rate!.rate).toEqual(expected);
  });

  it.each(['20/fortnight', '0/s', '-1/s', '1.5/s', '20', '/s', '20/constructor', '20/__proto__', '20/toString'])('refuses the rate %j', async (rate) => {
    const [p] = await problemsOf(PLAID.replace('rate: 300/min', `rate: ${JSON.stringify(rate)}`));
    expect(p!.line).toBe(21);
    expect(p!.message).toContain('rate');
  });

  it('refuses a name that does not match the file stem', async () => {
    const [p] = await problemsOf(PLAID, '/x/bank.yaml');
    expect(p!.line).toBe(1);
    expect(p!.message).toContain('"plaid"');
    expect(p!.message).toContain('"bank"');
    // .yml is a route file too
    await compiles(PLAID, '/x/plaid.yml');
  });

  it.each(['Plaid', 'pl aid', '-plaid', 'plaid.x'])('refuses the route name %j', async (name) => {
    const [p] = await problemsOf(PLAID.replace('name: plaid', `name: ${JSON.stringify(name)}`), `/x/${name}.yaml`);
    expect(p!.line).toBe(1);
  });

  it.each([
    'https://user:pass@production.plaid.com',
    'https://user@production.plaid.com',
    'https://production.plaid.com/?a=1',
    'https://production.plaid.com/#x',
    'ftp://production.plaid.com',
    'file:///etc/passwd',
    'production.plaid.com',
  ])('refuses the upstream %j', async (upstream) => {
    const [p] = await problemsOf(PLAID.replace('https://production.plaid.com', upstream));
    expect(p!.line).toBe(3);
    expect(p!.message).toContain('upstream');
  });

  it('refuses an unknown inject scheme and a scheme with unknown options', async () => {
    const [p] = await problemsOf(PLAID.replace('scheme: headers', 'scheme: magic'));
    expect(p!.message).toContain('inject');
    await problemsOf(minimal('plaid', '/plaid').replace('{ scheme: bearer }', '{ scheme: bearer, header: X-Key }'));
  });
});

describe('parseRouteText: upstream_ca', () => {
  it('reads a PEM file through readCa, relative to the route file', async () => {
    const asked: string[] = [];
    const route = await compiles(`${PLAID}upstream_ca: ./ca.pem\n`, '/x/plaid.yaml', async (path) => {
      asked.push(path);
      return PEM;
    });
    expect(asked).toEqual(['./ca.pem']);
    expect(route.upstreamCa).toBe(PEM);
  });

  it('a missing file is a problem at the upstream_ca line', async () => {
    const [p] = await problemsOf(`${PLAID}upstream_ca: ./missing.pem\n`);
    expect(p!.line).toBe(22);
    expect(p!.message).toContain('upstream_ca');
    expect(p!.message).toContain('ENOENT');
  });

  it('a file without a PEM certificate is a problem', async () => {
    const [p] = await problemsOf(`${PLAID}upstream_ca: ./ca.pem\n`, '/x/plaid.yaml', async () => 'not a certificate\n');
    expect(p!.line).toBe(22);
    expect(p!.message).toContain('PEM');
  });

  it.each([
    ['altered bytes', `${PEM}${PEM.replace(/\n[A-Za-z0-9+/]{8}/, '\n!!!!!!!!')}`, 'certificate 2'],
    ['a certificate cut short (a bundle caught half-written)', `${PEM}${PEM.slice(0, PEM.length / 2)}`, 'certificate 2'],
    ['a placeholder body', '-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n', 'certificate 1'],
  ])('a certificate that does not parse (%s) is a problem naming it, not a CA the TLS stack drops without a word', async (_what, text, which) => {
    const [p] = await problemsOf(`${PLAID}upstream_ca: ./ca.pem\n`, '/x/plaid.yaml', async () => text);
    expect(p!.line).toBe(22);
    expect(p!.message).toContain('upstream_ca');
    expect(p!.message).toContain(which);
  });

  it('a bundle with text between its certificates (openssl\'s subject= lines) is read', async () => {
    const route = await compiles(`${PLAID}upstream_ca: ./ca.pem\n`, '/x/plaid.yaml', async () => `subject=CN = one\n${PEM}\n# two\n${rootCertificates[1]!}\n`);
    expect(route.upstreamCa).toContain(PEM);
  });

  it('loadRoutes resolves upstream_ca next to the route file', async () => {
    const dir = await tempDir();
    await writeFile(join(dir, 'ca.pem'), PEM);
    await writeFile(join(dir, 'plaid.yaml'), `${PLAID}upstream_ca: ./ca.pem\n`);
    const config = await loadRoutes(dir);
    expect(config.routes[0]!.upstreamCa).toBe(PEM);
    await writeFile(join(dir, 'ca.pem'), 'garbage');
    await expect(loadRoutes(dir)).rejects.toBeInstanceOf(ConfigError);
  });
});

describe('loadRoutes: a folder', () => {
  async function folder(files: Record<string, string>): Promise<string> {
    const dir = await tempDir();
    for (const [name, text] of Object.entries(files)) await writeFile(join(dir, name), text);
    return dir;
  }

  async function configError(dir: string): Promise<ConfigError> {
    const err = await loadRoutes(dir).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }

  it('loads every .yaml and .yml file, sorted, skipping dot files and other extensions', async () => {
    const dir = await folder({
      'plaid.yaml': PLAID,
      'bank.yml': minimal('bank', '/bank'),
      '.hidden.yaml': 'not: [valid',
      'notes.txt': 'not a route',
      'plaid.yaml.bak': 'nor this',
    });
    const config = await loadRoutes(dir);
    expect(config.routes.map((r) => r.name)).toEqual(['bank', 'plaid']);
    expect(config.files).toEqual([join(dir, 'bank.yml'), join(dir, 'plaid.yaml')]);
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.routes)).toBe(true);
  });

  it('refuses overlapping prefixes', async () => {
    const err = await configError(await folder({ 'plaid.yaml': PLAID, 'plaid-v2.yaml': minimal('plaid-v2', '/plaid/v2') }));
    expect(err.problems).toHaveLength(1);
    expect(err.problems[0]!.message).toContain('overlaps');
    expect(err.message).toContain('/plaid/v2');
  });

  it('refuses equal prefixes', async () => {
    const err = await configError(await folder({ 'plaid.yaml': PLAID, 'other.yaml': minimal('other', '/plaid') }));
    expect(err.problems[0]!.message).toContain('overlaps');
  });

  // `routes check` prints file:line:col: a problem between two files points at the key in the
  // later one, and its message names the earlier one at its key.
  describe('problems between two files point at the key in each', () => {
    it('overlapping prefixes', async () => {
      const dir = await folder({ 'bank.yaml': `# the bank\n\n${minimal('bank', '/bank')}`, 'broker.yaml': minimal('broker', '/bank/broker') });
      const err = await configError(dir);
      expect(err.problems.map(formatProblem)).toEqual([`${join(dir, 'broker.yaml')}:2:9: prefix "/bank/broker" overlaps prefix "/bank" of ${join(dir, 'bank.yaml')}:4:9`]);
    });

    it('a host both files name, in a list written either way', async () => {
      const dir = await folder({
        'bank.yaml': minimal('bank', '/bank', 'hosts:\n  - api.bank.example\n  - shared.example\n'),
        'broker.yaml': minimal('broker', '/broker', 'hosts: [api.broker.example, shared.example]\n'),
      });
      const err = await configError(dir);
      expect(err.problems.map(formatProblem)).toEqual([`${join(dir, 'broker.yaml')}:6:29: host "shared.example" is also intercepted by ${join(dir, 'bank.yaml')}:8:5`]);
    });

    it('a route name used twice (.yaml and .yml)', async () => {
      const dir = await folder({ 'plaid.yaml': PLAID, 'plaid.yml': `# again\n${minimal('plaid', '/plaid-two')}` });
      const err = await configError(dir);
      expect(err.problems.map(formatProblem)).toEqual([`${join(dir, 'plaid.yml')}:2:7: route name "plaid" is also used by ${join(dir, 'plaid.yaml')}:1:7`]);
    });

    it('a prefix that comes from a preset points at the preset', async () => {
      const dir = await folder({ 'other.yaml': minimal('other', '/plaid2/v1'), 'plaid2.yaml': 'name: plaid2\ncredential: c\npreset: plaid\n' });
      const err = await configError(dir);
      expect(err.problems.map(formatProblem)).toEqual([`${join(dir, 'plaid2.yaml')}:3:9: prefix "/plaid2" overlaps prefix "/plaid2/v1" of ${join(dir, 'other.yaml')}:2:9`]);
    });
  });

  it('accepts prefixes that share only leading characters (/plaid and /plaidx)', async () => {
    const config = await loadRoutes(await folder({ 'plaid.yaml': PLAID, 'plaidx.yaml': minimal('plaidx', '/plaidx') }));
    expect(config.routes).toHaveLength(2);
  });

  it('refuses two files with the same route name (.yaml and .yml)', async () => {
    const err = await configError(await folder({ 'plaid.yaml': PLAID, 'plaid.yml': minimal('plaid', '/plaid-two') }));
    expect(err.problems.some((p) => p.message.includes('route name "plaid"'))).toBe(true);
  });

  it('one invalid file rejects the whole folder and every problem is reported', async () => {
    const dir = await folder({
      'plaid.yaml': PLAID,
      'bank.yaml': minimal('bank', '/bank', 'bogus: 1\n'),
      'broker.yaml': minimal('broker', '/broker/'),
    });
    const err = await configError(dir);
    expect(err.problems.map((p) => p.file).sort()).toEqual([join(dir, 'bank.yaml'), join(dir, 'broker.yaml')]);
    expect(err.message).toContain(`${join(dir, 'bank.yaml')}:6:1:`);
  });

  it('an alias in one file is a ConfigError for the folder', async () => {
    const dir = await folder({ 'plaid.yaml': PLAID, 'bank.yaml': minimal('bank', '/bank', 'allow:\n  - caller: &c web\n    methods: [GET]\n    paths: [/]\n  - caller: *c\n    methods: [POST]\n    paths: [/]\n') });
    await configError(dir);
  });

  it('a missing folder is a ConfigError', async () => {
    const dir = await tempDir();
    const err = await configError(join(dir, 'nope'));
    expect(err.problems[0]!.message).toContain('ENOENT');
  });

  it('an empty folder loads with no routes', async () => {
    expect((await loadRoutes(await tempDir())).routes).toEqual([]);
  });

  it('a directory named like a route file is reported, not crashed on', async () => {
    const dir = await folder({ 'plaid.yaml': PLAID });
    await mkdir(join(dir, 'sub.yaml'));
    const err = await configError(dir);
    expect(err.problems[0]!.file).toBe(join(dir, 'sub.yaml'));
  });
});

describe('routeJsonSchema', () => {
  it('describes a strict route file', () => {
    const schema = routeJsonSchema() as { type?: unknown; properties?: Record<string, unknown>; additionalProperties?: unknown; required?: unknown; anyOf?: unknown };
    expect(schema.type).toBe('object');
    expect(Object.keys(schema.properties ?? {})).toEqual(expect.arrayContaining(['name', 'preset', 'prefix', 'upstream', 'credential', 'inject', 'allow', 'caller_headers']));
    expect(schema.additionalProperties).toBe(false);
    // prefix, upstream and inject are required unless a preset supplies them.
    expect(schema.required).toEqual(expect.arrayContaining(['name', 'credential']));
    expect(schema.anyOf).toEqual([{ required: ['preset'] }, { required: ['prefix', 'upstream', 'inject'] }]);
    expect(JSON.parse(JSON.stringify(schema))).toEqual(schema);
  });
});

describe('loadRoutes: what is not a route file', () => {
  it('refuses a file over 1 MiB and a directory under a route file name, without reading them, with file:0:0 problems', async () => {
    const dir = await tempDir();
    await writeFile(join(dir, 'big.yaml'), `# ${'x'.repeat(1024 * 1024)}\n`);
    await mkdir(join(dir, 'folder.yaml'));
    const err = await loadRoutes(dir).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(ConfigError);
    const lines = (err as ConfigError).problems.map(formatProblem);
    expect(lines).toEqual([`${join(dir, 'big.yaml')}:0:0: cannot read (larger than 1 MiB)`, `${join(dir, 'folder.yaml')}:0:0: cannot read (not a regular file)`]);
  });
});

describe('loadRoutes: files nested too deeply to read', () => {
  // 1 MiB is room for hundreds of thousands of nested collections; the YAML composer recurses once
  // per level, so such a file overflowed the stack: a RangeError that named no file (reload log,
  // `routes check`) instead of a problem at the file.
  it.each([
    ['flow sequences', `allow: ${'['.repeat(200_000)}${']'.repeat(200_000)}\n`, 2],
    ['flow maps', `allow: ${'{a: '.repeat(100_000)}1${'}'.repeat(100_000)}\n`, 2],
    ['compact block sequences', `allow:\n  ${'- '.repeat(200_000)}x\n`, 3],
  ])('%s: a problem at that file, and the other files are still checked', async (_kind, body, line) => {
    const dir = await tempDir();
    await writeFile(join(dir, 'plaid.yaml'), PLAID);
    await writeFile(join(dir, 'deep.yaml'), `name: deep\n${body}`);
    await writeFile(join(dir, 'other.yaml'), minimal('other', '/other', 'bogus: 1\n'));
    const err = await loadRoutes(dir).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(ConfigError);
    const problems = (err as ConfigError).problems;
    expect(problems.map((p) => p.file)).toEqual([join(dir, 'deep.yaml'), join(dir, 'other.yaml')]);
    expect(problems[0]).toMatchObject({ line });
    expect(problems[0]!.message).toContain('nested');
  });
});

describe('loadRoutes: text encoding', () => {
  it('a route file that is not UTF-8 is refused at its first bad byte, not read with U+FFFD in its place', async () => {
    const dir = await tempDir();
    // Latin-1 "é" (0xE9): read as UTF-8 it became U+FFFD, and body_contains never matched again.
    const text = `${PLAID}auth_failure:\n  status: [401]\n  body_contains: "clé invalide"\n`;
    await writeFile(join(dir, 'plaid.yaml'), Buffer.from(text, 'latin1'));
    const err = await loadRoutes(dir).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).problems).toEqual([{ file: join(dir, 'plaid.yaml'), line: 24, col: 21, message: expect.stringContaining('UTF-8') }]);
  });

  it('UTF-8 with or without a byte order mark loads, non-ASCII text intact', async () => {
    const dir = await tempDir();
    const text = `${PLAID}auth_failure:\n  status: [401]\n  body_contains: "clé invalide ☕"\n`;
    await writeFile(join(dir, 'plaid.yaml'), Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(text, 'utf8')]));
    await writeFile(join(dir, 'bank.yaml'), minimal('bank', '/bank', 'auth_failure:\n  status: [401]\n  body_contains: "ungültig"\n'));
    const config = await loadRoutes(dir);
    expect(config.routes.map((r) => r.authFailure.bodyContains)).toEqual([['ungültig'], ['clé invalide ☕']]);
  });
});

describe('parseRouteText: "__proto__" inside maps of names', () => {
  // zod skips a "__proto__" key of a record (it would replace the result's prototype), so a header,
  // query parameter or body field of that name was dropped without a word.
  it('a "__proto__" header in inject.headers is refused where it stands, not dropped', async () => {
    const problems = await problemsOf(PLAID.replace('    PLAID-SECRET: "{secret}"\n', '    PLAID-SECRET: "{secret}"\n    __proto__: "{secret}"\n'));
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatchObject({ line: 10, col: 5 });
    expect(problems[0]!.message).toContain('"__proto__"');
  });

  it('so is one in a query or json_body injection', async () => {
    for (const inject of ['{ scheme: query, params: { api_key: "{secret}", __proto__: "{secret}" } }', '{ scheme: json_body, fields: { secret: "{secret}", __proto__: "{secret}" } }']) {
      const problems = await problemsOf(minimal('plaid', '/plaid').replace('{ scheme: bearer }', inject));
      expect(problems[0]!.line, inject).toBe(5);
      expect(problems[0]!.message, inject).toContain('"__proto__"');
    }
  });
});

describe('parseRouteText: dot segments with path parameters', () => {
  // parseTarget refuses "..;", ".;x" and "..%3B" segments (Java servers resolve them as dot segments),
  // so a prefix or rule written with one can never match anything.
  it('refuses them in a prefix and in an allow path, as it does "." and ".."', async () => {
    for (const prefix of ['/plaid/..;', '/plaid/.;x', '/..;v=1']) {
      const [p] = await problemsOf(PLAID.replace('prefix: /plaid', `prefix: ${JSON.stringify(prefix)}`));
      expect(p!.line, prefix).toBe(2);
    }
    for (const path of ['/link/..;/token', '/.;x', '/a/..;jsessionid=1']) {
      const [p] = await problemsOf(PLAID.replace('/link/token/create', path));
      expect(p!.line, path).toBe(20);
    }
    // A name that only starts with dots is an ordinary segment.
    await compiles(PLAID.replace('/link/token/create', '/link/..x;y/.well-known'));
  });
});

describe('parseRouteText: a header the injections set twice', () => {
  // Header names are case-insensitive (and many servers read "_" as "-"): the proxy set both
  // spellings under one name, so one of the two values the file wrote was silently never sent.
  it.each([
    ['two spellings in one headers map', '  scheme: headers\n  headers:\n    X-Key: "{key}"\n    x-key: "{other}"\n'],
    ['"_" and "-" in one headers map', '  scheme: headers\n  headers:\n    X-Api-Key: "{key}"\n    X_Api_Key: "{other}"\n'],
    ['a headers injection and a bearer one', '  - scheme: headers\n    headers:\n      Authorization: "Token {key}"\n  - scheme: bearer\n'],
    ['basic and bearer', '  - scheme: basic\n  - scheme: bearer\n'],
  ])('%s is refused at the injection', async (_case, inject) => {
    const problems = await problemsOf(minimal('plaid', '/plaid').replace('inject: { scheme: bearer }\n', `inject:\n${inject}`));
    expect(problems).toHaveLength(1);
    expect(problems[0]!.line).toBeGreaterThanOrEqual(5);
    expect(problems[0]!.message).toMatch(/set twice|also set by/);
  });

  it('distinct headers across injections are fine', async () => {
    await compiles(minimal('plaid', '/plaid').replace('inject: { scheme: bearer }\n', 'inject:\n  - scheme: headers\n    headers:\n      X-Client: "{client}"\n  - scheme: bearer\n'));
  });
});

describe('parseRouteText: a map with very many keys', () => {
  // The YAML library checks each key against every earlier key of its map: 50,000 keys in one map
  // (well under the 1 MiB a route file may have) held the event loop, and every request, for half
  // a minute at a reload.
  it('is refused in linear time, and duplicate keys are still caught where they stand', async () => {
    const keys = Array.from({ length: 50_000 }, (_, i) => `k${i}: 1`).join('\n');
    const started = performance.now();
    const problems = await problemsOf(`${PLAID}${keys}\n`);
    expect(performance.now() - started).toBeLessThan(15_000);
    expect(problems[0]!.message).toContain('unknown keys');
    const dup = await problemsOf(`${PLAID}${keys}\nk49999: 2\n`);
    expect(dup).toEqual([expect.objectContaining({ line: 50_022, col: 1, message: expect.stringContaining('unique') })]);
  }, 60_000);

  it('a key written once as a number and once as a string is a duplicate too (both are the same key once loaded)', async () => {
    const [p] = await problemsOf(PLAID.replace('    PLAID-SECRET: "{secret}"\n', '    1: "{client_id}"\n    "1": "{secret}"\n'));
    expect(p).toMatchObject({ line: 10, col: 5 });
    expect(p!.message).toContain('unique');
  });
});

describe('parseRouteText: a file with very many problems', () => {
  // Each problem is located in the file by a search of its map: 45,000 bad header names took 12 s,
  // on the event loop at a reload, to report 45,000 lines nobody reads.
  it('reports the first 50, then how many more there are, where the next one is', async () => {
    const names = Array.from({ length: 40_000 }, (_, i) => `    "h ${i}": "{secret}"`).join('\n');
    const started = performance.now();
    const problems = await problemsOf(PLAID.replace('    PLAID-CLIENT-ID: "{client_id}"\n    PLAID-SECRET: "{secret}"\n', `${names}\n`));
    expect(performance.now() - started).toBeLessThan(10_000);
    expect(problems).toHaveLength(51);
    expect(problems[0]).toMatchObject({ line: 8, col: 12 });
    expect(problems[49]).toMatchObject({ line: 57 });
    expect(problems[50]).toMatchObject({ line: 58, col: 13, message: 'and 39950 more problems in this file' });
  }, 60_000);

  it('so is a file with very many anchors', async () => {
    const anchors = Array.from({ length: 200 }, (_, i) => `  - caller: &a${i} web\n    methods: [POST]\n    paths: [/x]`).join('\n');
    const problems = await problemsOf(PLAID.replace(/allow:\n[\s\S]*$/, `allow:\n${anchors}\n`));
    expect(problems).toHaveLength(51);
    expect(problems[50]!.message).toBe('and 150 more problems in this file');
  });
});

describe('parseRouteText: a file that is not a map of keys', () => {
  it.each([
    ['an empty file', '', 1],
    ['a file of comments', '# plaid route, to do\n\n', 1],
    ['a file of one null', '---\n~\n', 2],
  ])('%s is refused as empty, at file:line:col', async (_case, text, line) => {
    const problems = await problemsOf(text);
    expect(problems).toEqual([{ file: '/x/plaid.yaml', line, col: 1, message: expect.stringMatching(/^the file is empty: a route file is a map of keys/) }]);
  });

  it('a list or a bare value says what the file should be', async () => {
    for (const text of ['- name: plaid\n  prefix: /plaid\n', 'plaid\n']) {
      const problems = await problemsOf(text);
      expect(problems, text).toEqual([{ file: '/x/plaid.yaml', line: 1, col: 1, message: expect.stringMatching(/^a route file is a map of keys \(name, prefix, upstream/) }]);
    }
  });
});

describe('parseRouteText: the upstream\'s base path is written as it is sent', () => {
  // The base path is put before every path sent upstream and never checked again. A URL parser
  // rewrote these without a word: "\" became "/", "a/../b" became "b", a space became %20.
  it.each([
    'https://production.plaid.com//api',
    'https://production.plaid.com\\evil.example',
    'https://production.plaid.com/api\\v2',
    'https://production.plaid.com/a/../b',
    'https://production.plaid.com/a/%2e%2e/b',
    'https://production.plaid.com/a/./b',
    'https://production.plaid.com/a%2Fb',
    'https://production.plaid.com/a b',
  ])('refuses the upstream %j at its line', async (upstream) => {
    const [p] = await problemsOf(PLAID.replace('https://production.plaid.com', JSON.stringify(upstream)));
    expect(p!.line).toBe(3);
    expect(p!.message).toContain('upstream');
  });

  it.each(['https://production.plaid.com', 'https://production.plaid.com/', 'https://beta-bridge.simplefin.org/simplefin', 'https://api.example.com/v2/', 'http://127.0.0.1:8081/api/v1', 'https://api.example.com/a:b/~c'])('accepts %j', async (upstream) => {
    const route = await compiles(PLAID.replace('https://production.plaid.com', upstream));
    expect(route.origin + route.basePath).toBe(upstream.replace(/\/$/, ''));
  });
});

describe('parseRouteText: inject options that could do nothing are refused', () => {
  const OAUTH = `name: gc
prefix: /gc
upstream: https://bankaccountdata.gocardless.com
credential: gc
inject:
  scheme: oauth2_client_credentials
  token_url: https://bankaccountdata.gocardless.com/api/v2/token/new/
  refresh_url: https://bankaccountdata.gocardless.com/api/v2/token/refresh/
  client_auth: json
  refresh_field: refresh
allow:
  - caller: svc
    methods: [GET]
    paths: [/accounts]
`;
  const MTLS = `name: teller
prefix: /teller
upstream: https://api.teller.io
credential: teller
inject:
  scheme: mtls
  certificate: "{certificate}"
  private_key: "{private_key}"
allow:
  - caller: svc
    methods: [GET]
    paths: [/accounts]
`;

  it('an oauth2 refresh_url without refresh_field (no refresh token is ever kept to send it) is refused at refresh_url, saying to set refresh_field', async () => {
    await compiles(OAUTH, '/x/gc.yaml');
    const problems = await problemsOf(OAUTH.replace('  refresh_field: refresh\n', ''), '/x/gc.yaml');
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatchObject({ line: 8, col: 16 });
    expect(problems[0]!.message).toMatch(/^inject\.refresh_url: .*refresh_field/);
  });

  it('an oauth2 refresh_field without refresh_url (the refresh token would be kept and never sent) is refused at refresh_field, saying to set refresh_url', async () => {
    const problems = await problemsOf(OAUTH.replace(/  refresh_url: .*\n/, ''), '/x/gc.yaml');
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatchObject({ line: 9, col: 18 });
    expect(problems[0]!.message).toMatch(/^inject\.refresh_field: .*refresh_url/);
  });

  it('an oauth2 refresh_expires_field without refresh_field (there is no refresh token for it to time) is refused at refresh_expires_field', async () => {
    await compiles(OAUTH.replace('  refresh_field: refresh\n', '  refresh_field: refresh\n  refresh_expires_field: refresh_expires\n'), '/x/gc.yaml');
    const problems = await problemsOf(OAUTH.replace(/  refresh_url: .*\n/, '').replace('  refresh_field: refresh\n', '  refresh_expires_field: refresh_expires\n'), '/x/gc.yaml');
    expect(problems).toHaveLength(1);
    expect(problems[0]!.message).toMatch(/^inject\.refresh_expires_field: .*refresh_field/);
  });

  it('an mtls passphrase with a PEM certificate and private_key (encrypted PEM keys are not supported) is refused at passphrase, saying it goes with pkcs12 only', async () => {
    await compiles(MTLS, '/x/teller.yaml');
    await compiles(MTLS.replace('  certificate: "{certificate}"\n  private_key: "{private_key}"\n', '  pkcs12: "{pkcs12}"\n  passphrase: "{passphrase}"\n'), '/x/teller.yaml');
    const problems = await problemsOf(MTLS.replace('  private_key: "{private_key}"\n', '  private_key: "{private_key}"\n  passphrase: "{passphrase}"\n'), '/x/teller.yaml');
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatchObject({ line: 9, col: 15 });
    expect(problems[0]!.message).toMatch(/^inject\.passphrase: .*pkcs12 only/);
  });
});

describe('parseRouteText: idempotency_key', () => {
  it('is absent by default, and compiles lower-cased', async () => {
    expect((await compiles(PLAID)).idempotencyKey).toBeUndefined();
    expect((await compiles(`${PLAID}idempotency_key: Idempotency-Key\n`)).idempotencyKey).toBe('idempotency-key');
    expect((await compiles(`${PLAID}idempotency_key: null\n`)).idempotencyKey).toBeUndefined();
  });

  it.each(['Idempotency Key', 'Idempotency-Key:', '', 'Idempotency\u00e9Key'])('refuses %j, at the key, saying what to write', async (name) => {
    const [p, ...rest] = await problemsOf(`${PLAID}idempotency_key: ${JSON.stringify(name)}\n`);
    expect(rest).toEqual([]);
    expect(p).toMatchObject({ line: 22, col: 18 });
    expect(formatProblem(p!)).toContain('idempotency_key: not a valid header name: write the request header the upstream honours, e.g. Idempotency-Key');
  });

  it.each([
    ['a header an injection sets', 'idempotency_key: Plaid_Secret\n', '"Plaid_Secret" is set by the "headers" injection'],
    ['a header the proxy always removes', 'idempotency_key: X-Forwarded-Key\n', '"X-Forwarded-Key" is always removed by the proxy'],
    ['a header caller_headers keeps from the upstream', 'caller_headers: [X-Trace]\nidempotency_key: X-Idempotency\n', '"X-Idempotency" does not reach the upstream on this route: list it in caller_headers'],
    ['Authorization, which only caller_headers lets through', 'idempotency_key: Authorization\n', '"Authorization" does not reach the upstream on this route'],
  ])('refuses %s: the caller\'s value would never reach the upstream', async (_case, lines, message) => {
    const [p, ...rest] = await problemsOf(`${PLAID}${lines}`);
    expect(rest).toEqual([]);
    expect(p!.message).toContain(message);
  });

  it('a header caller_headers lists, or one of its standard set, is accepted', async () => {
    expect((await compiles(`${PLAID}caller_headers: [X-Idempotency]\nidempotency_key: X-Idempotency\n`)).idempotencyKey).toBe('x-idempotency');
    expect((await compiles(`${PLAID}caller_headers: [X-Trace]\nidempotency_key: Idempotency-Key\n`)).idempotencyKey).toBe('idempotency-key');
  });
});
