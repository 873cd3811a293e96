/**
 * NBD TLS limits and edge cases on an in-process server (formats/nbd.md §5.1, §5.5): a client silent after
 * the STARTTLS ACK is cut by the handshake timeout; garbage instead of a TLS ClientHello, or bytes sent after
 * STARTTLS before its reply, end the connection; inside TLS the negotiation starts over and STARTTLS again is
 * ERR_INVALID; a handover (park) closes a TLS connection after answering what it read instead of parking it.
 * A well-behaved TLS client keeps being served throughout.
 */
import * as net from 'node:net';
import * as tls from 'node:tls';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdClient } from '../../src/nbd/client.js';
import { loadClientTls } from '../../src/nbd/client-tls.js';
import { SocketReader } from '../../src/nbd/reader.js';
import { NbdServer } from '../../src/nbd/server.js';
import { loadServerTls } from '../../src/nbd/tls.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, OPT, OPT_REPLY_MAGIC, REP, encodeOptionHeader } from '../../src/nbd/wire.js';
import { makePki, type Pki } from '../helpers/pki.js';
import { tempDir } from '../helpers/tmp.js';
import { goData } from './helpers.js';

const SIZE = 8 << 20;
let pki: Pki;
let dev: BlockDevice;
let server: NbdServer;
let port: number;
const logs: string[] = [];

beforeAll(async () => {
  pki = makePki();
  const dir = tempDir('kscinc-tls-limits-');
  await createImage(join(dir, 'a.ksc'), { size: SIZE });
  dev = await openImage(join(dir, 'a.ksc'), { write: true });
  await dev.write(0, Buffer.alloc(65536, 0x3c));
  const cfg = loadServerTls({ cert: join(pki.x509, 'server-cert.pem'), key: join(pki.x509, 'server-key.pem'), ca: join(pki.x509, 'ca-cert.pem') });
  server = new NbdServer({ exports: { a: { device: dev } }, log: (l) => logs.push(l), handshakeTimeoutMs: 1500, tls: cfg });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
}, 60_000);

afterAll(async () => {
  await server?.close();
  await dev?.close();
});

/** A plain socket past the greeting and client flags, and a reader on it. */
async function plain(): Promise<{ s: net.Socket; r: SocketReader; closed: Promise<void> }> {
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => {});
  const closed = new Promise<void>((res) => s.once('close', () => res()));
  await new Promise((res) => s.once('connect', res));
  const r = new SocketReader(s);
  await r.read(18);
  const f = Buffer.alloc(4);
  f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE);
  s.write(f);
  return { s, r, closed };
}

async function optionReply(r: SocketReader): Promise<{ opt: number; type: number; data: Buffer }> {
  const h = await r.read(20);
  expect(h.readBigUInt64BE(0)).toBe(OPT_REPLY_MAGIC);
  return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await r.read(h.readUInt32BE(16)) };
}

const within = (p: Promise<unknown>, ms: number): Promise<boolean> => Promise.race([p.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);

async function goodClientReads(): Promise<void> {
  const c = await NbdClient.connect({ port, exportName: 'a', tls: loadClientTls({ creds: pki.x509 }) });
  expect((await c.read(0, 65536)).equals(Buffer.alloc(65536, 0x3c))).toBe(true);
  await c.disconnect();
}

describe('NBD TLS limits', () => {
  it('silent after the STARTTLS ACK: cut by the handshake timeout; garbage instead of a ClientHello, or bytes after STARTTLS: cut at once', async () => {
    const t0 = Date.now();
    const a = await plain();
    a.s.write(encodeOptionHeader(OPT.STARTTLS, 0));
    expect((await optionReply(a.r)).type).toBe(REP.ACK);
    expect(await within(a.closed, 10_000)).toBe(true);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1400);
    expect(logs.join('\n')).toMatch(/handshake not completed within 1500 ms/);

    const b = await plain();
    b.s.write(encodeOptionHeader(OPT.STARTTLS, 0));
    expect((await optionReply(b.r)).type).toBe(REP.ACK);
    b.r.release();
    b.s.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    expect(await within(b.closed, 5000)).toBe(true);
    expect(logs.join('\n')).toMatch(/TLS handshake failed/);

    const c = await plain();
    c.s.write(Buffer.concat([encodeOptionHeader(OPT.STARTTLS, 0), Buffer.from([0x16, 3, 1, 0, 5])]));
    expect(await within(c.closed, 5000)).toBe(true);
    expect(logs.join('\n')).toMatch(/sent bytes after STARTTLS before its reply/);
    await goodClientReads();
  }, 60_000);

  it('inside TLS the negotiation starts over: STARTTLS again is ERR_INVALID, then GO works', async () => {
    const p = await plain();
    p.s.write(encodeOptionHeader(OPT.STRUCTURED_REPLY, 0));
    expect((await optionReply(p.r)).type).toBe(REP.ERR_TLS_REQD); // nothing is negotiated in plain
    p.s.write(encodeOptionHeader(OPT.STARTTLS, 0));
    expect((await optionReply(p.r)).type).toBe(REP.ACK);
    p.r.release();
    const x = pki.x509;
    const t = tls.connect({
      socket: p.s,
      ca: readFileSync(join(x, 'ca-cert.pem')),
      cert: readFileSync(join(x, 'client-cert.pem')),
      key: readFileSync(join(x, 'client-key.pem')),
      checkServerIdentity: () => undefined,
    });
    await new Promise((res, rej) => {
      t.once('secureConnect', res);
      t.once('error', rej);
    });
    const r = new SocketReader(t);
    t.write(encodeOptionHeader(OPT.STARTTLS, 0));
    expect((await optionReply(r)).type).toBe(REP.ERR_INVALID);
    const go = goData('a');
    t.write(Buffer.concat([encodeOptionHeader(OPT.GO, go.length), go]));
    const types: number[] = [];
    for (let rep = await optionReply(r); ; rep = await optionReply(r)) {
      types.push(rep.type);
      if (rep.type === REP.ACK || rep.type >= 0x80000000) break;
    }
    expect(types[types.length - 1]).toBe(REP.ACK);
    t.destroy();
  }, 30_000);

  it('a handover (park) answers what a TLS connection read, then closes it instead of parking it', async () => {
    const c = await NbdClient.connect({ port, exportName: 'a', tls: loadClientTls({ creds: pki.x509 }) });
    const pending = [c.write(65536, Buffer.alloc(65536, 0x11)), c.read(0, 65536)];
    // Settled from the start: the client fails its requests when the server's end arrives, which may come
    // before park() returns (the server reads the client's bytes until its end before it closes: no RST).
    const settling = Promise.allSettled(pending);
    const parked = await server.park();
    expect(parked).toEqual([]);
    const settled = await settling;
    // What the server read before the handover was answered; a request still on the wire fails with the
    // close (QEMU re-sends it after reconnecting); nothing hangs.
    for (const s of settled) if (s.status === 'rejected') expect(String(s.reason)).toMatch(/closed|EPIPE|ECONNRESET/);
    if (settled[1]!.status === 'fulfilled') expect(settled[1]!.value!.equals(Buffer.alloc(65536, 0x3c))).toBe(true);
    await expect(c.read(0, 4096)).rejects.toThrow(/closed|EPIPE|ECONNRESET/);
    expect(logs.join('\n')).toMatch(/a TLS session cannot move to another process: closed at the handover/);
    c.destroy();
  }, 30_000);
});
