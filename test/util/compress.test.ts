/**
 * The LZ4 paths of the blob codec (formats/repository.md §5.4): liblz4 through the native addon and
 * lz4-napi must write the same stored form and read each other's output; malformed input is refused.
 */
import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { compressSync, uncompressSync } from 'lz4-napi';
import { nativeOps } from '../../src/io/native.js';
import { compressInto, decompressInto, lz4Bound, lz4Native } from '../../src/compress/lz4.js';
import { initHash, chunkId } from '../../src/hash/chunkid.js';
import { encodeBlob, decodeBlob } from '../../src/compress/codec.js';
import { packBatch, packChunks, unpackInto, SharedSlot, closePool, poolStarted } from '../../src/compress/pool.js';
import { Rng } from '../helpers/rng.js';

function sample(seed: number, size: number): Buffer {
  // Compressible but not trivial: runs of random words.
  const rng = new Rng(seed);
  const r = (): number => rng.u32() / 2 ** 32;
  const b = Buffer.alloc(size);
  for (let o = 0; o < size; o += 64) {
    const w = Math.floor(r() * 1e9)
      .toString(36)
      .repeat(8);
    b.write(w, o, Math.min(64, size - o));
  }
  return b;
}

describe('LZ4 stored form', () => {
  it('the addon was built with liblz4 (setup installs liblz4-dev), unless the fallback is forced', () => {
    if (process.env.KSCINC_NO_NATIVE === '1') expect(lz4Native()).toBe(false);
    else expect(typeof nativeOps()?.lz4Compress).toBe('function');
  });

  it('compressInto output decodes with lz4-napi, and lz4-napi output decodes with decompressInto', () => {
    const seed = 4242;
    console.log(`seed ${seed}`);
    for (const size of [1, 100, 65536, 1 << 20]) {
      const src = sample(seed + size, size);
      const dst = Buffer.alloc(lz4Bound(size) + 10);
      const n = compressInto(src, dst, 10);
      if (size >= 100) expect(n).toBeGreaterThan(0);
      if (n > 0) {
        expect(dst.readUInt32LE(10)).toBe(size);
        expect(uncompressSync(dst.subarray(10, 10 + n)).equals(src)).toBe(true);
      }
      const theirs = compressSync(src);
      const out = Buffer.alloc(size + 7);
      expect(decompressInto(theirs, out, 7)).toBe(size);
      expect(out.subarray(7).equals(src)).toBe(true);
    }
  });

  it('incompressible data is not stored compressed; malformed or oversized input is refused', () => {
    const r = randomBytes(4096);
    expect(compressInto(r, Buffer.alloc(lz4Bound(4096)), 0)).toBe(0);
    const good = compressSync(sample(7, 65536));
    expect(decompressInto(good, Buffer.alloc(100), 0)).toBe(-1); // does not fit
    const bad = Buffer.from(good);
    bad.writeUInt32LE(65537, 0); // the prefix lies
    expect(decompressInto(bad, Buffer.alloc(70000), 0)).toBe(-1);
    expect(decompressInto(good.subarray(0, good.length - 9), Buffer.alloc(65536), 0)).toBe(-1); // truncated
    expect(decompressInto(Buffer.from([1, 0]), Buffer.alloc(10), 0)).toBe(-1);
  });

  it('the worker pool packs and unpacks batches; a damaged blob is reported, not returned', async () => {
    await initHash();
    const chunks = [sample(1, 1 << 20), Buffer.alloc(1 << 20), randomBytes(300_000), sample(2, 12345)];
    const packed = await packChunks(chunks);
    expect(packed[1]!.blob.length).toBe(0); // all zeros: not stored
    for (const i of [0, 2, 3]) {
      expect(packed[i]!.id.equals(chunkId(chunks[i]!))).toBe(true);
      expect(decodeBlob(packed[i]!.blob, packed[i]!.id, 1 << 20).equals(chunks[i]!)).toBe(true);
    }
    expect(packed[0]!.blob[4]).toBe(1); // compressed
    expect(packed[2]!.blob[4]).toBe(0); // random: stored raw
    const blobs = [0, 2, 3].map((i) => Buffer.from(packed[i]!.blob));
    blobs[1]![100] ^= 0x40;
    const slot = new SharedSlot(
      blobs.reduce((n, b) => n + b.length, 0),
      3 << 20,
    );
    const ranges: [number, number][] = [];
    let at = 0;
    for (const b of blobs) {
      b.copy(slot.input, at);
      ranges.push([at, b.length]);
      at += b.length;
    }
    const res = await unpackInto(
      slot,
      ranges,
      [0, 2, 3].map((i) => packed[i]!.id),
      1 << 20,
    );
    expect(res[0]!.ok && res[0]!.data.equals(chunks[0]!)).toBe(true);
    expect(res[1]!.ok).toBe(false);
    expect(res[2]!.ok && res[2]!.data.equals(chunks[3]!)).toBe(true);
    expect(encodeBlob(chunks[3]!, packed[3]!.id).length).toBeGreaterThan(32);
    await closePool();
  });

  it("packing on the caller's thread gives the same ids and blobs as the workers", async () => {
    const seed = 777;
    console.log(`seed ${seed}`);
    const lengths = [1 << 20, 1 << 20, 65536, 1 << 20, 4096];
    const parts = [sample(seed, lengths[0]!), Buffer.alloc(lengths[1]!), randomBytes(lengths[2]!), sample(seed + 1, lengths[3]!), Buffer.alloc(lengths[4]!, 7)];
    const batch = (): Uint8Array<ArrayBuffer> => {
      const b = Buffer.concat(parts);
      const own = new Uint8Array(new ArrayBuffer(b.length));
      own.set(b);
      return own;
    };
    await closePool();
    const inline = await packBatch(batch(), lengths, true, { inline: true });
    expect(poolStarted()).toBe(false); // no worker was started for it
    const workers = await packBatch(batch(), lengths, true);
    expect(poolStarted()).toBe(true);
    expect(workers.input!.equals(Buffer.concat(parts))).toBe(true); // the input comes back untouched
    // Inline, the random chunk (LZ4 cannot shrink it) is a header and a view of the batch, not a copy:
    // the batch is not handed back for reuse.
    expect(inline.input).toBe(null);
    expect(inline.chunks.map((c) => c.tail !== undefined)).toEqual([false, false, true, false, false]);
    const tail = inline.chunks[2]!.tail!;
    expect(tail.equals(parts[2]!)).toBe(true);
    expect(tail.byteOffset).toBe(2 << 20);
    for (let i = 0; i < lengths.length; i++) {
      const { id, blob, tail } = inline.chunks[i]!;
      expect(id.equals(workers.chunks[i]!.id)).toBe(true);
      expect(Buffer.concat(tail ? [blob, tail] : [blob]).equals(workers.chunks[i]!.blob)).toBe(true);
      expect(workers.chunks[i]!.tail).toBe(undefined);
    }
    expect(inline.chunks[1]!.blob.length).toBe(0);
    expect(decodeBlob(inline.chunks[3]!.blob, inline.chunks[3]!.id, 1 << 20).equals(parts[3]!)).toBe(true);
    expect(decodeBlob(Buffer.concat([inline.chunks[2]!.blob, tail]), inline.chunks[2]!.id, 1 << 20).equals(parts[2]!)).toBe(true);
    // Compressible chunks only: nothing views the batch, which comes back to be reused.
    const plain = await packBatch(new Uint8Array(parts[0]!.length).fill(3), [parts[0]!.length], true, { inline: true });
    expect(plain.chunks[0]!.tail).toBe(undefined);
    expect(plain.input).not.toBe(null);
    await closePool();
  });
});
