/**
 * Pieces into fresh space (formats/ksc_inc.md §9 rule 12, src/image/ksc/partial.ts submitFresh): the first
 * write of a new block whose cluster comes from the end of the file writes only the span of its pieces
 * (and the block's last sector, so that the file covers the cluster); the block's checksum is still that
 * of the whole block, zeros included. A cluster from the free list (which may hold old bytes) is written
 * whole. The stepped case stops after every write, punch and sync of a run that frees a block, reuses its
 * cluster for the pieces of a new block and puts the pieces of another into fresh space: no block ever reads
 * the freed block's bytes, and `check --verify` is clean at every step.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { coreOf } from '../../src/image/ksc/image.js';
import { nativeOps } from '../../src/io/native.js';
import { B, type Case, KiB, SIZE, block } from '../helpers/step-cases.js';
import { tempDir } from '../helpers/tmp.js';
import { HELD0, everyStepTests, expectNoLeaks, overlay, runLoaded, setupHeld0, verifyBlocks } from '../helpers/write-path.js';

const P = 4 * KiB;
const piece = (tag: number): Buffer => block(9, tag).subarray(0, P);

/** The host offset of `blk`'s cluster, from the image's map. */
async function hostOf(path: string, blk: number): Promise<number> {
  const k = await openKsc(path);
  try {
    await k.read(0, B); // the map page loaded
    const c = coreOf(k);
    return c.map.page(0)!.host[blk]!;
  } finally {
    await k.close();
  }
}

/** Whether the cluster at `host` holds a hole anywhere (SEEK_HOLE), or null when the host cannot tell. */
async function hasHole(path: string, host: number): Promise<boolean | null> {
  const n = nativeOps();
  if (!n) return null;
  const fh = await open(path, 'r');
  try {
    const h = n.seekHole(fh.fd, host);
    if (h === -2) return null;
    return h >= 0 && h < host + B;
  } finally {
    await fh.close();
  }
}

const native = nativeOps()?.writeCrc !== undefined;

describe('pieces of a new block into fresh space', () => {
  it.runIf(native)('the first wave writes only its span there; the block reads zeros around it and its checksum is the whole block', async () => {
    const path = join(tempDir(), 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    const k = await openKsc(path, { write: true });
    await k.read(0, B);
    await Promise.all([k.write(3 * B + 2 * P, piece(1)), k.write(3 * B + 5 * P, piece(2))]);
    const want = overlay(B, [
      [piece(1), 2 * P],
      [piece(2), 5 * P],
    ]);
    const c = coreOf(k);
    expect(c.map.page(0)!.csumValid[3], 'the first wave sets a valid checksum').toBe(1);
    await k.close();
    // Before any read of the block: pages read into the cache count as data to SEEK_HOLE.
    const host = await hostOf(path, 3);
    const hole = await hasHole(path, host);
    if (hole !== null) expect(hole, 'the zeros around the span were not written').toBe(true);
    // check: a cluster partly a hole is no corruption (I6), and with --verify the checksum of zeros +
    // pieces matches what the cluster reads.
    await expectNoLeaks(path);
    const again = await openKsc(path);
    expect((await again.read(3 * B, B)).equals(want)).toBe(true);
    await again.close();
  });

  it.runIf(native)('a cluster from the free list is written whole (it may hold old bytes)', async () => {
    const path = join(tempDir(), 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    const k = await openKsc(path, { write: true });
    await k.write(B, block(4, 1));
    await k.flush();
    await k.discard(B, B);
    await k.flush(); // the cluster unlinked durably, punched, free
    await k.flush();
    await k.read(0, B);
    const c = coreOf(k);
    const free = c.alloc.freeCount;
    expect(free, 'the discarded block freed its cluster').toBeGreaterThan(0);
    await k.write(5 * B + P, piece(3));
    expect(c.alloc.freeCount, 'the new block took the free cluster').toBe(free - 1);
    const want = overlay(B, [[piece(3), P]]);
    expect((await k.read(5 * B, B)).equals(want)).toBe(true);
    await k.close();
    const hole = await hasHole(path, await hostOf(path, 5));
    if (hole !== null) expect(hole, 'the whole block was written').toBe(false);
    await expectNoLeaks(path);
  });

  everyStepTests(reuseCase, 6);
});

/**
 * Block 0 holds HELD0, block 1 FREED; the run discards block 1 and flushes twice (its cluster punched and
 * free), then writes pieces of new blocks 2 (which takes the freed cluster) and 3 (fresh space) in one turn,
 * and flushes. Blocks 1–3 read zeros or their new content at every step, never FREED.
 */
function reuseCase(withBitmap: boolean): Case {
  const FREED = block(6, 1);
  const new2 = overlay(B, [[piece(4), 3 * P]]);
  const new3 = overlay(B, [
    [piece(5), 0],
    [piece(6), 9 * P],
  ]);
  const zero = Buffer.alloc(B);
  return {
    name: `a freed cluster reused beside fresh space${withBitmap ? ' with a bitmap' : ''}`,
    setup: async (dir) => {
      await setupHeld0(dir, withBitmap);
      const k = await openKsc(join(dir, 'img.ksc'), { write: true });
      await k.write(B, FREED);
      await k.close();
    },
    run: (dir) =>
      runLoaded(dir, async (k) => {
        if (!(await k.read(B, B)).equals(zero)) {
          await k.discard(B, B);
          await k.flush();
          await k.flush();
        }
        await Promise.all([k.write(2 * B + 3 * P, piece(4)), k.write(3 * B, piece(5)), k.write(3 * B + 9 * P, piece(6))]);
        await k.flush();
      }),
    verify: async (dir, done, where) => {
      await verifyBlocks(
        dir,
        where,
        (i) => (i === 0 ? [HELD0] : i === 1 ? (done ? [zero] : [FREED, zero]) : i === 2 ? (done ? [new2] : [zero, new2]) : i === 3 ? (done ? [new3] : [zero, new3]) : [zero]),
        null,
      );
    },
  };
}
