/**
 * Zero-copy READ replies (src/nbd/zerocopy.ts): with the addon, large READs of a raw file and of a ksc_inc
 * overlay (own clusters, backing, zeros, a copied-on-write block) go out by sendfile; a client that reads
 * late fills the socket, so replies go out in part and their rest follows before any other reply. Every
 * byte is checked against a model. Without the addon (KSCINC_NO_NATIVE=1) the same reads go the ordinary
 * way and no reply is counted as zero-copy.
 */
import { closeSync, openSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { nativeOps } from '../../src/io/native.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD } from '../../src/nbd/wire.js';
import { zeroCopyStats } from '../../src/nbd/zerocopy.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, assemble } from './helpers.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const B = 64 * 1024;
const dir = tempDir('kscinc-zc-');
const seed = seedFor('test/nbd/zerocopy.test.ts');
const rng = new Rng(seed);
/** The addon sends zero-copy here (it has the functions and the kernel has cachestat). */
let native = false;

const base = Buffer.alloc(SIZE);
const top = Buffer.alloc(SIZE);
const devs: BlockDevice[] = [];
let server: NbdServer;
let port = 0;

beforeAll(async () => {
  // The raw base: data in 1 MiB pieces with some holes left (never written).
  const rawPath = join(dir, 'base.raw');
  const fd = openSync(rawPath, 'w');
  truncateSync(rawPath, SIZE);
  for (let o = 0; o < SIZE; o += MiB) {
    if (rng.chance(0.25)) continue;
    rng.bytes(MiB).copy(base, o);
    writeSync(fd, base, o, MiB, o);
  }
  const ops = nativeOps();
  native = !!ops?.sendFile && !!ops.cachedRange && ops.cachedRange(fd, 0, 4096) !== -2;
  closeSync(fd);
  base.copy(top);
  // The overlay: 10% of its blocks rewritten, a few zeroed, one 4 KiB write inside a backing block.
  const ovPath = join(dir, 'top.ksc');
  await createImage(ovPath, { size: SIZE, backing: rawPath, blockSize: B });
  const ov = await openImage(ovPath, { write: true });
  for (let b = 0; b < SIZE / B; b++) {
    if (rng.chance(0.1)) {
      const d = rng.bytes(B);
      await ov.write(b * B, d);
      d.copy(top, b * B);
    } else if (rng.chance(0.03)) {
      await ov.writeZeroes(b * B, B);
      top.fill(0, b * B, (b + 1) * B);
    }
  }
  const small = rng.bytes(4096);
  await ov.write(5 * B + 8192, small);
  small.copy(top, 5 * B + 8192);
  await ov.flush();
  console.log(`[test/nbd/zerocopy.test.ts] zero-copy sends: ${native}`);
  devs.push(await openImage(rawPath, { write: false }), ov);
  server = new NbdServer({ exports: { raw: { device: devs[0]!, readOnly: true }, top: { device: ov } } });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
}, 60_000);

afterAll(async () => {
  await server?.close();
  for (const d of devs) await d.close();
});

/** `n` random READs' ranges, a fifth of them small (< 64 KiB: never zero-copy) when `small`. */
function ranges(n: number, small: boolean): { offset: number; length: number }[] {
  return Array.from({ length: n }, () => {
    const length = small && rng.chance(0.2) ? rng.int(1, 64 * 1024) : rng.int(64 * 1024, 2 * MiB);
    return { offset: rng.int(0, SIZE - length), length };
  });
}

/**
 * READs of `asked`, all at once (`atOnce`; else one at a time, each reply read whole before the next is
 * sent), each checked against `model`; returns how many replies went zero-copy.
 */
async function readsMatch(name: string, model: Buffer, asked: { offset: number; length: number }[], atOnce = true): Promise<number> {
  const c = await RawClient.connect(port);
  await c.handshake(name, true);
  const before = zeroCopyStats.whole + zeroCopyStats.partial;
  const ask = (i: number): void => c.send(CMD.READ, BigInt(i + 1), asked[i]!.offset, asked[i]!.length);
  if (atOnce) for (let i = 0; i < asked.length; i++) ask(i);
  for (let i = 0; i < asked.length; i++) {
    if (!atOnce) ask(i);
    const r = await c.reply();
    const q = asked[Number(r.cookie) - 1]!;
    expect(r.error).toBe(0);
    expect(assemble(r, q.offset, q.length).equals(model.subarray(q.offset, q.offset + q.length))).toBe(true);
  }
  c.disc();
  await c.closed;
  return zeroCopyStats.whole + zeroCopyStats.partial - before;
}

describe('NBD zero-copy READ replies', () => {
  it('large READs of a raw file and of a ksc_inc overlay arrive byte-exact (structured replies)', async () => {
    // Pipelined: a reply finding the socket's buffer full (the client reads late; a loaded machine) goes the
    // ordinary way, so how many go zero-copy depends on timing (ci22 at load 18: 19 of 80). One at a time,
    // a large READ with data, of ranges already read once (in the page cache, the map page in memory), finds
    // the socket empty and must go zero-copy, every one.
    const piped = (await readsMatch('raw', base, ranges(40, true))) + (await readsMatch('top', top, ranges(40, true)));
    let single = 0;
    for (const [name, model] of [
      ['raw', base],
      ['top', top],
    ] as const) {
      // Ranges that begin in data (a READ of holes and zeros only is answered with hole chunks: no data to send).
      const r: { offset: number; length: number }[] = [];
      while (r.length < 8) for (const q of ranges(1, false)) if (model.subarray(q.offset, q.offset + 4096).some((b) => b !== 0)) r.push(q);
      await readsMatch(name, model, r, false);
      single += await readsMatch(name, model, r, false);
    }
    if (native) expect([piped > 0, single]).toEqual([true, 16]);
    else expect([piped, single]).toEqual([0, 0]);
  }, 60_000);

  it('a client that reads late fills the socket: replies sent in part complete before any other, in whole', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('top', true);
    const partial0 = zeroCopyStats.partial;
    const asked = new Map<bigint, { offset: number; length: number }>();
    c.socket.pause(); // read nothing for a while: the server's send buffer fills up
    for (let i = 0; i < 48; i++) {
      const length = i % 3 === 2 ? 4096 : MiB + rng.int(0, 64 * 1024);
      const offset = rng.int(0, SIZE - length);
      asked.set(BigInt(i + 1), { offset, length });
      c.send(CMD.READ, BigInt(i + 1), offset, length);
    }
    await new Promise((r) => setTimeout(r, 500));
    c.socket.resume();
    for (let i = 0; i < 48; i++) {
      const r = await c.reply();
      const q = asked.get(r.cookie)!;
      expect(r.error).toBe(0);
      expect(assemble(r, q.offset, q.length).equals(top.subarray(q.offset, q.offset + q.length))).toBe(true);
      asked.delete(r.cookie);
    }
    expect(asked.size).toBe(0);
    if (native) expect(zeroCopyStats.partial).toBeGreaterThan(partial0);
    else expect(zeroCopyStats.partial).toBe(partial0);
    c.disc();
    await c.closed;
  }, 60_000);

  it('simple replies (no structured replies negotiated) too', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('top', false);
    for (let i = 0; i < 10; i++) {
      const length = rng.int(64 * 1024, MiB);
      const offset = rng.int(0, SIZE - length);
      const r = await c.read(offset, length, BigInt(100 + i));
      expect(r.error).toBe(0);
      expect(r.data.equals(top.subarray(offset, offset + length))).toBe(true);
    }
    c.disc();
    await c.closed;
  }, 60_000);
});
