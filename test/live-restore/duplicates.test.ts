/**
 * Positions holding the same chunk (src/image/repo-dups.ts, repobacking.ts DUP_FILLS): a read that fetches
 * a chunk fills the other positions holding it from that one fetch, so a disk with repeated chunks fetches
 * and decodes each once (as a restore does); never over a guest's write, never from a damaged chunk.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { openKsc } from '../../src/image/open.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import type { KscImage } from '../../src/image/ksc.js';
import { closePool } from '../../src/compress/pool.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, expectKscError, expectSame } from '../backup/helpers/fixtures.js';
import { damagePacks, liveFromBytes } from './helpers.js';

const dir = tempDir('kscinc-dups-');
afterAll(() => closePool());
afterEach(() => {
  delete process.env.KSCINC_LIVE_READAHEAD;
});

/** 8 distinct random 1 MiB chunks, three times over (24 MiB: chunk k holds distinct chunk k % 8), live-restored. */
async function liveImage(name: string): Promise<{ target: string; data: Buffer; repoDir: string }> {
  const one = randomBytes(8 * MiB);
  return liveFromBytes(dir, name, Buffer.concat([one, one, one]));
}

/** The chunk positions whose whole 1 MiB the image itself holds. */
async function heldChunks(img: KscImage): Promise<number[]> {
  const held: number[] = [];
  for (const e of await img.extents(0, img.size)) {
    if (e.depth !== 0 || e.state !== 'data') continue;
    for (let k = Math.ceil(e.offset / MiB); (k + 1) * MiB <= e.offset + e.length; k++) held.push(k);
  }
  return held;
}

describe('live restore: positions holding the same chunk', () => {
  it('one read fetches a chunk once and fills every position holding it; the whole disk fetches each distinct chunk once', async () => {
    process.env.KSCINC_LIVE_READAHEAD = '0';
    const { target, data } = await liveImage('once');
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      expect(b).toBeInstanceOf(BackupBacking);
      expectSame(await img.read(3 * MiB, MiB), data.subarray(3 * MiB, 4 * MiB), 'chunk 3');
      await b.settled();
      expect(b.stats.chunksFetched).toBe(1);
      expect(await heldChunks(img)).toEqual([3, 11, 19]);
      // The other two read right from the image: no fetch.
      expectSame(await img.read(11 * MiB, MiB), data.subarray(11 * MiB, 12 * MiB), 'chunk 11');
      expectSame(await img.read(19 * MiB, MiB), data.subarray(19 * MiB, 20 * MiB), 'chunk 19');
      expect(b.stats.chunksFetched).toBe(1);
      expectSame(await img.read(0, img.size), data, 'whole disk');
      await b.settled();
      expect(b.stats.chunksFetched).toBe(8);
      expect(await heldChunks(img)).toEqual(Array.from({ length: 24 }, (_, k) => k));
    } finally {
      await img.close();
    }
  });

  it('with readahead: a sequential read of the disk fetches each distinct chunk once', async () => {
    const { target, data } = await liveImage('ahead');
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      for (let k = 0; k < 24; k++) expectSame(await img.read(k * MiB, MiB), data.subarray(k * MiB, (k + 1) * MiB), `chunk ${k}`);
      await b.settled();
      expect(b.stats.chunksFetched).toBe(8);
    } finally {
      await img.close();
    }
  });

  it('a position the guest wrote keeps its write when a read fetches the chunk it held', async () => {
    process.env.KSCINC_LIVE_READAHEAD = '0';
    const { target, data } = await liveImage('write');
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const mine = Buffer.alloc(64 * 1024, 0x77);
      await img.write(10 * MiB + 128 * 1024, mine);
      expectSame(await img.read(2 * MiB, MiB), data.subarray(2 * MiB, 3 * MiB), 'chunk 2');
      await b.settled();
      const want = Buffer.from(data.subarray(10 * MiB, 11 * MiB));
      mine.copy(want, 128 * 1024);
      expectSame(await img.read(10 * MiB, MiB), want, 'chunk 10, written');
      expectSame(await img.read(18 * MiB, MiB), data.subarray(18 * MiB, 19 * MiB), 'chunk 18');
      expect(b.stats.chunksFetched).toBe(1);
    } finally {
      await img.close();
    }
  });

  it('a damaged chunk fills none of its positions: every read of them fails with KSC_E_CORRUPT', async () => {
    process.env.KSCINC_LIVE_READAHEAD = '0';
    const { target, repoDir } = await liveImage('bad');
    damagePacks(repoDir);
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      for (const k of [5, 13, 21]) await expectKscError(img.read(k * MiB, MiB), 'KSC_E_CORRUPT');
      await b.settled();
      expect(b.stats.chunksFetched).toBe(0);
      expect(await heldChunks(img)).toEqual([]);
    } finally {
      await img.close();
    }
  });
});
