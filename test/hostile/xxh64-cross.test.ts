/**
 * Hostile: the addon's XXH64 (native/kscinc_xxh64.c) against xxhash-wasm where test/hash/chunkid.test.ts
 * does not reach: lengths on each side of the pair hasher's 32 KiB blocks and of 1 MiB (+17), random seeds
 * on xxh64 and random lengths 0 … 1 MiB+17, inputs at every offset 0 … 7 of their buffer, views of a
 * SharedArrayBuffer (a restore's workers decode into shared memory), and an id written over its own input
 * (out and data the same buffer). Then a repository written by one hasher and read by the other
 * (KSCINC_NO_NATIVE=1): verify clean and the restore byte-identical, both ways, and an incremental by one
 * over the other's parent deduplicates against it (the same ids).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import xxhash from 'xxhash-wasm';
import { SEED_B } from '../../src/hash/chunkid.js';
import { nativeOps } from '../../src/io/native.js';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1 << 20;
const ops = nativeOps();
const dir = tempDir('kscinc-hostile-xxh64-');

describe('the addon’s XXH64 against xxhash-wasm', () => {
  it('the addon is loaded here (else this file compares nothing)', () => {
    expect(typeof ops?.xxh64Id, 'npm run build:native').toBe('function');
  });

  it('equal ids and hashes at block edges, random lengths up to 1 MiB+17, offsets 0 … 7, seeds, shared memory', async () => {
    const ref = await xxhash();
    const seed = seedFor('test/hostile/xxh64-cross.test.ts');
    const rng = new Rng(seed);
    const big = rng.bytes(MiB + 17 + 64);
    const shared = Buffer.from(new SharedArrayBuffer(big.length));
    big.copy(shared);
    const lengths: number[] = [];
    for (const edge of [32768, 65536, 3 * 32768, MiB, MiB + 17]) for (let d = -40; d <= 40; d += rng.int(1, 9)) if (edge + d <= MiB + 17) lengths.push(edge + d);
    for (let i = 0; i < 60; i++) lengths.push(rng.int(0, MiB + 17));
    for (let i = 0; i < 60; i++) lengths.push(rng.int(0, 130));
    const want = (b: Uint8Array): string => ref.h64Raw(b, 0n).toString(16).padStart(16, '0') + ref.h64Raw(b, SEED_B).toString(16).padStart(16, '0');
    for (const n of lengths) {
      const off = rng.int(0, 7);
      for (const src of [big, shared]) {
        const b = src.subarray(off, off + n);
        const out = Buffer.alloc(16);
        ops!.xxh64Id!(b, SEED_B, out, 0);
        expect(out.toString('hex'), `${n} bytes at offset ${off}${src === shared ? ' (shared)' : ''}`).toBe(want(b));
      }
      const s = (BigInt(rng.u32()) << 32n) | BigInt(rng.u32());
      const b = big.subarray(off, off + n);
      expect(ops!.xxh64!(b, s), `xxh64 of ${n} bytes at ${off}, seed ${s}`).toBe(ref.h64Raw(b, s));
    }
    // The id over its own input: read in full before it is written.
    const own = Buffer.from(big.subarray(3, 3 + 4096));
    const expected = want(own);
    ops!.xxh64Id!(own, SEED_B, own, 100);
    expect(own.subarray(100, 116).toString('hex')).toBe(expected);
  }, 120_000);
});

describe('a repository written by one hasher and read by the other', () => {
  const wasm = { KSCINC_NO_NATIVE: '1' };
  const native = { KSCINC_NO_NATIVE: undefined };
  const rng = new Rng(seedFor('test/hostile/xxh64-cross.test.ts repo'));
  const disk = join(dir, 'disk.raw');
  // 6 MiB + 4 KiB + 17: a short last chunk of odd length.
  writeFileSync(disk, rng.bytes(6 * MiB + 4096 + 17));

  for (const [by, other, name] of [
    [native, wasm, 'addon → xxhash-wasm'],
    [wasm, native, 'xxhash-wasm → addon'],
  ] as const) {
    it(`${name}: verify clean, restore identical, and the other's incremental dedupes against it`, () => {
      const repo = join(dir, `repo-${by === native ? 'n' : 'w'}`);
      const b = kscinc(['backup', disk, '--repo', repo, '--no-encrypt', '--no-bitmap', '--json'], { env: by });
      expect(b.code, b.stderr).toBe(0);
      const v = kscinc(['verify', '--repo', repo], { env: other });
      expect(v.code, v.stdout + v.stderr).toBe(0);
      const out = join(dir, `out-${by === native ? 'n' : 'w'}.raw`);
      const r = kscinc(['restore', 'latest', out, '--repo', repo], { env: other });
      expect(r.code, r.stderr).toBe(0);
      expect(readFileSync(out).equals(readFileSync(disk))).toBe(true);
      // The same disk again by the other hasher: every chunk is found (the same ids), nothing new stored.
      const again = kscinc(['backup', disk, '--repo', repo, '--no-bitmap', '--json'], { env: other });
      expect(again.code, again.stderr).toBe(0);
      const j = JSON.parse(again.stdout) as { chunks: number; chunksNew: number; bytesStored: number };
      expect(j.chunks).toBe(25);
      expect([j.chunksNew, j.bytesStored], 'chunks and bytes the second backup stored').toEqual([0, 0]);
    }, 120_000);
  }
});
