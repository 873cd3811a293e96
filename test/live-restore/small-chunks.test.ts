/**
 * Live restore and pull from a repository of 64 KiB chunks (repository.md §3, ksc_inc.md §4.2, issue 19):
 * the image names the 64 KiB chunk size, reads the backup byte for byte, fetches each non-zero chunk
 * once, a guest write lands in one bitmap granule, and the pull leaves a plain image equal to the backup.
 */
import { readFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { liveRestore } from '../../src/engines/live-restore.js';
import { pullImage } from '../../src/engines/pull.js';
import { openKsc } from '../../src/image/open.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { KiB, MiB, expectSame, makeDisk, newRepo, openRepo, zeroChunks } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-live-64k-');
const seed = seedFor('test/live-restore/small-chunks.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());
const C = 64 * KiB;

describe('live restore at 64 KiB chunks', () => {
  it('reads through chunk by chunk, records a guest write in one granule, pulls to a plain image', async () => {
    const repoDir = join(dir, 'repo');
    const repo = await newRepo(repoDir, { chunkSize: C });
    const size = 12 * MiB;
    const path = await makeDisk(dir, 'd', rng.fork(), { size, baseSize: size - MiB - 5000, baseRegions: 12, maxRegion: MiB });
    const src = await openKsc(path, { write: true });
    let id: string;
    try {
      id = (await backupDevice(src, repo)).id;
    } finally {
      await src.close();
    }
    const fullPath = join(dir, 'full.raw');
    await restoreBackup(repo, id, fullPath);
    const full = readFileSync(fullPath);
    const live = join(dir, 'live.ksc');
    const r = await liveRestore(repo, repoDir, 'latest', live);
    await repo.store.close();
    expect(r.chunkSize).toBe(C);
    const nonZero = size / C - zeroChunks(full, C).length;
    expect(nonZero, `seed ${seed}`).toBeGreaterThan(16);
    const img = await openKsc(live, { write: true });
    try {
      const b = img.backing as BackupBacking;
      expect(b.blockSize).toBe(C);
      expect(img.backupBacking?.chunkSize).toBe(C);
      // One chunk: one fetch, nothing else.
      const k0 = [...Array(size / C).keys()].find((k) => !b.isZeroChunk(k))!;
      expectSame(await img.read(k0 * C + 100, 1000), full.subarray(k0 * C + 100, k0 * C + 1100), `chunk ${k0}, seed ${seed}`);
      expect(b.stats.chunksFetched).toBe(1);
      expectSame(await img.read(0, size), full, `live image vs full restore, seed ${seed}`);
      await b.settled();
      expect(b.stats.chunksFetched).toBe(nonZero);
      await img.write(5 * C + 4096, Buffer.alloc(8192, 0xee));
      expect(await img.bitmapExtents('backup')).toEqual([{ offset: 5 * C, length: C }]);
      full.fill(0xee, 5 * C + 4096, 5 * C + 4096 + 8192);
    } finally {
      await img.close();
    }
    const p = await pullImage(live);
    expect(p.detached).toBe(true);
    renameSync(repoDir, `${repoDir}.gone`);
    const after = await openKsc(live);
    try {
      expect(after.backing).toBeNull();
      expectSame(await after.read(0, size), full, `pulled image (seed ${seed})`);
    } finally {
      await after.close();
    }
    renameSync(`${repoDir}.gone`, repoDir);
    // The next backup of the live-restored image is incremental: only the written granule is read.
    const again = await openRepo(repoDir);
    const img2 = await openKsc(live, { write: true });
    try {
      const b2 = await backupDevice(img2, again);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.bytesRead).toBe(C);
    } finally {
      await img2.close();
    }
  });
});
