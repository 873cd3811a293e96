/**
 * Many overlapping requests in flight at once (as the NBD server will issue them). Block-range locks are
 * FIFO, so the result must equal applying the requests one by one in the order they were issued, and every
 * read must see exactly the requests issued before it: no torn metadata, no half-done copy-on-write.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, expect } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { tempDir } from '../helpers/tmp.js';

function rng(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
  };
}

describe('concurrent requests', () => {
  for (const blockSize of [4096, 65536]) {
    it(`overlapping writes, zeroes, discards and reads in flight (block ${blockSize})`, async () => {
      const seed = Number(process.env.KSC_SEED ?? (Date.now() % 1e9) + blockSize);
      console.log(`concurrency seed ${seed} (replay with KSC_SEED=${seed})`);
      const r = rng(seed);
      const dir = tempDir();
      const size = 2 << 20;
      const base = Buffer.alloc(size);
      for (let i = 0; i < size; i += 512) base.fill(r(256), i, i + 512);
      writeFileSync(join(dir, 'base.raw'), base);
      await createImage(join(dir, 'top.ksc'), { backing: join(dir, 'base.raw'), blockSize, intentRegion: 256 * 1024 });
      const img = await openKsc(join(dir, 'top.ksc'), { write: true });
      await img.addBitmap('b');
      const model = Buffer.from(base);
      const touched: [number, number][] = [];
      const pending: Promise<void>[] = [];
      const checks: { at: number; len: number; expect: Buffer; got: Promise<Buffer> }[] = [];
      for (let i = 0; i < 400; i++) {
        const len = 1 + r(3 * blockSize);
        const at = r(size - len);
        const op = r(10);
        if (op <= 6) touched.push([at, len]);
        if (op < 5) {
          const data = Buffer.alloc(len, 1 + r(255));
          pending.push(img.write(at, data, { fua: r(20) === 0 }));
          data.copy(model, at);
        } else if (op === 5) {
          pending.push(img.writeZeroes(at, len, { mayTrim: r(2) === 0 }));
          model.fill(0, at, at + len);
        } else if (op === 6) {
          pending.push(img.discard(at, len));
          const first = Math.ceil(at / blockSize) * blockSize;
          const last = Math.floor((at + len) / blockSize) * blockSize;
          if (last > first) model.fill(0, first, last);
        } else if (op === 7) {
          pending.push(img.flush());
        } else {
          checks.push({ at, len, expect: Buffer.from(model.subarray(at, at + len)), got: img.read(at, len) });
        }
      }
      await Promise.all(pending);
      for (const c of checks) {
        const got = await c.got;
        expect(got.equals(c.expect), `read at ${c.at}+${c.len} (seed ${seed})`).toBe(true);
      }
      expect((await img.read(0, size)).equals(model)).toBe(true);
      const dirty = await img.bitmapExtents('b');
      for (const [at, len] of touched) {
        expect(
          dirty.some((e) => e.offset <= at && at + len <= e.offset + e.length),
          `bitmap covers ${at}+${len}`,
        ).toBe(true);
      }
      await img.close();
      const again = await openKsc(join(dir, 'top.ksc'));
      expect((await again.read(0, size)).equals(model), `after reopen (seed ${seed})`).toBe(true);
      await again.close();
    });
  }
});
