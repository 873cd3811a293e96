/**
 * Hostile and malformed input against an in-process NbdServer: each bad client is dropped (or gets an error
 * reply) while a well-behaved client, connected before and kept open throughout, goes on being served.
 */
import { join } from 'node:path';
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, CMD_FLAG, ERR, INFO, OPT, REP, TF, encodeOptionHeader } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, assemble, closesWithin } from './helpers.js';

const dir = tempDir('kscinc-nbd-hostile-');
const SIZE = 8 << 20;
let rw: BlockDevice;
let ro: BlockDevice;
let server: NbdServer;
let port: number;
let good: RawClient;
const pattern = Buffer.alloc(65536, 0x5a);
const logs: string[] = [];

beforeAll(async () => {
  await createImage(join(dir, 'rw.ksc'), { size: SIZE });
  await createImage(join(dir, 'ro.ksc'), { size: SIZE });
  rw = await openImage(join(dir, 'rw.ksc'), { write: true });
  ro = await openImage(join(dir, 'ro.ksc'), { write: false });
  await rw.write(0, pattern);
  server = new NbdServer({ exports: { rw: { device: rw }, ro: { device: ro, readOnly: true } }, log: (l) => logs.push(l), handshakeTimeoutMs: 1500, stallTimeoutMs: 1500 });
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  port = (a as { port: number }).port;
  good = await RawClient.connect(port);
  await good.handshake('rw');
});

afterAll(async () => {
  good?.socket.destroy();
  await server?.close();
  await rw?.close();
  await ro?.close();
});

/** The well-behaved client still gets correct data. */
async function goodStillWorks(): Promise<void> {
  const r = await good.read(0, 65536, 99n);
  expect(r.error).toBe(0);
  expect(r.data.equals(pattern)).toBe(true);
}

describe('NBD server against hostile clients', () => {
  it('garbage instead of client flags / options: that client is dropped', async () => {
    const c = await RawClient.connect(port);
    await c.greeting();
    c.socket.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    expect(await closesWithin(c, 3000)).toBe(true);
    await goodStillWorks();

    const d = await RawClient.connect(port);
    await d.greeting();
    const f = Buffer.alloc(4);
    f.writeUInt32BE(3);
    d.socket.write(f);
    d.socket.write(Buffer.alloc(64, 0xee)); // option header with a bad IHAVEOPT magic
    expect(await closesWithin(d, 3000)).toBe(true);
    await goodStillWorks();

    const e = await RawClient.connect(port);
    await e.greeting();
    e.socket.write(Buffer.from([0, 0, 0, 0x83])); // unknown client flag bit
    expect(await closesWithin(e, 3000)).toBe(true);

    const g = await RawClient.connect(port);
    await g.greeting();
    g.socket.write(Buffer.from([0, 0, 0, 3]));
    g.socket.write(encodeOptionHeader(OPT.GO, 1 << 30)); // announces 1 GiB of option data
    expect(await closesWithin(g, 3000)).toBe(true);
    await goodStillWorks();
  });

  it('an unknown option gets ERR_UNSUP and negotiation continues; unknown export gets ERR_UNKNOWN', async () => {
    const c = await RawClient.connect(port);
    await c.greeting();
    const f = Buffer.alloc(4);
    f.writeUInt32BE(3);
    c.socket.write(f);
    const r = await c.option(0x4242, Buffer.from('junk'));
    expect(r[0]!.type).toBe(REP.ERR_UNSUP);
    const s = await c.option(OPT.STARTTLS);
    expect(s[0]!.type).toBe(REP.ERR_UNSUP);
    const go = Buffer.alloc(4 + 4 + 2);
    go.writeUInt32BE(4, 0);
    go.write('nope', 4);
    const g = await c.option(OPT.GO, go);
    expect(g[0]!.type).toBe(REP.ERR_UNKNOWN);
    const bad = await c.option(OPT.GO, Buffer.from([0, 0, 0, 200])); // name length past the data
    expect(bad[0]!.type).toBe(REP.ERR_INVALID);
    const list = await c.option(OPT.LIST);
    expect(list.filter((x) => x.type === REP.SERVER)).toHaveLength(2);
    const ab = await c.option(OPT.ABORT);
    expect(ab[0]!.type).toBe(REP.ACK);
    expect(await closesWithin(c, 3000)).toBe(true);
  });

  it('a request with a bad magic: dropped', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('rw');
    const h = Buffer.alloc(28, 0);
    h.writeUInt32BE(0xdeadbeef, 0);
    c.socket.write(h);
    expect(await closesWithin(c, 3000)).toBe(true);
    await goodStillWorks();
  });

  it('an out-of-range read gets EINVAL and the connection keeps working; a write past the end gets ENOSPC', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('rw');
    const r = await c.read(SIZE - 512, 4096, 1n);
    expect(r.error).toBe(ERR.EINVAL);
    c.send(CMD.READ, 2n, 2n ** 63n, 512);
    expect((await c.reply()).error).toBe(ERR.EINVAL);
    c.send(CMD.READ, 3n, 0, (32 << 20) + 1); // above the payload cap
    expect((await c.reply()).error).toBe(ERR.EINVAL);
    c.send(CMD.WRITE, 4n, SIZE - 512, 1024, 0, Buffer.alloc(1024, 1));
    expect((await c.reply()).error).toBe(ERR.ENOSPC);
    c.send(CMD.WRITE_ZEROES, 5n, SIZE, 4096);
    expect((await c.reply()).error).toBe(ERR.ENOSPC);
    c.send(42, 6n, 0, 0);
    expect((await c.reply()).error).toBe(ERR.EINVAL);
    c.send(CMD.READ, 7n, 0, 512, 0x100); // unknown flag
    expect((await c.reply()).error).toBe(ERR.EINVAL);
    const ok = await c.read(0, 65536, 8n);
    expect(ok.error).toBe(0);
    expect(ok.data.equals(pattern)).toBe(true);
    c.disc();
    expect(await closesWithin(c, 3000)).toBe(true);
  });

  it('writes, trims and zeroes on a read-only export get EPERM; reads work', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('ro');
    c.send(CMD.WRITE, 1n, 0, 512, 0, Buffer.alloc(512, 1));
    expect((await c.reply()).error).toBe(ERR.EPERM);
    c.send(CMD.TRIM, 2n, 0, 65536);
    expect((await c.reply()).error).toBe(ERR.EPERM);
    c.send(CMD.WRITE_ZEROES, 3n, 0, 65536);
    expect((await c.reply()).error).toBe(ERR.EPERM);
    c.send(CMD.FLUSH, 4n, 0, 0);
    expect((await c.reply()).error).toBe(0);
    const r = await c.read(0, 4096, 5n);
    expect(r.error).toBe(0);
    expect(r.data.equals(Buffer.alloc(4096))).toBe(true);
    c.disc();
    expect(await closesWithin(c, 3000)).toBe(true);
  });

  it('a client that disconnects mid-payload, and one that announces a too-large payload, are dropped', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('rw');
    c.send(CMD.WRITE, 1n, 1 << 20, 1 << 20, 0, Buffer.alloc(1000, 0x77)); // header + 1000 of 1 MiB
    await new Promise((r) => setTimeout(r, 50));
    c.socket.destroy();
    await goodStillWorks();
    // Nothing of the partial write reached the image.
    const r = await good.read(1 << 20, 4096, 100n);
    expect(r.data.equals(Buffer.alloc(4096))).toBe(true);

    const d = await RawClient.connect(port);
    await d.handshake('rw');
    d.send(CMD.WRITE, 1n, 0, (32 << 20) + 512);
    expect(await closesWithin(d, 3000)).toBe(true);
    await goodStillWorks();
  });

  it('a client silent in the handshake, and one that stalls mid-payload, are dropped after the timeouts', async () => {
    const silent = await RawClient.connect(port);
    await silent.greeting(); // then says nothing
    const half = await RawClient.connect(port);
    await half.greeting();
    half.socket.write(Buffer.from([0, 0, 0, 1])); // client flags, then nothing
    const stall = await RawClient.connect(port);
    await stall.handshake('rw');
    stall.send(CMD.WRITE, 7n, 2 << 20, 65536, 0, Buffer.alloc(100, 0x66)); // 100 of 65536 payload bytes, then nothing
    const t0 = Date.now();
    // Not dropped early (a slow client gets its time), dropped soon after the 1.5 s timeouts.
    expect(await closesWithin(silent, 1000)).toBe(false);
    expect(await closesWithin(silent, 4000)).toBe(true);
    expect(await closesWithin(half, 4000)).toBe(true);
    expect(await closesWithin(stall, 4000)).toBe(true);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1400);
    expect(logs.some((l) => /handshake not completed within 1500 ms/.test(l))).toBe(true);
    expect(logs.some((l) => /write payload of 65536 bytes: no byte received for 1500 ms/.test(l))).toBe(true);
    await goodStillWorks(); // the good client, idle all along, is not affected
    const r = await good.read(2 << 20, 4096, 101n);
    expect(r.data.equals(Buffer.alloc(4096))).toBe(true);
  });

  it('many requests in flight: every reply matches its cookie and chunks never interleave', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('rw');
    const N = 64;
    const blocks = Array.from({ length: N }, (_, i) => Buffer.alloc(32768, i + 1));
    for (let i = 0; i < N; i++) c.send(CMD.WRITE, BigInt(1000 + i), (2 << 20) + i * 32768, 32768, i % 2 ? CMD_FLAG.FUA : 0, blocks[i]);
    const seen = new Set<bigint>();
    for (let i = 0; i < N; i++) {
      const r = await c.reply();
      expect(r.error).toBe(0);
      seen.add(r.cookie);
    }
    expect(seen.size).toBe(N);
    for (let i = 0; i < N; i++) c.send(CMD.READ, BigInt(i), (2 << 20) + i * 32768, 32768);
    for (let i = 0; i < N; i++) {
      const r = await c.reply();
      const k = Number(r.cookie);
      expect(assemble(r, (2 << 20) + k * 32768, 32768).equals(blocks[k]!)).toBe(true);
    }
    c.disc();
    await goodStillWorks();
  });

  it('without structured replies, reads use simple replies (kernel-client path); block status is refused', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('rw', false);
    c.send(CMD.READ, 5n, 0, 4096);
    const r = await c.reply(4096);
    expect(r.chunks).toBeUndefined();
    expect(r.data!.equals(pattern.subarray(0, 4096))).toBe(true);
    c.send(CMD.BLOCK_STATUS, 6n, 0, 4096);
    expect((await c.reply()).error).toBe(ERR.EINVAL);
    c.disc();
    expect(await closesWithin(c, 3000)).toBe(true);
  });

  it('EXPORT_NAME (old clients) enters transmission; INFO answers without leaving negotiation', async () => {
    const c = await RawClient.connect(port);
    await c.greeting();
    const f = Buffer.alloc(4);
    f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    c.socket.write(f);
    const info = Buffer.alloc(4 + 2 + 2 + 4);
    info.writeUInt32BE(2, 0);
    info.write('ro', 4);
    info.writeUInt16BE(2, 6);
    info.writeUInt16BE(INFO.NAME, 8);
    info.writeUInt16BE(INFO.BLOCK_SIZE, 10);
    const r = await c.option(OPT.INFO, info);
    expect(r.map((x) => x.type)).toEqual([REP.INFO, REP.INFO, REP.INFO, REP.ACK]);
    expect(r[0]!.data.readUInt16BE(0)).toBe(INFO.EXPORT);
    expect(Number(r[0]!.data.readBigUInt64BE(2))).toBe(SIZE);
    const flags = r[0]!.data.readUInt16BE(10);
    expect(flags & TF.READ_ONLY).toBe(TF.READ_ONLY);
    expect(flags & (TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FUA | TF.SEND_DF)).toBe(0);
    expect(r[1]!.data.subarray(2).toString()).toBe('ro');
    expect([r[2]!.data.readUInt32BE(2), r[2]!.data.readUInt32BE(6), r[2]!.data.readUInt32BE(10)]).toEqual([1, 65536, 32 << 20]);
    c.socket.write(Buffer.concat([encodeOptionHeader(OPT.EXPORT_NAME, 2), Buffer.from('rw')]));
    const reply = await c.reader.read(10); // NO_ZEROES: no padding
    expect(Number(reply.readBigUInt64BE(0))).toBe(SIZE);
    expect(reply.readUInt16BE(8) & TF.READ_ONLY).toBe(0);
    const d = await c.read(0, 4096, 3n); // simple replies: no STRUCTURED_REPLY was negotiated
    expect(d.data.equals(pattern.subarray(0, 4096))).toBe(true);
    c.disc();
    expect(await closesWithin(c, 3000)).toBe(true);
  });

  it('block status: contexts set by SET_META_CONTEXT, REQ_ONE gives one extent per context', async () => {
    const c = await RawClient.connect(port);
    await c.greeting();
    const f = Buffer.alloc(4);
    f.writeUInt32BE(3);
    c.socket.write(f);
    expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
    c.structured = true;
    const queries = ['base:allocation', 'qemu:allocation-depth', 'nope:x'];
    const parts: Buffer[] = [Buffer.from([0, 0, 0, 2]), Buffer.from('rw'), Buffer.alloc(4)];
    parts[2]!.writeUInt32BE(queries.length);
    for (const q of queries) {
      const l = Buffer.alloc(4);
      l.writeUInt32BE(q.length);
      parts.push(l, Buffer.from(q));
    }
    const set = await c.option(OPT.SET_META_CONTEXT, Buffer.concat(parts));
    expect(set.map((x) => x.type)).toEqual([REP.META_CONTEXT, REP.META_CONTEXT, REP.ACK]);
    const ids = set.slice(0, 2).map((x) => ({ id: x.data.readUInt32BE(0), name: x.data.subarray(4).toString() }));
    expect(ids.map((x) => x.name)).toEqual(['base:allocation', 'qemu:allocation-depth']);
    const go = Buffer.alloc(4 + 2 + 2);
    go.writeUInt32BE(2, 0);
    go.write('rw', 4);
    expect((await c.option(OPT.GO, go)).pop()!.type).toBe(REP.ACK);

    c.send(CMD.BLOCK_STATUS, 1n, 0, SIZE);
    const all = await c.reply();
    expect(all.error).toBe(0);
    expect(all.chunks!.map((x) => x.type)).toEqual([5, 5]);
    expect(all.chunks![1]!.flags & 1).toBe(1);
    const alloc = all.chunks!.find((x) => x.payload.readUInt32BE(0) === ids[0]!.id)!.payload;
    // 64 KiB written at 0 (and more by other tests further on): first extent is data.
    expect(alloc.readUInt32BE(8)).toBe(0);
    let total = 0;
    for (let o = 4; o < alloc.length; o += 8) total += alloc.readUInt32BE(o);
    expect(total).toBe(SIZE);
    expect(alloc.length).toBeGreaterThan(12); // several extents without REQ_ONE

    c.send(CMD.BLOCK_STATUS, 2n, 0, SIZE, CMD_FLAG.REQ_ONE);
    const one = await c.reply();
    expect(one.chunks).toHaveLength(2);
    for (const ch of one.chunks!) {
      expect(ch.payload.length).toBe(12);
      expect(ch.payload.readUInt32BE(4)).toBeLessThanOrEqual(SIZE);
      expect(ch.payload.readUInt32BE(4)).toBeGreaterThan(0);
    }
    c.send(CMD.BLOCK_STATUS, 3n, SIZE, 512);
    expect((await c.reply()).error).toBe(ERR.EINVAL);
    c.disc();
    expect(await closesWithin(c, 3000)).toBe(true);
  });

  it('close() finishes the requests in flight before closing the connection', async () => {
    await createImage(join(dir, 'drain.ksc'), { size: SIZE });
    const dev = await openImage(join(dir, 'drain.ksc'), { write: true });
    // Writes take 200 ms, so they are surely still running when close() is called.
    const slow: BlockDevice = {
      name: dev.name,
      format: dev.format,
      size: dev.size,
      blockSize: dev.blockSize,
      readOnly: false,
      read: (o, l) => dev.read(o, l),
      readInto: (o, t) => dev.readInto(o, t),
      write: async (o, d, opts) => {
        await new Promise((r) => setTimeout(r, 200));
        await dev.write(o, d, opts);
      },
      writeZeroes: (o, l, opts) => dev.writeZeroes(o, l, opts),
      discard: (o, l, opts) => dev.discard(o, l, opts),
      flush: () => dev.flush(),
      extents: (o, l) => dev.extents(o, l),
      close: () => dev.close(),
    };
    const srv = new NbdServer({ exports: { '': { device: slow } } });
    const a = (await srv.listen({ host: '127.0.0.1', port: 0 })) as { port: number };
    const c = await RawClient.connect(a.port);
    await c.handshake('');
    const N = 16;
    for (let i = 0; i < N; i++) c.send(CMD.WRITE, BigInt(i), i * 65536, 65536, 0, Buffer.alloc(65536, i + 1));
    // Wait until the server has read them all, then close while they are still running.
    await new Promise((r) => setTimeout(r, 50));
    const closing = srv.close();
    let closed = false;
    void closing.then(() => (closed = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(closed).toBe(false);
    const got: bigint[] = [];
    for (let i = 0; i < N; i++) {
      const r = await c.reply();
      expect(r.error).toBe(0);
      got.push(r.cookie);
    }
    await closing;
    expect(await closesWithin(c, 3000)).toBe(true);
    expect(got.length).toBe(N);
    await dev.close();
    const check = await openImage(join(dir, 'drain.ksc'));
    for (let i = 0; i < N; i++) expect((await check.read(i * 65536, 65536)).equals(Buffer.alloc(65536, i + 1))).toBe(true);
    await check.close();
  });
});
