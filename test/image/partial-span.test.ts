/**
 * In-place pieces of one turn take block buffers sized to what they cover, not a whole block each: with
 * 2 MiB blocks a random 4 KiB in-place write took (and, the free list keeping 4 MiB, allocated) a 2 MiB
 * buffer, memory that NBD admission (which counts the request's length) does not see. Random 4 KiB pieces
 * in place, one and several per turn, and a new block's chain with pieces queued for its next wave: the
 * bytes taken from block-buffers.ts per turn stay about those of the pieces, and the image reads back as
 * a reference does.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { blockBufferStats } from '../../src/image/ksc/block-buffers.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;
const B = 2048 * KiB; // the largest block size (MAX_BLOCK_BITS 21)
const P = 4 * KiB;
const SIZE = 4 * B;

const seed = seedFor('test/image/partial-span.test.ts');

describe('block buffers of partial writes are sized to their pieces', () => {
  it('random 4 KiB in-place pieces (2 MiB blocks): bytes taken per turn are about the pieces, data as the reference', async () => {
    const r = new Rng(seed);
    const path = join(tempDir(), 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    const img = await openKsc(path, { write: true });
    const ref = r.bytes(SIZE);
    for (let b = 0; b < SIZE / B; b++) await img.write(b * B, ref.subarray(b * B, (b + 1) * B));
    const perTurn: number[] = [];
    for (let t = 0; t < 40; t++) {
      // 1 to 8 pieces at distinct random 4 KiB places (several may fall in one block).
      const n = r.int(1, 8);
      const at = new Set<number>();
      while (at.size < n) at.add(r.int(0, SIZE / P - 1) * P);
      // Held once every piece joined (their writes not yet done): a span grown for a later piece of its block
      // took a new buffer and gave the old one back, so `taken` counts both (seed 2272490336: 20 KiB taken for
      // 2 pieces, 16 KiB held); what a turn holds is the memory the rule bounds (twice its pieces' bytes).
      const before = blockBufferStats.held;
      const ps: Promise<void>[] = [];
      for (const o of at) {
        const d = r.bytes(P);
        d.copy(ref, o);
        ps.push(img.write(o, d));
      }
      const held = blockBufferStats.held - before;
      perTurn.push(held);
      await Promise.all(ps);
      expect(held, `turn ${t}: ${n} pieces of 4 KiB (seed ${seed})`).toBeLessThanOrEqual(2 * n * P);
    }
    expect(perTurn.filter((x) => x > 0).length, 'turns that took the partial path').toBeGreaterThan(30);
    console.log(`partial-span bytes held per turn: ${perTurn.join(' ')}`);
    expect((await img.read(0, SIZE)).equals(ref), `read back as the reference (seed ${seed})`).toBe(true);
    await img.close();
  });

  it("a new block's chain: pieces queued for its next wave take a buffer of their span, not a second block", async () => {
    const path = join(tempDir(), 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    const img = await openKsc(path, { write: true });
    const ref = Buffer.alloc(SIZE);
    const put = (o: number, tag: number): Promise<void> => {
      const d = Buffer.alloc(P, tag);
      d.copy(ref, o);
      return img.write(o, d);
    };
    await put(0, 9); // the first partial write of an image takes the general path (it loads what join needs)
    await put(P, 8); // block 0 in place
    const first = put(B, 1); // the chain's first wave: the block's content buffer
    await new Promise((res) => setImmediate(res));
    const before = blockBufferStats.taken;
    // Pieces queued for the next wave: three within 8 KiB, one at the block's other end, one over two of them.
    const queued = [put(B + 10 * P, 2), put(B + 11 * P, 3), put(B + 10 * P + 512, 4), put(2 * B - P, 5), put(B + 11 * P - 1024, 6)];
    expect(blockBufferStats.taken - before, 'bytes taken for 5 queued 4 KiB pieces, two far apart').toBeLessThanOrEqual(8 * P);
    await Promise.all([first, ...queued]);
    expect((await img.read(0, SIZE)).equals(ref)).toBe(true);
    await img.close();
  });
});
