/**
 * NBD TLS (formats/nbd.md §5) with real peers: qemu-img, qemu-io (tls-creds-x509 / tls-creds-psk objects) and
 * nbdinfo (nbds:// URIs) against `kscinc serve --tls-*`; our own client too. Refusals: a plain client, a
 * client certificate of another CA, a server certificate the client does not trust, a wrong PSK key, an
 * unknown PSK identity, the raw-protocol rules before STARTTLS, and the CLI's checks before binding.
 */
import * as tls from 'node:tls';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { loadClientTls } from '../../src/nbd/client-tls.js';
import { OPT, REP } from '../../src/nbd/wire.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE } from '../../src/nbd/wire.js';
import { kscinc, run } from '../helpers/cli.js';
import { qemuTls, x509ServeArgs, type Pki } from '../helpers/pki.js';
import { spawnServe, type ServeChild } from '../helpers/serve.js';
import { SocketReader } from '../../src/nbd/reader.js';
import { encodeOptionHeader } from '../../src/nbd/wire.js';
import { RawClient, closesWithin, goData } from './helpers.js';
import { stopServes, tlsDisk } from './tls-disk.js';

const MiB = 1024 * 1024;
let pki: Pki;
let dir: string;
let img: string;
let images = 0;
const children: ServeChild[] = [];

beforeAll(() => {
  ({ pki, dir, img } = tlsDisk('kscinc-tls-'));
}, 60_000);

afterAll(() => stopServes(children));

/** A copy of the test disk per server: a test that fails with its server still up does not lock the next one out. */
function freshImage(): string {
  const f = join(dir, `disk${++images}.raw`);
  copyFileSync(img, f);
  return f;
}

async function serveTls(args: string[], image = freshImage()): Promise<{ child: ServeChild; port: number; uri: string; image: string }> {
  const child = spawnServe([image, '--listen', '127.0.0.1:0', '--no-supervisor', ...args], { uri: /^nbds?:\/\//, timeoutMs: 30_000 });
  children.push(child);
  const [uri] = await child.uris;
  expect(uri).toMatch(/^nbds:\/\/127\.0\.0\.1:\d+\/$/);
  return { child, port: Number(/:(\d+)\//.exec(uri!)![1]), uri: uri!, image };
}

async function stop(child: ServeChild): Promise<void> {
  child.proc.kill('SIGTERM');
  expect(await child.exited).toBe(0);
}

/** qemu-img/qemu-io over TLS: `tool [--object OBJ] --image-opts OPTS ...`. */
function qemu(tool: 'qemu-img' | 'qemu-io', kind: 'x509' | 'psk', credDir: string, port: number, args: string[], extra = ''): ReturnType<typeof run> {
  const q = qemuTls(kind, credDir, port, extra);
  if (tool === 'qemu-io') return run('qemu-io', ['--object', q.object, '--image-opts', q.opts, ...args]);
  const [sub, ...rest] = args;
  return run('qemu-img', [sub!, '--object', q.object, '--image-opts', q.opts, ...rest]);
}

/** A raw client past the greeting and client flags. */
async function rawClient(port: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.greeting();
  const f = Buffer.alloc(4);
  f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE);
  c.socket.write(f);
  return c;
}

describe('NBD TLS', () => {
  it('X.509: qemu-io writes, qemu-img info/convert and nbdinfo nbds:// read, our client reads; plain clients get TLS required', async () => {
    const { child, port, image } = await serveTls(x509ServeArgs(pki));
    const w = qemu('qemu-io', 'x509', pki.x509, port, ['-c', 'write -P 0x42 1M 64k', '-c', 'read -P 0x42 1M 64k']);
    expect(w.code, w.stderr + w.stdout).toBe(0);
    const info = qemu('qemu-img', 'x509', pki.x509, port, ['info']);
    expect(info.code, info.stderr).toBe(0);
    expect(info.stdout).toMatch(/virtual size: 16 MiB/);
    const out = join(dir, 'x509-copy.raw');
    const conv = qemu('qemu-img', 'x509', pki.x509, port, ['convert', '-O', 'raw', out]);
    expect(conv.code, conv.stderr).toBe(0);
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, out]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    const ni = run('nbdinfo', ['--size', `nbds://127.0.0.1:${port}/?tls-certificates=${pki.x509}`]);
    expect(ni.code, ni.stderr).toBe(0);
    expect(ni.stdout.trim()).toBe(String(16 * MiB));

    const c = await NbdClient.connect({ port, tls: loadClientTls({ creds: pki.x509 }), structured: true });
    expect((await c.read(MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0x42))).toBe(true);
    expect((await c.read(0, 4096)).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    await c.disconnect();

    // Plain clients: QEMU shows the server's message, libnbd fails, ours names it.
    const plain = run('qemu-img', ['info', `nbd://127.0.0.1:${port}`]);
    expect(plain.code).not.toBe(0);
    expect(plain.stderr).toMatch(/server reported: this server requires TLS/);
    expect(run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/`]).code).not.toBe(0);
    await expect(NbdClient.connect({ port })).rejects.toThrow(/error 0x80000005\): this server requires TLS/);
    await stop(child);
    expect(child.stderr()).toMatch(/TLS TLSv1\.3 up \(TLS_\w+\), peer x509:migration-source/);
  }, 120_000);

  it('X.509 refusals: a client certificate of another CA (ERR_POLICY with the reason), a server the client does not trust', async () => {
    const { child, port } = await serveTls(x509ServeArgs(pki));
    const mixed = join(dir, 'mixed');
    mkdirSync(mixed, { recursive: true });
    copyFileSync(join(pki.x509, 'ca-cert.pem'), join(mixed, 'ca-cert.pem'));
    copyFileSync(join(pki.rogue, 'client-cert.pem'), join(mixed, 'client-cert.pem'));
    copyFileSync(join(pki.rogue, 'client-key.pem'), join(mixed, 'client-key.pem'));
    // Our client (QEMU checks its own certificate against its CA first and would not even try).
    await expect(NbdClient.connect({ port, tls: loadClientTls({ creds: mixed }) })).rejects.toMatchObject({
      code: 'KSC_E_PERMISSION',
      message: expect.stringMatching(/TLS client certificate refused \([A-Z_]+\): it must be signed by the server.s --tls-ca/),
    });
    expect(run('nbdinfo', ['--size', `nbds://127.0.0.1:${port}/?tls-certificates=${mixed}`]).code).not.toBe(0);
    // No client certificate at all.
    const noCert = join(dir, 'nocert');
    mkdirSync(noCert, { recursive: true });
    copyFileSync(join(pki.x509, 'ca-cert.pem'), join(noCert, 'ca-cert.pem'));
    await expect(NbdClient.connect({ port, tls: loadClientTls({ creds: noCert }) })).rejects.toThrow(/TLS client certificate refused/);
    // A client that does not trust the server's certificate (the rogue CA): refused on the client side.
    const rogue = qemu('qemu-img', 'x509', pki.rogue, port, ['info']);
    expect(rogue.code).not.toBe(0);
    expect(rogue.stderr).toMatch(/certificate/i);
    await expect(NbdClient.connect({ port, tls: loadClientTls({ creds: pki.rogue }) })).rejects.toThrow(/TLS with NBD server 127\.0\.0\.1:\d+ export "" failed: .*(self.signed|issuer|verify)/i);
    await stop(child);
    expect(child.stderr()).toMatch(/refused: TLS client certificate refused/);
    expect(child.stderr()).toMatch(/TLS handshake failed/);
  }, 120_000);

  it('before STARTTLS: options get ERR_TLS_REQD, EXPORT_NAME, a 17th option or a big one end the connection; STARTTLS with data is invalid', async () => {
    const { child, port } = await serveTls(x509ServeArgs(pki));
    const a = await rawClient(port);
    for (const opt of [OPT.LIST, OPT.INFO, OPT.GO, OPT.STRUCTURED_REPLY, 99]) {
      const r = await a.option(opt, opt === OPT.GO || opt === OPT.INFO ? Buffer.alloc(6) : Buffer.alloc(0));
      expect(r.map((x) => x.type)).toEqual([REP.ERR_TLS_REQD]);
    }
    expect((await a.option(OPT.STARTTLS, Buffer.from('x')))[0]!.type).toBe(REP.ERR_INVALID);
    const ab = await a.option(OPT.ABORT);
    expect(ab[0]!.type).toBe(REP.ACK);
    expect(await closesWithin(a, 5000)).toBe(true);

    const b = await rawClient(port);
    b.socket.write(Buffer.concat([Buffer.from('IHAVEOPT'), Buffer.from([0, 0, 0, 1, 0, 0, 0, 0])]));
    expect(await closesWithin(b, 5000)).toBe(true);

    const c = await rawClient(port);
    for (let i = 0; i < 16; i++) expect((await c.option(OPT.LIST))[0]!.type).toBe(REP.ERR_TLS_REQD);
    c.socket.write(Buffer.concat([Buffer.from('IHAVEOPT'), Buffer.from([0, 0, 0, 3, 0, 0, 0, 0])]));
    expect(await closesWithin(c, 5000)).toBe(true);

    const d = await rawClient(port);
    const big = Buffer.alloc(8);
    big.write('IHAVEOPT');
    d.socket.write(Buffer.concat([big, Buffer.from([0, 0, 0, 3, 0, 0, 0x13, 0x88]), Buffer.alloc(5000)]));
    expect(await closesWithin(d, 5000)).toBe(true);
    await stop(child);
    expect(child.stderr()).toMatch(/EXPORT_NAME without TLS/);
    expect(child.stderr()).toMatch(/17 options before STARTTLS/);
    expect(child.stderr()).toMatch(/an option of 5000 bytes before STARTTLS/);
  }, 60_000);

  it("PSK (QEMU's keys.psk): qemu-img, qemu-io, nbdinfo and our client; a wrong key and an unknown identity refused on both sides", async () => {
    const { child, port } = await serveTls(['--tls-psk', join(pki.psk, 'keys.psk')]);
    const w = qemu('qemu-io', 'psk', pki.psk, port, ['-c', 'write -P 0x77 2M 64k', '-c', 'read -P 0x77 2M 64k']);
    expect(w.code, w.stderr + w.stdout).toBe(0);
    const info = qemu('qemu-img', 'psk', pki.psk, port, ['info']);
    expect(info.code, info.stderr).toBe(0);
    expect(info.stdout).toMatch(/virtual size: 16 MiB/);
    const ni = run('nbdinfo', ['--size', `nbds://qemu@127.0.0.1:${port}/?tls-psk-file=${join(pki.psk, 'keys.psk')}`]);
    expect(ni.code, ni.stderr).toBe(0);
    expect(ni.stdout.trim()).toBe(String(16 * MiB));
    const c = await NbdClient.connect({ port, tls: loadClientTls({ psk: join(pki.psk, 'keys.psk') }) });
    expect((await c.read(2 * MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0x77))).toBe(true);
    await c.disconnect();

    const bad = qemu('qemu-img', 'psk', pki.pskBad, port, ['info']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/TLS/);
    expect(run('nbdinfo', ['--size', `nbds://qemu@127.0.0.1:${port}/?tls-psk-file=${join(pki.pskBad, 'keys.psk')}`]).code).not.toBe(0);
    await expect(NbdClient.connect({ port, tls: loadClientTls({ psk: join(pki.pskBad, 'keys.psk') }) })).rejects.toThrow(/TLS with NBD server .* failed/);
    const unknown = qemu('qemu-img', 'psk', pki.psk2, port, ['info'], ',username=source');
    expect(unknown.code).not.toBe(0);
    expect(unknown.stderr).toMatch(/TLS/);
    await stop(child);
    expect(child.stderr()).toMatch(/peer psk:qemu/);
    expect(child.stderr()).toMatch(/TLS handshake failed: binder does not verify \(the client holds another key for its identity\)/);
    expect(child.stderr().match(/TLS handshake failed/g)!.length).toBeGreaterThanOrEqual(4);
  }, 120_000);

  it('serve: a non-loopback --listen needs TLS or --insecure (refused before binding); bad credentials are named', () => {
    const img = freshImage();
    // 192.0.2.1 (TEST-NET-1) is not an address of this host: even --insecure cannot bind it.
    const r = kscinc(['serve', img, '--listen', '192.0.2.1:10809', '--no-supervisor']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/--listen 192\.0\.2\.1: a non-loopback address needs TLS .* or --insecure/);
    expect(r.stderr).not.toMatch(/cannot listen/);
    const ins = kscinc(['serve', img, '--listen', '192.0.2.1:10809', '--no-supervisor', '--insecure']);
    expect(ins.code).not.toBe(0);
    expect(ins.stderr).toMatch(/cannot listen on 192\.0\.2\.1:10809/); // the rule let it through to bind()
    expect(kscinc(['serve', img, '--tls-cert', join(pki.x509, 'server-cert.pem')]).stderr).toMatch(/needs all of --tls-cert, --tls-key and --tls-ca/);
    expect(kscinc(['serve', img, ...x509ServeArgs(pki), '--tls-psk', join(pki.psk, 'keys.psk')]).stderr).toMatch(/exclusive/);
    const missing = kscinc(['serve', img, '--tls-psk', join(dir, 'nope.psk')]);
    expect(missing.stderr).toMatch(/KSC_E_NOT_FOUND|PSK file .*nope\.psk: cannot read it/);
    const badPsk = join(dir, 'bad.psk');
    writeFileSync(badPsk, '# comment\nqemu:abc\n');
    expect(kscinc(['serve', img, '--tls-psk', badPsk]).stderr).toMatch(/PSK file .*bad\.psk line 2: the key must be an even number/);
    writeFileSync(badPsk, 'qemu 00ff\n');
    expect(kscinc(['serve', img, '--tls-psk', badPsk]).stderr).toMatch(/line 1: expected IDENTITY:HEXKEY/);
    expect(kscinc(['serve', img, '--tls-psk', join(pki.psk, 'keys.psk'), '--insecure']).stderr).toMatch(/contradict/);
    const garbage = join(dir, 'garbage.pem');
    writeFileSync(garbage, 'not a certificate\n');
    expect(kscinc(['serve', img, '--tls-cert', garbage, '--tls-key', join(pki.x509, 'server-key.pem'), '--tls-ca', join(pki.x509, 'ca-cert.pem')]).stderr).toMatch(
      /TLS credentials .*garbage\.pem, .*server-key\.pem, .*ca-cert\.pem: /,
    );
    const mismatch = kscinc(['serve', img, '--tls-cert', join(pki.x509, 'server-cert.pem'), '--tls-key', join(pki.x509, 'client-key.pem'), '--tls-ca', join(pki.x509, 'ca-cert.pem')]);
    expect(mismatch.code).not.toBe(0);
    expect(mismatch.stderr).toMatch(/TLS credentials .*: .*(mismatch|key)/i);
    expect(kscinc(['serve', img, '--incoming-peer', 'x509:a']).stderr).toMatch(/--incoming-peer goes with --incoming and TLS/);
    // The peer's kind must be the server's: an X.509 name on a PSK server (and the reverse) would match nobody.
    const pskServe = ['serve', img, '--incoming', '--tls-psk', join(pki.psk, 'keys.psk')];
    const kindPsk = kscinc([...pskServe, '--incoming-peer', 'x509:migration-source']);
    expect(kindPsk.code).not.toBe(0);
    expect(kindPsk.stderr).toMatch(/--incoming-peer "x509:migration-source": this server uses PSK TLS/);
    expect(kscinc(['serve', img, '--incoming', ...x509ServeArgs(pki), '--incoming-peer', 'psk:source']).stderr).toMatch(/this server uses X\.509 TLS/);
    expect(kscinc(['serve', img, '--incoming', ...x509ServeArgs(pki), '--incoming-peer', 'cn=source']).stderr).toMatch(/expected x509:CN or psk:IDENTITY/);
    // A client credentials folder with a certificate but not its key (or the reverse) is refused up front.
    for (const [has, lacks] of [
      ['client-cert.pem', 'client-key.pem'],
      ['client-key.pem', 'client-cert.pem'],
    ]) {
      const half = join(dir, `half-${lacks}`);
      mkdirSync(half, { recursive: true });
      copyFileSync(join(pki.x509, 'ca-cert.pem'), join(half, 'ca-cert.pem'));
      copyFileSync(join(pki.x509, has), join(half, has));
      expect(() => loadClientTls({ creds: half }), `${has} without ${lacks}`).toThrow(/client-cert\.pem and client-key\.pem go together/);
    }
  }, 60_000);
  it('PSK over TLS 1.2 (a TLS 1.2-only client): the (EC)DHE-PSK AEAD suites work, plain PSK key exchange is refused', async () => {
    const { child, port } = await serveTls(['--tls-psk', join(pki.psk, 'keys.psk')]);
    const [identity, hex] = readFileSync(join(pki.psk, 'keys.psk'), 'utf8').trim().split(':');
    /** STARTTLS, then a TLS 1.2 handshake offering only `ciphers`; resolves with the TLS socket or rejects. */
    const tls12 = async (ciphers: string): Promise<tls.TLSSocket> => {
      const c = await rawClient(port);
      expect((await c.option(OPT.STARTTLS))[0]!.type).toBe(REP.ACK);
      c.reader.release();
      const t = tls.connect({
        socket: c.socket,
        minVersion: 'TLSv1.2',
        maxVersion: 'TLSv1.2',
        ciphers,
        pskCallback: () => ({ identity: identity!, psk: Buffer.from(hex!, 'hex') }),
        checkServerIdentity: () => undefined,
      });
      return new Promise((res, rej) => {
        t.once('secureConnect', () => res(t));
        t.once('error', rej);
      });
    };
    for (const suite of ['ECDHE-PSK-CHACHA20-POLY1305', 'DHE-PSK-AES256-GCM-SHA384']) {
      const t = await tls12(suite);
      expect(t.getProtocol()).toBe('TLSv1.2');
      expect(t.getCipher().name).toBe(suite);
      const r = new SocketReader(t);
      const go = goData('');
      t.write(Buffer.concat([encodeOptionHeader(OPT.GO, go.length), go]));
      let type: number;
      do {
        const h = await r.read(20);
        type = h.readUInt32BE(12);
        await r.read(h.readUInt32BE(16));
      } while (type !== REP.ACK && type < 0x80000000);
      expect(type, suite).toBe(REP.ACK);
      t.destroy();
    }
    // Plain PSK (no DHE/ECDHE): no forward secrecy, not offered (formats/nbd.md §5.3).
    await expect(tls12('PSK-AES128-GCM-SHA256')).rejects.toThrow(/handshake failure|no.*cipher|alert/i);
    await stop(child);
    expect(child.stderr()).toMatch(/TLSv1\.2/);
  }, 60_000);
});
