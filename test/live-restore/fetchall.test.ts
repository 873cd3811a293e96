/**
 * The pull's bulk fetch (BackupBacking.fetchAll, formats/ksc_inc.md §4.2 rule 6): coalesced ranged reads of
 * the packs as a restore makes them (far fewer reads than chunks), guest reads and writes racing it read
 * the right bytes, no chunk is fetched twice (a reader shares a read in flight; a read leaves out what a
 * reader fetched), a guest write is never overwritten by a fill, and a damaged blob fails the pull with
 * KSC_E_CORRUPT without filling wrong data.
 */
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { pullImage } from '../../src/engines/pull.js';
import { openKsc } from '../../src/image/open.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { liveImage } from './helpers.js';
import { MiB, expectKscError, expectSame, makeDisk, zeroChunks } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-fetchall-');
const seed = seedFor('test/live-restore/fetchall.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());

/** A disk of `size` with a base and scattered regions, backed up and live-restored (./helpers.ts). */
const liveImageOf = (name: string, size: number): ReturnType<typeof liveImage> =>
  liveImage(dir, name, async () => {
    const path = await makeDisk(dir, name, rng.fork(), { size, baseSize: size - 2 * MiB - 777, baseRegions: 10, maxRegion: 4 * MiB });
    return openKsc(path, { write: true });
  });

describe('bulk fetch of a live image (pull)', () => {
  it('coalesces reads; racing guest reads and writes see the right bytes; nothing is fetched twice; fills never overwrite a write', async () => {
    const { target, full } = await liveImageOf('race', 40 * MiB);
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const C = b.blockSize;
      const nonZero = [...Array(b.chunks).keys()].filter((k) => !b.isZeroChunk(k));
      expect(nonZero.length, `seed ${seed}`).toBe(b.chunks - zeroChunks(full, C).length);
      const pulling = b.fetchAll(nonZero, { concurrency: 2 });
      // Guest traffic while the pull runs: random reads checked against the backup, and a few writes.
      const guest = async (): Promise<void> => {
        for (let i = 0; i < 40; i++) {
          const off = rng.int(0, full.length - 4096);
          const len = Math.min(full.length - off, rng.int(1, 3 * C));
          if (i % 8 === 7) {
            const data = rng.bytes(len);
            await img.write(off, data);
            data.copy(full, off);
          } else expectSame(await img.read(off, len), full.subarray(off, off + len), `guest read at ${off}+${len}, seed ${seed}`);
        }
      };
      await Promise.all([pulling, guest(), guest()]);
      await b.settled();
      expect(b.stats.chunksFetched, `each non-zero chunk fetched once (seed ${seed})`).toBe(nonZero.length);
      // Guest reads fetch chunk by chunk; the pull's reads are coalesced (test/live-restore/pull.test.ts counts them).
      expect(b.stats.reads, `at most one read per chunk (seed ${seed}): ${JSON.stringify(b.stats)}`).toBeLessThanOrEqual(nonZero.length);
      expectSame(await img.read(0, full.length), full, `after the pull, with the guest's writes (seed ${seed})`);
      expect(
        (await img.extents(0, img.size)).filter((e) => e.depth !== 0 && e.state === 'data'),
        'nothing reads through any more',
      ).toEqual([]);
      expect(b.stats.chunksFetched).toBe(nonZero.length);
    } finally {
      await img.close();
    }
  });

  it('a damaged blob fails the pull with KSC_E_CORRUPT naming the chunk; the damaged chunk is not filled, the image keeps reading right', async () => {
    const { repoDir, target, full } = await liveImageOf('bad', 24 * MiB);
    // Damage one blob in the middle of the first pack.
    const packs = join(repoDir, 'packs');
    const sub = readdirSync(packs)[0]!;
    const p = join(packs, sub, readdirSync(join(packs, sub))[0]!);
    const bytes = readFileSync(p);
    const at = Math.floor(bytes.length / 2);
    bytes[at] ^= 0x5a;
    writeFileSync(p, bytes);
    const e = await expectKscError(pullImage(target, { concurrency: 1 }), 'KSC_E_CORRUPT', 'pull over a damaged blob');
    expect(e.message).toMatch(/chunk/);
    // The image still has its backing; every chunk it holds is right, and reading the damaged one fails.
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      expect(b).toBeInstanceOf(BackupBacking);
      const C = b.blockSize;
      let held = 0;
      let failed = 0;
      for (let k = 0; k < b.chunks; k++) {
        const local = (await img.extents(k * C, C)).every((x) => x.depth === 0);
        if (!local) continue;
        held++;
        expectSame(await img.read(k * C, C), full.subarray(k * C, (k + 1) * C), `chunk ${k} held after the failed pull (seed ${seed})`);
      }
      for (let k = 0; k < b.chunks; k++) {
        if (b.isZeroChunk(k)) continue;
        try {
          expectSame(await img.read(k * C, C), full.subarray(k * C, (k + 1) * C), `chunk ${k} (seed ${seed})`);
        } catch (x) {
          expect((x as { code?: string }).code, String(x)).toBe('KSC_E_CORRUPT');
          failed++;
        }
      }
      expect(failed, `exactly the damaged chunk fails (seed ${seed})`).toBe(1);
      expect(held).toBeGreaterThanOrEqual(0);
    } finally {
      await img.close();
    }
  });
});
