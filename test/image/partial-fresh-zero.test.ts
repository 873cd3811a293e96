/**
 * A new block's content buffer is reused with the extent of what it held (block-buffers.ts FreshBlock): its
 * first wave zeroes only the gaps within that extent. Random pieces (in one turn, and queued for later waves
 * of a chain) into new blocks one after another, each block reusing the buffer of the one before: every block
 * reads back as a reference (zeros wherever no piece went: nothing of an earlier block shows through), and a
 * reopened image too.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;
const B = 64 * KiB;
const BLOCKS = 48;
const SIZE = BLOCKS * B;

const seed = seedFor('test/image/partial-fresh-zero.test.ts');
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

describe("a new block's reused buffer zeroes only what may not be zero", () => {
  it('random pieces into new blocks one after another, first waves and later ones: zeros wherever no piece went', async () => {
    console.log(`partial-fresh-zero seed ${seed}`);
    const r = new Rng(seed);
    const path = join(tempDir(), 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    let img = await openKsc(path, { write: true });
    await img.write(0, Buffer.alloc(B, 0x55)); // loads the map page (the callback path needs it loaded)
    const ref = Buffer.alloc(SIZE);
    ref.fill(0x55, 0, B);
    const piece = (block: number): Promise<void> => {
      const len = r.int(1, 16) * 512;
      const at = block * B + r.int(0, (B - len) / 512) * 512;
      const d = r.bytes(len);
      d.copy(ref, at);
      return img.write(at, d);
    };
    for (let b = 1; b < BLOCKS; b++) {
      // A first wave of 1 to 4 pieces, then (sometimes) pieces queued while it is written: later waves.
      const ps: Promise<void>[] = [];
      for (let k = r.int(1, 4); k > 0; k--) ps.push(piece(b));
      if (r.int(0, 1) === 1) {
        await turn(); // the first wave has been issued
        for (let k = r.int(1, 3); k > 0; k--) ps.push(piece(b));
      }
      await Promise.all(ps);
      const got = await img.read(b * B, B);
      expect(got.equals(ref.subarray(b * B, (b + 1) * B)), `block ${b} as the reference (seed ${seed})`).toBe(true);
    }
    await img.close();
    img = await openKsc(path, { write: true });
    expect((await img.read(0, SIZE)).equals(ref), `reopened: as the reference (seed ${seed})`).toBe(true);
    await img.close();
  });
});
