/**
 * Readahead of a live-restored image (src/image/repobacking.ts readAhead, repo-readahead.ts): a reader that
 * goes on where its last read ended gets the next KSCINC_LIVE_READAHEAD chunks (default 4) fetched and
 * filled before it asks, each fetched once, and more as it goes on, also while it reads the chunks already
 * filled; a reader that jumps around gets nothing extra; 0 turns it off.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { openKsc } from '../../src/image/open.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import { closePool } from '../../src/compress/pool.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, expectKscError, expectSame } from '../backup/helpers/fixtures.js';
import { damagePacks, liveFromBytes } from './helpers.js';

const dir = tempDir('kscinc-readahead-');
afterAll(() => closePool());
afterEach(() => {
  delete process.env.KSCINC_LIVE_READAHEAD;
});

/** A 16 MiB disk of random bytes (no zero chunk), backed up with 1 MiB chunks, live-restored to a new image. */
async function liveImage(name: string): Promise<{ target: string; data: Buffer; repoDir: string }> {
  return liveFromBytes(dir, name, randomBytes(16 * MiB));
}

/** Readahead runs behind the reads: waits until the backing's fetch count stops moving (and the fills are done). */
async function still(b: BackupBacking): Promise<void> {
  let last = -1;
  await vi.waitFor(
    async () => {
      await b.settled();
      const now = b.stats.chunksFetched;
      const same = now === last;
      last = now;
      if (!same) throw new Error('still fetching');
    },
    { timeout: 30_000, interval: 200 },
  );
}

/**
 * Reads the chunks `ks` in that order, one after the other (a group of them, then waits until readahead is
 * still before the next group); returns the backing's fetch count once it is still.
 */
async function readChunks(name: string, ks: (number | number[])[]): Promise<number> {
  const { target, data } = await liveImage(name);
  const img = await openKsc(target, { write: true });
  try {
    const b = img.backing as BackupBacking;
    expect(b).toBeInstanceOf(BackupBacking);
    for (const group of ks) {
      for (const k of [group].flat()) expectSame(await img.read(k * MiB, MiB), data.subarray(k * MiB, (k + 1) * MiB), `chunk ${k}`);
      if (Array.isArray(group)) await still(b);
    }
    await still(b);
    // Whatever was fetched ahead reads right, from the image now (no fetch).
    const before = b.stats.chunksFetched;
    expectSame(await img.read(0, 16 * MiB), data, 'whole disk');
    expect(b.stats.chunksFetched).toBe(16); // every chunk fetched once in all, the ones ahead included
    return before;
  } finally {
    await img.close();
  }
}

describe('live restore readahead', () => {
  it('a sequential reader gets the next 4 chunks fetched ahead, each once', async () => {
    // Chunk 0, then chunk 1 (continuing): 2 read + chunks 2..5 ahead.
    expect(await readChunks('seq', [0, 1])).toBe(6);
  });

  it('readahead goes on while the reader reads chunks it filled (the image tells the backing of local reads)', async () => {
    process.env.KSCINC_LIVE_READAHEAD = '2';
    // 0, 1 (2 and 3 ahead, then the window is 4); 2 from the image, 1 chunk ahead of it: 4..6 ahead.
    // (Before, a read of a local chunk reached no one: 4 in all.)
    expect(await readChunks('local', [[0, 1], [2]])).toBe(7);
  });

  it('a reader that jumps around gets nothing ahead', async () => {
    expect(await readChunks('rand', [9, 2, 13])).toBe(3);
  });

  it('damaged chunks: every read of them fails with KSC_E_CORRUPT, whether or not readahead reached them first; nothing wrong is filled', async () => {
    const { target, repoDir } = await liveImage('bad');
    damagePacks(repoDir);
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      // 0 then 1: sequential, so 2..5 are fetched ahead (and fail there, quietly); reads of each still fail.
      for (const k of [0, 1, 2, 3, 4, 5]) await expectKscError(img.read(k * MiB, MiB), 'KSC_E_CORRUPT');
      await b.settled();
      expect(b.stats.chunksFetched).toBe(0);
      const held = (await img.extents(0, img.size)).filter((e) => e.depth === 0 && e.state === 'data');
      expect(held).toEqual([]);
    } finally {
      await img.close();
    }
  });

  it('KSCINC_LIVE_READAHEAD=0 turns it off, =2 fetches 2 ahead', async () => {
    process.env.KSCINC_LIVE_READAHEAD = '0';
    expect(await readChunks('off', [0, 1, 2])).toBe(3);
    process.env.KSCINC_LIVE_READAHEAD = '2';
    expect(await readChunks('two', [0, 1])).toBe(4);
  });
});
