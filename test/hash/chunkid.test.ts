/**
 * Chunk ids hashed in xxhash-wasm's memory with one copy (src/hash/chunkid.ts) equal two h64Raw calls,
 * for sizes around XXH64's 32-byte stripes, and across the growth of the wasm memory (a chunk larger
 * than any before goes through h64Raw, which grows it; the next ones fit again).
 */
import { describe, expect, it } from 'vitest';
import xxhash from 'xxhash-wasm';
import { SEED_B, chunkId, directHashing, initHash, merkleRoot } from '../../src/hash/chunkid.js';
import { Rng } from '../helpers/rng.js';

describe('chunk ids', () => {
  it('equal h64Raw with both seeds at every size, before and after the wasm memory grows', async () => {
    await initHash();
    expect(directHashing()).toBe(true);
    const ref = await xxhash(); // a separate instance: its memory is not the one chunkId writes
    const seed = 0x19c0de;
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const sizes = [0, 1, 7, 31, 32, 33, 63, 64, 65, 4095, 4096, 65536, 1 << 20, (1 << 20) + 5, 5 << 20, 100, 1 << 20, 9 << 20, 3];
    for (const n of sizes) {
      const b = rng.bytes(n);
      const want = Buffer.alloc(16);
      want.writeBigUInt64BE(ref.h64Raw(b, 0n), 0);
      want.writeBigUInt64BE(ref.h64Raw(b, SEED_B), 8);
      expect(chunkId(b).toString('hex'), `size ${n}`).toBe(want.toString('hex'));
      // Into a given buffer at an offset, and from a view that does not start its buffer.
      const out = Buffer.alloc(40);
      const inner = Buffer.concat([Buffer.alloc(3), b]).subarray(3);
      chunkId(inner, out, 20);
      expect(out.subarray(20, 36).equals(want), `size ${n} at an offset`).toBe(true);
    }
    expect(directHashing()).toBe(true);
  });

  it('keep the Merkle root of a known list (ids of ids go the same way)', async () => {
    await initHash();
    const ids = Buffer.alloc(16 * 300);
    for (let i = 0; i < 300; i++) chunkId(Buffer.from(`chunk ${i}`), ids, 16 * i);
    const ref = await xxhash();
    const id = (b: Buffer): Buffer => {
      const o = Buffer.alloc(16);
      o.writeBigUInt64BE(ref.h64Raw(b, 0n), 0);
      o.writeBigUInt64BE(ref.h64Raw(b, SEED_B), 8);
      return o;
    };
    const want = id(Buffer.concat([id(ids.subarray(0, 256 * 16)), id(ids.subarray(256 * 16))]));
    expect(merkleRoot(ids).equals(want)).toBe(true);
  });
});
