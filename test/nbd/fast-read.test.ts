/**
 * Small READs answered at once (src/nbd/fast-read.ts): random READs of 1 byte … 40 KiB (around the 32 KiB
 * limit of the path), unaligned, over a raw file with holes at 4 KiB granularity and over a ksc_inc overlay
 * (own clusters, backing, zeroed blocks), structured (with and without DF) and simple replies, every byte
 * checked against a model; a structured reply without DF says holes as OFFSET_HOLE and data as OFFSET_DATA,
 * as formats/nbd.md §2 says. WRITEs pipelined with READs of the same block: a READ sent after a WRITE's reply
 * sees the WRITE; one in flight with it sees the old or the new data. With KSCINC_NO_NATIVE=1 the same reads go
 * the general way (no reply counted as answered at once).
 */
import { closeSync, openSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { nativeOps } from '../../src/io/native.js';
import { fastReadStats } from '../../src/nbd/fast-read.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, CMD_FLAG } from '../../src/nbd/wire.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, assemble } from './helpers.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const B = 64 * 1024;
const dir = tempDir('kscinc-fastread-');
const seed = seedFor('test/nbd/fast-read.test.ts');
const rng = new Rng(seed);
/** The addon has readCachedAt (and KSCINC_NO_NATIVE is not set): small READs may be answered at once. */
const native = !!nativeOps()?.readCachedAt;

const base = Buffer.alloc(SIZE);
const top = Buffer.alloc(SIZE);
const devs: BlockDevice[] = [];
let server: NbdServer;
let port = 0;

beforeAll(async () => {
  // The raw base: 4 KiB pieces of data, about a third of them holes (never written).
  const rawPath = join(dir, 'base.raw');
  const fd = openSync(rawPath, 'w');
  truncateSync(rawPath, SIZE);
  for (let o = 0; o < SIZE; o += 4096) {
    if (rng.chance(0.35)) continue;
    rng.bytes(4096).copy(base, o);
    writeSync(fd, base, o, 4096, o);
  }
  closeSync(fd);
  base.copy(top);
  const ovPath = join(dir, 'top.ksc');
  await createImage(ovPath, { size: SIZE, backing: rawPath, blockSize: B });
  const ov = await openImage(ovPath, { write: true });
  for (let b = 0; b < SIZE / B; b++) {
    if (rng.chance(0.15)) {
      const d = rng.bytes(B);
      await ov.write(b * B, d);
      d.copy(top, b * B);
    } else if (rng.chance(0.05)) {
      await ov.writeZeroes(b * B, B);
      top.fill(0, b * B, (b + 1) * B);
    }
  }
  await ov.flush();
  devs.push(await openImage(rawPath, { write: false }), ov);
  server = new NbdServer({ exports: { raw: { device: devs[0]!, readOnly: true }, top: { device: ov } } });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  console.log(`[test/nbd/fast-read.test.ts] readCachedAt: ${native}`);
}, 60_000);

afterAll(async () => {
  await server?.close();
  for (const d of devs) await d.close();
});

/** Is [offset, offset+length) of the raw base all holes (all data) at 4 KiB granularity? */
function kindOf(offset: number, length: number): 'hole' | 'data' | 'mixed' {
  let holes = 0;
  let data = 0;
  for (let p = Math.floor(offset / 4096) * 4096; p < offset + length; p += 4096) {
    if (base.subarray(p, p + 4096).some((x) => x !== 0)) data++;
    else holes++;
  }
  return data === 0 ? 'hole' : holes === 0 ? 'data' : 'mixed';
}

/** `n` random small READs at once on `name`, each checked against `model`; the replies answered at once. */
async function readsMatch(name: string, model: Buffer, n: number, structured: boolean, flags = 0): Promise<number> {
  const c = await RawClient.connect(port);
  await c.handshake(name, structured);
  const before = fastReadStats.replies;
  const asked = new Map<bigint, { offset: number; length: number }>();
  for (let i = 0; i < n; i++) {
    const r = rng.int(0, 9);
    const length = r === 0 ? rng.int(1, 600) : r < 7 ? 4096 : rng.int(28 * 1024, 40 * 1024);
    const offset = r < 7 && r > 0 && rng.chance(0.7) ? rng.int(0, SIZE / 4096 - 1) * 4096 : rng.int(0, SIZE - length);
    asked.set(BigInt(i + 1), { offset, length });
    c.send(CMD.READ, BigInt(i + 1), offset, length, flags);
  }
  for (let i = 0; i < n; i++) {
    const cookie = structured ? undefined : BigInt(i + 1);
    const r = await c.reply(structured ? 0 : asked.get(cookie!)!.length);
    const q = asked.get(r.cookie)!;
    expect(r.error).toBe(0);
    expect(assemble(r, q.offset, q.length).equals(model.subarray(q.offset, q.offset + q.length))).toBe(true);
    // Holes of a raw file are known through SEEK_HOLE (the addon): without it the whole file reads as data.
    if (structured && name === 'raw' && (flags & CMD_FLAG.DF) === 0 && nativeOps()) {
      const k = kindOf(q.offset, q.length);
      const types = r.chunks!.map((x) => x.type);
      if (k === 'hole') expect(types).toEqual([2]);
      if (k === 'data') expect(types).toEqual([1]);
    }
    if (structured && (flags & CMD_FLAG.DF) !== 0) expect(r.chunks!.map((x) => x.type)).toEqual([1]);
    asked.delete(r.cookie);
  }
  c.disc();
  await c.closed;
  return fastReadStats.replies - before;
}

describe('NBD small READs answered at once', () => {
  it('a raw file with holes and a ksc_inc overlay: byte-exact, holes as OFFSET_HOLE (structured replies)', async () => {
    const fast = (await readsMatch('raw', base, 300, true)) + (await readsMatch('top', top, 300, true));
    if (native) expect(fast).toBeGreaterThan(200);
    else expect(fast).toBe(0);
  }, 60_000);

  it('DF: one OFFSET_DATA chunk, zeros included', async () => {
    const fast = (await readsMatch('raw', base, 200, true, CMD_FLAG.DF)) + (await readsMatch('top', top, 200, true, CMD_FLAG.DF));
    if (native) expect(fast).toBeGreaterThan(150);
    else expect(fast).toBe(0);
  }, 60_000);

  it('simple replies (no structured replies negotiated), in request order of the cookies', async () => {
    // Simple replies carry no length: the client must know which request each answers. Send one at a time.
    const c = await RawClient.connect(port);
    await c.handshake('top', false);
    const before = fastReadStats.replies;
    for (let i = 0; i < 100; i++) {
      const length = rng.chance(0.5) ? 4096 : rng.int(1, 40 * 1024);
      const offset = rng.int(0, SIZE - length);
      const { error, data } = await c.read(offset, length, BigInt(i + 1));
      expect(error).toBe(0);
      expect(data.equals(top.subarray(offset, offset + length))).toBe(true);
    }
    if (native) expect(fastReadStats.replies - before).toBeGreaterThan(50);
    c.disc();
    await c.closed;
  }, 60_000);

  it('READs pipelined with WRITEs of the same blocks: after the reply the new data, in flight old or new', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('top', true);
    for (let round = 0; round < 40; round++) {
      const offset = rng.int(0, SIZE / 4096 - 1) * 4096;
      const old = Buffer.from(top.subarray(offset, offset + 4096));
      const d = rng.bytes(4096);
      c.send(CMD.WRITE, 1n, offset, 4096, 0, d);
      c.send(CMD.READ, 2n, offset, 4096); // in flight with the WRITE
      const got = new Map<bigint, Buffer>();
      for (let i = 0; i < 2; i++) {
        const r = await c.reply();
        expect(r.error).toBe(0);
        if (r.cookie === 2n) got.set(2n, assemble(r, offset, 4096));
      }
      const racing = got.get(2n)!;
      expect(racing.equals(d) || racing.equals(old)).toBe(true);
      d.copy(top, offset);
      const after = await c.read(offset, 4096, 3n); // sent after the WRITE's reply
      expect(after.error).toBe(0);
      expect(after.data.equals(d)).toBe(true);
    }
    c.disc();
    await c.closed;
  }, 60_000);
});
