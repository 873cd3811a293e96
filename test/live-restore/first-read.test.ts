/**
 * The first read of a live restore without waiting (issue 18's < 1 s): a chunk fetched before the worker
 * pool is up is decoded on the calling thread with the same checks (right bytes; a damaged blob is
 * KSC_E_CORRUPT, nothing filled), and the pool is started for what follows; a writer's open loads the index
 * in the background, and when that one try fails because the repository went away, the first read still
 * waits and times out as formats/ksc_inc.md §4.2 rule 7 says. liveRestore takes its shared lock while it
 * looks the backup up: when the lookup fails the lock is released and no reference is left.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { liveRestore } from '../../src/engines/live-restore.js';
import { openImage, openKsc } from '../../src/image/open.js';
import type { BackupBacking } from '../../src/image/repobacking.js';
import { closePool, poolReady, poolStarted } from '../../src/compress/pool.js';
import { listLiveRefs } from '../../src/repo/liverefs.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { damagePacks, liveImage } from './helpers.js';
import { MiB, expectKscError, expectSame, openRepo } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-live-first-');
const seed = seedFor('test/live-restore/first-read.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());

const liveImageOf = (name: string): ReturnType<typeof liveImage> =>
  liveImage(dir, name, () => {
    const path = join(dir, `${name}.raw`);
    writeFileSync(path, rng.bytes(8 * MiB)); // every chunk non-zero
    return openImage(path);
  });

describe('the first read of a live restore', () => {
  it('before the worker pool is up: decoded on this thread, right bytes, the pool started for later reads', async () => {
    const { target, full } = await liveImageOf('inline');
    await closePool();
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const C = b.blockSize;
      expect(poolReady(), 'no pool yet').toBe(false);
      expectSame(await img.read(3 * C + 100, 4096), full.subarray(3 * C + 100, 3 * C + 4196), `first read (seed ${seed})`);
      expect(poolStarted(), 'the first fetch starts the pool').toBe(true);
      expect(b.stats.chunksFetched).toBe(1);
      // Later reads (in the pool once it is up) read right too, and each chunk is fetched once.
      expectSame(await img.read(0, 3 * C), full.subarray(0, 3 * C), `chunks 0-2 (seed ${seed})`);
      await b.settled();
      expectSame(await img.read(3 * C, C), full.subarray(3 * C, 4 * C), `chunk 3 again (seed ${seed})`);
      expect(b.stats.chunksFetched).toBe(4);
    } finally {
      await img.close();
    }
  });

  it('before the worker pool is up: a damaged blob is KSC_E_CORRUPT naming the chunk, nothing filled', async () => {
    const { repoDir, target } = await liveImageOf('inline-bad');
    damagePacks(repoDir);
    await closePool();
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      expect(poolReady()).toBe(false);
      const e = await expectKscError(img.read(2 * b.blockSize, 4096), 'KSC_E_CORRUPT');
      expect(e.message).toMatch(/chunk 2 .*every copy failed its check/);
      await b.settled();
      expect((await img.extents(2 * b.blockSize, b.blockSize))[0]!.depth, 'nothing filled').not.toBe(0);
    } finally {
      await img.close();
    }
  });

  it("the open's index prefetch: when the repository goes away meanwhile, the first read waits and times out (rule 7), then works", async () => {
    const { repoDir, target, full } = await liveImageOf('away');
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const C = b.blockSize;
      b.timeoutMs = 1500;
      renameSync(repoDir, `${repoDir}.away`); // right after the open: the prefetch may or may not have finished
      try {
        const t0 = Date.now();
        await expectKscError(img.read(5 * C, 4096), 'KSC_E_UNAVAILABLE', 'read while away');
        expect(Date.now() - t0, 'it waited about the timeout, not the default 300 s').toBeLessThan(60_000);
      } finally {
        renameSync(`${repoDir}.away`, repoDir);
      }
      expectSame(await img.read(5 * C, C), full.subarray(5 * C, 6 * C), `after the repository is back (seed ${seed})`);
    } finally {
      await img.close();
    }
  });

  it('liveRestore of a backup that is not there: its lock released, no reference, no image', async () => {
    const { repoDir } = await liveImageOf('missing');
    const repo = await openRepo(repoDir);
    try {
      const refsBefore = (await listLiveRefs(repo.store)).length;
      const target = join(dir, 'missing-2.ksc');
      await expectKscError(liveRestore(repo, repoDir, '20200101T000000000Z-00000000', target), 'KSC_E_NOT_FOUND', 'no such backup');
      expect(await repo.listLocks(), 'the shared lock was released').toEqual([]);
      expect((await listLiveRefs(repo.store)).length).toBe(refsBefore);
      expect(() => readFileSync(target)).toThrow();
    } finally {
      await repo.store.close();
    }
  });
});
