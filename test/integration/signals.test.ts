import { readFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startServe, type ServeProcess } from '../helpers/cli.ts';
import { envFor, eventually, makeTempDir, seedDataDir, startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { bearerRoute } from '../helpers/routes.ts';
import { makeTestPki } from '../helpers/tls.ts';
import { startUpstream, type Upstream } from '../helpers/upstream.ts';

/** `egress serve` under repeated and mixed signals while it drains. */

let upstream: Upstream;
beforeAll(async () => {
  upstream = await startUpstream((_req, res) => void setTimeout(() => res.end('slow ok'), 800));
});
afterAll(async () => {
  await upstream?.close();
});

describe('signals while draining', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    serve?.child.kill('SIGKILL');
    serve = undefined;
  });

  // `npm start` under a process-group kill (docker stop, systemd KillMode=control-group) delivers
  // SIGTERM twice: once from the group, once forwarded by npm.
  it('a second SIGTERM during the drain neither kills the process nor loses the in-flight request or its audit line', async () => {
    const dir = await makeTempDir('egress-shutdown-');
    const { tokens } = await seedDataDir(dir, { routes: { api: bearerRoute({ upstream: upstream.url, paths: ['/slow'] }) }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const inflight = fetch(`${serve.url}/api/slow`, { headers: { 'x-egress-token': tokens.svc! } });
    await new Promise((r) => setTimeout(r, 200));
    const exited = serve.stop('SIGTERM');
    await new Promise((r) => setTimeout(r, 100));
    serve.child.kill('SIGTERM');
    serve.child.kill('SIGINT');
    serve.child.kill('SIGHUP');
    const res = await inflight;
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('slow ok');
    expect(await exited).toBe(0);
    const audit = await readFile(join(dir, 'audit.log'), 'utf8');
    expect(audit).toContain('/slow');
  }, 20_000);
});

describe('answers during the drain', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    serve?.child.kill('SIGKILL');
    serve = undefined;
  });

  /** Everything a raw keep-alive connection receives until the proxy closes it. */
  function rawExchange(port: number, requests: string): Promise<string> {
    return new Promise((resolve) => {
      const socket = connect(port, '127.0.0.1');
      let received = '';
      socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
      socket.on('error', (err) => (received += `\n[${String(err)}]`));
      socket.on('close', () => resolve(received));
      socket.write(requests);
    });
  }

  // An answer that said keep-alive was followed by the drain closing the connection: a caller whose
  // pool reused it at once had its next request met by a closed connection.
  it('an answer written after SIGTERM says Connection: close; requests pipelined before it are all answered, the last one closing', async () => {
    const dir = await makeTempDir('egress-drain-close-');
    const { tokens } = await seedDataDir(dir, { routes: { api: bearerRoute({ upstream: upstream.url, paths: ['/slow'] }) }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const port = Number(new URL(serve.url).port);
    const get = `GET /api/slow HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${tokens.svc!}\r\n\r\n`;
    const single = rawExchange(port, get);
    const pipelined = rawExchange(port, get + get);
    await new Promise((r) => setTimeout(r, 200));
    const exited = serve.stop('SIGTERM');
    const one = await single;
    expect(one).toMatch(/^HTTP\/1\.1 200 [^]*slow ok$/);
    expect(one).toMatch(/\r\nconnection: close\r\n/i);
    const two = (await pipelined).split(/(?=HTTP\/1\.1 )/);
    expect(two.length).toBe(2);
    expect(two[0]).toMatch(/^HTTP\/1\.1 200 [^]*slow ok$/);
    expect(two[1]).toMatch(/^HTTP\/1\.1 200 [^]*slow ok$/);
    expect(two[1]).toMatch(/\r\nconnection: close\r\n/i);
    expect(await exited).toBe(0);
    const audit = (await readFile(join(dir, 'audit.log'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { path: string; decision: string });
    expect(audit.filter((l) => l.path === '/api/slow' && l.decision === 'allow').length).toBe(3);
  }, 20_000);
});

describe('an error answer whose body was still arriving when the drain began', () => {
  let slow: Upstream | undefined;
  let proxy: TestProxy | undefined;
  afterEach(async () => {
    await proxy?.close();
    await slow?.close();
    proxy = undefined;
    slow = undefined;
  });

  // An error body is read whole (to redact echoes) before the answer's head is written: a drain
  // that began while it arrived left that head saying keep-alive, and the drain then closed the
  // connection under a caller that could have sent its next request on it.
  it('says Connection: close, as an answer written after SIGTERM does', async () => {
    slow = await startUpstream((_req, res) => {
      res.writeHead(404, { 'content-type': 'text/plain', 'content-length': '9' });
      res.flushHeaders();
      setTimeout(() => res.end('not found'), 600);
    });
    proxy = await startTestProxy({ routes: { api: bearerRoute({ upstream: slow.url, paths: ['/missing'] }) }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    const socket = connect(Number(new URL(proxy.url).port), '127.0.0.1');
    let received = '';
    socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
    socket.on('error', () => {});
    socket.write(`GET /api/missing HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${proxy.tokens.svc!}\r\n\r\n`);
    await eventually(() => slow!.requests.length === 1, 3_000, 'the request upstream');
    await new Promise((r) => setTimeout(r, 200));
    const closed = proxy.proxy.close(5_000);
    await eventually(() => received.includes('not found'), 3_000, 'the answer');
    expect(received).toMatch(/^HTTP\/1\.1 404 /);
    expect(received).toMatch(/\r\nconnection: close\r\n/i);
    await closed;
    socket.destroy();
  }, 15_000);
});

describe('requests cut at the drain deadline', () => {
  let serve: ServeProcess | undefined;
  afterEach(async () => {
    serve?.child.kill('SIGKILL');
    serve = undefined;
  });

  // Each request's handling ends as its connection is closed at the deadline, a moment after: the
  // process closed the audit log and exited before that, and their lines were never written.
  it('uploads still streaming at the deadline are cut, and each is audited before the process exits', async () => {
    const dir = await makeTempDir('egress-drain-cut-');
    const route = bearerRoute({ upstream: upstream.url, paths: ['/upload'], methods: ['POST'] }).replace('allow:', 'max_body: 10mb\nallow:');
    const { tokens } = await seedDataDir(dir, { routes: { api: route }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const port = Number(new URL(serve.url).port);
    const uploads = Array.from({ length: 4 }, () => new Promise<void>((resolve) => {
      const socket = connect(port, '127.0.0.1');
      socket.on('error', () => {});
      socket.write(`POST /api/upload HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${tokens.svc!}\r\nTransfer-Encoding: chunked\r\n\r\n`);
      const chunk = `3e8\r\n${'a'.repeat(1000)}\r\n`;
      const timer = setInterval(() => socket.writable && socket.write(chunk), 200);
      socket.on('close', () => {
        clearInterval(timer);
        resolve();
      });
    }));
    await new Promise((r) => setTimeout(r, 500));
    const started = performance.now();
    expect(await serve.stop('SIGTERM')).toBe(0);
    expect(performance.now() - started).toBeLessThan(12_000);
    await Promise.all(uploads);
    const audit = (await readFile(join(dir, 'audit.log'), 'utf8')).split('\n').filter(Boolean).map((l) => JSON.parse(l) as { path: string; decision: string });
    expect(audit.filter((l) => l.path === '/api/upload' && l.decision === 'aborted').length).toBe(4);
  }, 30_000);
});


describe('a connection handed over behind a request in flight', () => {
  let serve: ServeProcess | undefined;
  let hanging: Upstream | undefined;
  afterEach(async () => {
    serve?.child.kill('SIGKILL');
    serve = undefined;
    await hanging?.close();
    hanging = undefined;
  });

  // Node hands a CONNECT's or an upgrade's socket over at once; refused, it waits for the answers
  // before it. It is no longer the listener's connection, so the deadline did not close it, and
  // the drain waited for the upstream's answer (up to the route's response timeout) instead.
  it.each([
    ['an upgrade', 'GET /api/other HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n'],
    ['a CONNECT (forward mode off)', 'CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\n\r\n'],
  ])('%s pipelined behind a request whose upstream never answers does not hold the process past the drain deadline', async (_what, pipelined) => {
    hanging = await startUpstream(() => {});
    const dir = await makeTempDir('egress-drain-handover-');
    const route = bearerRoute({ upstream: hanging.url, paths: ['/hang'] }).replace('allow:', 'timeouts: { response: 60s }\nallow:');
    const { tokens } = await seedDataDir(dir, { routes: { api: route }, credentials: { key: { token: 'tok_1234567890' } }, callers: ['svc'] });
    serve = await startServe(envFor(dir));
    const socket = connect(Number(new URL(serve.url).port), '127.0.0.1');
    socket.on('error', () => {});
    socket.write(`GET /api/hang HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${tokens.svc!}\r\n\r\n${pipelined}`);
    await new Promise((r) => setTimeout(r, 300));
    const started = performance.now();
    const exited = serve.stop('SIGTERM');
    const outcome = await Promise.race([exited, new Promise((r) => setTimeout(() => r('still running 15 s after SIGTERM'), 15_000))]);
    expect(outcome).toBe(0);
    expect(performance.now() - started).toBeLessThan(12_000);
    const audit = await readFile(join(dir, 'audit.log'), 'utf8');
    expect(audit).toMatch(/"path":"\/api\/hang","decision":"aborted"/);
  }, 30_000);
});

describe('forward-mode tunnels while draining', () => {
  let serve: ServeProcess | undefined;
  let tlsUpstream: Upstream | undefined;
  afterEach(async () => {
    serve?.child.kill('SIGKILL');
    serve = undefined;
    await tlsUpstream?.close();
    tlsUpstream = undefined;
  });

  /** `serve` in forward mode for api.bank.test (also reverse mode under /bank), its upstream slow on /slow. */
  async function forwardServe(): Promise<{ port: number; proxyAuthorization: string; token: string; caPem: string; dir: string }> {
    const pki = makeTestPki();
    tlsUpstream = await startUpstream((req, res) => void setTimeout(() => res.end('tunnel ok'), req.url === '/slow' ? 800 : 0), { key: pki.serverKey, cert: pki.serverCert });
    const dir = await makeTempDir('egress-drain-tunnel-');
    const route = `name: bank\nprefix: /bank\nupstream: ${tlsUpstream.url}\nupstream_ca: ./server-ca.pem\nallow_private_addresses: true\nhosts: [api.bank.test]\ncredential: key\ninject:\n  scheme: headers\n  headers:\n    X-Api-Key: "{secret}"\nallow:\n  - caller: svc\n    methods: [GET]\n    paths: [/fast, /slow]\n`;
    const { tokens } = await seedDataDir(dir, { routes: { bank: route }, files: { 'server-ca.pem': pki.caCert }, credentials: { key: { secret: 'sk_drain_tunnel_1234' } }, callers: ['svc'] });
    const env = envFor(dir, { EGRESS_CERTS: join(dir, 'certs') });
    expect((await runCli(['certs', 'init'], env)).code).toBe(0);
    const caPem = await readFile(join(dir, 'certs', 'ca.pem'), 'utf8');
    serve = await startServe(env);
    const proxyAuthorization = `Basic ${Buffer.from(`svc:${tokens.svc!}`).toString('base64')}`;
    return { port: Number(new URL(serve.url).port), proxyAuthorization, token: tokens.svc!, caPem, dir };
  }

  /** A tunnel with one keep-alive TLS connection inside. */
  async function tunnel(): Promise<{ send: (path: string) => Promise<string>; socket: Socket; tls: TLSSocket; dir: string }> {
    const { port, proxyAuthorization, caPem, dir } = await forwardServe();
    const socket = connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    socket.write(`CONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: ${proxyAuthorization}\r\n\r\n`);
    const head = await new Promise<string>((resolve) => socket.once('data', (d: Buffer) => resolve(d.toString('latin1'))));
    expect(head).toMatch(/^HTTP\/1\.1 200/);
    const tls = tlsConnect({ socket, servername: 'api.bank.test', ca: caPem });
    await new Promise<void>((resolve, reject) => tls.once('secureConnect', resolve).once('error', reject));
    tls.on('error', () => {});
    const send = (path: string) => new Promise<string>((resolve) => {
      let buf = '';
      const onData = (d: Buffer) => {
        buf += d.toString();
        const end = buf.indexOf('\r\n\r\n');
        const length = Number(/content-length: (\d+)/i.exec(buf)?.[1] ?? -1);
        if (end !== -1 && length >= 0 && buf.length >= end + 4 + length) {
          tls.off('data', onData);
          resolve(buf);
        }
      };
      tls.on('data', onData);
      tls.write(`GET ${path} HTTP/1.1\r\nHost: api.bank.test\r\n\r\n`);
    });
    return { send, socket, tls, dir };
  }

  it('an idle keep-alive connection inside a tunnel does not hold the drain to its deadline', async () => {
    const t = await tunnel();
    expect(await t.send('/fast')).toMatch(/^HTTP\/1\.1 200[^]*tunnel ok$/);
    const started = performance.now();
    const code = await serve!.stop('SIGTERM');
    expect(code).toBe(0);
    // The drain deadline is 10 s; an idle connection is closed within the drain's sweep.
    expect(performance.now() - started).toBeLessThan(3_000);
    await new Promise<void>((resolve) => (t.socket.destroyed ? resolve() : t.socket.once('close', () => resolve())));
  }, 30_000);

  it('a request in flight inside a tunnel is answered before the process exits, and its audit line is written', async () => {
    const t = await tunnel();
    expect(await t.send('/fast')).toMatch(/tunnel ok$/);
    const answer = t.send('/slow');
    await new Promise((r) => setTimeout(r, 200));
    const started = performance.now();
    const exited = serve!.stop('SIGTERM');
    expect(await answer).toMatch(/^HTTP\/1\.1 200[^]*tunnel ok$/);
    expect(await exited).toBe(0);
    // Once answered, the connection is idle and closed: the exit does not wait for the deadline.
    expect(performance.now() - started).toBeLessThan(3_000);
    expect(await readFile(join(t.dir, 'audit.log'), 'utf8')).toContain("/slow");
  }, 30_000);

  it('a CONNECT that arrives during the drain (pipelined behind a request in flight) is refused with 503, not answered 200 and then cut', async () => {
    const { port, proxyAuthorization, token } = await forwardServe();
    const socket = connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    let received = '';
    socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
    socket.on('error', () => {});
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    socket.write(`GET /bank/slow HTTP/1.1\r\nHost: proxy\r\nX-Egress-Token: ${token}\r\n\r\nCONNECT api.bank.test:443 HTTP/1.1\r\nHost: api.bank.test:443\r\nProxy-Authorization: ${proxyAuthorization}\r\n\r\n`);
    await new Promise((r) => setTimeout(r, 200));
    const exited = serve!.stop('SIGTERM');
    await closed;
    expect(await exited).toBe(0);
    const answers = received.split(/(?=HTTP\/1\.1 )/);
    expect(answers[0]).toMatch(/^HTTP\/1\.1 200[^]*tunnel ok$/);
    expect(answers.length, received).toBe(2);
    expect(answers[1]).toMatch(/^HTTP\/1\.1 503 /);
    expect(answers[1]).toMatch(/x-egress-error: shutting_down/i);
    expect(answers[1]).toMatch(/connection: close/i);
  }, 30_000);
});
