/**
 * Chunk ids (src/hash/chunkid.ts): with the addon, native/kscinc_xxh64.c; without it (KSCINC_NO_NATIVE=1),
 * xxhash-wasm's h64Raw. Either way the ids equal two calls of a separate xxhash-wasm instance's h64Raw, for
 * random lengths 0 … 2 MiB read from anywhere in a larger buffer, and the §11 vectors of
 * formats/repository.md. Run this file with and without KSCINC_NO_NATIVE=1 to cover both hashers.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import xxhash from 'xxhash-wasm';
import { SEED_B, chunkId, hashBackend, initHash, merkleRoot } from '../../src/hash/chunkid.js';
import { nativeOps } from '../../src/io/native.js';
import { ROOT } from '../helpers/corrupt.js';
import { Rng, seedFor } from '../helpers/rng.js';

const MiB = 1 << 20;

/** The addon's XXH64 functions, when it is loaded. */
const addon = nativeOps() as unknown as {
  xxh64?: (data: Uint8Array, seed: bigint) => bigint;
  xxh64Id?: (data: Uint8Array, seedB: bigint, out: Uint8Array, at: number) => void;
} | null;

async function reference(): Promise<(b: Uint8Array) => Buffer> {
  const ref = await xxhash(); // a separate instance from any chunkId may use
  return (b) => {
    const o = Buffer.alloc(16);
    o.writeBigUInt64BE(ref.h64Raw(b, 0n), 0);
    o.writeBigUInt64BE(ref.h64Raw(b, SEED_B), 8);
    return o;
  };
}

/** The `vectors-id` lines of formats/repository.md §11 as [input, id-hex]. */
function specVectors(): [Buffer, string][] {
  const spec = readFileSync(`${ROOT}/formats/repository.md`, 'utf8');
  const m = /```vectors-id\n([\s\S]*?)```/.exec(spec);
  if (!m) throw new Error('formats/repository.md has no vectors-id block');
  return m[1]!
    .split('\n')
    .filter((l) => l.trim() && !l.startsWith('#'))
    .map((l) => {
      const [input, want] = l.split(' => ') as [string, string];
      return [Buffer.from(input === '-' ? '' : input, 'hex'), want];
    });
}

describe('chunk ids', () => {
  it('are hashed by the addon when it is loaded, else by xxhash-wasm', async () => {
    await initHash();
    const want = addon && typeof addon.xxh64Id === 'function' ? 'native' : 'wasm';
    console.log(`hasher: ${hashBackend()} (KSCINC_NO_NATIVE=${process.env['KSCINC_NO_NATIVE'] ?? ''})`);
    expect(hashBackend()).toBe(want);
    // A loaded addon without XXH64 is a stale build (npm run build:native).
    if (addon) expect(typeof addon.xxh64Id, 'the addon exports xxh64Id').toBe('function');
  });

  it('match the vectors of formats/repository.md §11', async () => {
    await initHash();
    const vectors = specVectors();
    expect(vectors.length).toBeGreaterThanOrEqual(4);
    for (const [input, want] of vectors) expect(chunkId(input).toString('hex'), `${input.length} bytes`).toBe(want);
  });

  it('equal h64Raw with both seeds for random lengths 0 … 2 MiB, at any alignment and output offset', async () => {
    await initHash();
    const id = await reference();
    const rng = new Rng(seedFor('test/hash/chunkid.test.ts'));
    const pool = rng.bytes(2 * MiB + 64);
    const sizes = [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 65, 4096, MiB, 2 * MiB];
    for (let i = 0; i < 40; i++) sizes.push(rng.int(0, 2 * MiB));
    for (let i = 0; i < 40; i++) sizes.push(rng.int(0, 100));
    for (const n of sizes) {
      const start = rng.int(0, pool.length - n);
      const b = pool.subarray(start, start + n);
      const want = id(b);
      expect(chunkId(b).toString('hex'), `${n} bytes at ${start}`).toBe(want.toString('hex'));
      const out = Buffer.alloc(48, 0xee);
      const at = rng.int(0, 32);
      chunkId(b, out, at);
      expect(out.subarray(at, at + 16).equals(want), `${n} bytes into out at ${at}`).toBe(true);
      expect(out.subarray(0, at).every((x) => x === 0xee) && out.subarray(at + 16).every((x) => x === 0xee), 'nothing written outside the id').toBe(true);
    }
  });

  it('keep the Merkle root of a known list (ids of ids go the same way)', async () => {
    await initHash();
    const id = await reference();
    const ids = Buffer.alloc(16 * 300);
    for (let i = 0; i < 300; i++) chunkId(Buffer.from(`chunk ${i}`), ids, 16 * i);
    const want = id(Buffer.concat([id(ids.subarray(0, 256 * 16)), id(ids.subarray(256 * 16))]));
    expect(merkleRoot(ids).equals(want)).toBe(true);
  });
});

describe.runIf(addon?.xxh64 !== undefined)('the addon’s XXH64', () => {
  it('equals h64Raw with random seeds and lengths', async () => {
    const ref = await xxhash();
    const rng = new Rng(seedFor('test/hash/chunkid.test.ts'));
    for (let i = 0; i < 200; i++) {
      const b = rng.bytes(rng.chance(0.2) ? rng.int(0, 300_000) : rng.int(0, 200));
      const seed = (BigInt(rng.u32()) << 32n) | BigInt(rng.u32());
      expect(addon!.xxh64!(b, seed), `${b.length} bytes, seed ${seed}`).toBe(ref.h64Raw(b, seed));
    }
  });

  it('rejects arguments of the wrong type and outputs that do not hold the id', () => {
    const x = addon!;
    const out = Buffer.alloc(16);
    expect(() => x.xxh64!('abc' as unknown as Uint8Array, 0n)).toThrow(TypeError);
    expect(() => x.xxh64!(Buffer.from('abc'), 1 as unknown as bigint)).toThrow(TypeError);
    expect(() => x.xxh64!(Buffer.from('abc'), 1n << 64n)).toThrow(RangeError);
    expect(() => x.xxh64Id!(Buffer.from('abc'), SEED_B, out, 1)).toThrow(RangeError);
    expect(() => x.xxh64Id!(Buffer.from('abc'), SEED_B, out, -1)).toThrow(RangeError);
    expect(() => x.xxh64Id!(Buffer.from('abc'), SEED_B, out, 0.5)).toThrow(RangeError);
    expect(() => x.xxh64Id!(Buffer.from('abc'), SEED_B, Buffer.alloc(15), 0)).toThrow(RangeError);
    expect(() => x.xxh64Id!(Buffer.from('abc'), SEED_B, new Uint16Array(8) as unknown as Uint8Array, 0)).toThrow(TypeError);
    expect(out.equals(Buffer.alloc(16))).toBe(true);
  });
});
