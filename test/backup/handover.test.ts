/**
 * The bitmap handover (formats/repository.md §10) when a backup fails or crashed: the dirty bitmap keeps
 * every bit it had plus the writes made meanwhile, no frozen bitmap is left, no manifest becomes visible,
 * and the next backup is incremental against the last good one and restores exactly. A frozen bitmap left
 * by a crash is merged back by the next backup.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice, FROZEN_SUFFIX, TOKEN_SEPARATOR } from '../../src/engines/backup.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import type { KscImage } from '../../src/image/ksc.js';
import { FaultStore, type FaultRule } from '../../src/objstore/fault.js';
import { KscError } from '../../src/errors.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, KiB, chunksOf, contents, expectKscError, expectRestores, makeDisk, newRepo, orphanPacks, randomChanges, type Touch } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-handover-');
const seed = seedFor('test/backup/handover.test.ts');
const root = new Rng(seed);
const C = MiB;
const BITMAP = 'backup';
afterAll(() => closePool());

/** Granule indexes a list of byte ranges covers at granularity g. */
function granules(ranges: { offset: number; length: number }[], g: number): Set<number> {
  const s = new Set<number>();
  for (const r of ranges) {
    if (r.length <= 0) continue;
    for (let i = Math.floor(r.offset / g); i <= Math.floor((r.offset + r.length - 1) / g); i++) s.add(i);
  }
  return s;
}

async function granularity(img: KscImage, name: string): Promise<number> {
  return (await img.listBitmaps()).find((b) => b.name === name)!.granularity;
}

async function tokenNames(img: KscImage): Promise<string[]> {
  return (await img.listBitmaps()).map((b) => b.name).filter((n) => n.startsWith(BITMAP + TOKEN_SEPARATOR));
}

function sorted(s: Set<number>): number[] {
  return [...s].sort((a, b) => a - b);
}

const injected = (): KscError => new KscError('KSC_E_UNAVAILABLE', 'injected failure');

/** A rule failing the n-th put (from 0) whose key starts with `prefix`. */
function failNth(prefix: string, n: number): FaultRule {
  let seen = 0;
  return (op, key) => {
    if (op !== 'put' || !key.startsWith(prefix)) return undefined;
    return seen++ === n ? { error: injected() } : undefined;
  };
}

describe('bitmap handover when a backup fails', () => {
  for (const failure of [
    { name: 'a pack upload', prefix: 'packs/', nth: 1, packsIndexed: false },
    { name: 'the index object', prefix: 'index/', nth: 0, packsIndexed: false },
    { name: 'the manifest', prefix: 'manifests/', nth: 0, packsIndexed: true },
  ]) {
    it(`failing at ${failure.name}: bits kept plus writes made meanwhile, no frozen bitmap, no manifest; the next backup is exact`, async () => {
      const rng = root.fork();
      const fault = { rule: (() => undefined) as FaultRule };
      const repo = await newRepo(join(dir, `repo-${failure.prefix.slice(0, -1)}`), { wrap: (s) => new FaultStore(s, (...a) => fault.rule(...a)) });
      const path = await makeDisk(dir, `fail-${failure.prefix.slice(0, -1)}`, rng, { size: 64 * MiB, baseSize: 40 * MiB, baseRegions: 6, maxRegion: 4 * MiB });
      const img = await openKsc(path, { write: true });
      try {
        const b1 = await backupDevice(img, repo);
        const token1 = (await repo.readManifest(b1.id)).bitmapToken;
        expect(await tokenNames(img)).toEqual([`${BITMAP}${TOKEN_SEPARATOR}${token1}`]);
        // Enough new data for several 4 MiB packs.
        const w2 = await randomChanges(img, rng, 30, { dataOnly: true, maxLen: MiB });
        const g = await granularity(img, BITMAP);
        const bits0 = granules(await img.bitmapExtents(BITMAP), g);
        expect(sorted(bits0)).toEqual(sorted(granules(w2, g)));

        fault.rule = failNth(failure.prefix, failure.nth);
        const during: Touch[] = [];
        const pending: Promise<void>[] = [];
        const err = await expectKscError(
          backupDevice(img, repo, {
            progress: (p) => {
              if (p.phase !== 'read' || pending.length > 0) return;
              for (let i = 0; i < 5; i++) {
                const offset = rng.int(0, img.size - 200 * KiB);
                const length = rng.int(1, 200 * KiB);
                during.push({ offset, length, kind: 'write' });
                pending.push(img.write(offset, rng.bytes(length)));
              }
            },
          }),
          'KSC_E_UNAVAILABLE',
          `backup failing at ${failure.name}`,
        );
        expect(err.message).toMatch(/injected/);
        await Promise.all(pending);
        expect(during.length).toBe(5);
        fault.rule = () => undefined;

        // The image side: nothing lost, nothing left over, the old token still in force.
        expect(img.hasBitmap(BITMAP + FROZEN_SUFFIX), 'a frozen bitmap was left behind').toBe(false);
        const bitsAfter = granules(await img.bitmapExtents(BITMAP), g);
        expect(sorted(bitsAfter)).toEqual(sorted(new Set([...bits0, ...granules(during, g)])));
        expect(await tokenNames(img)).toEqual([`${BITMAP}${TOKEN_SEPARATOR}${token1}`]);
        // The repository side: no manifest, no lock.
        expect(await repo.listBackupIds()).toEqual([b1.id]);
        expect(await repo.listLocks()).toEqual([]);
        const orphans = await orphanPacks(repo);
        if (failure.packsIndexed) expect(orphans).toEqual([]);
        else expect(orphans.length, 'packs that landed before the failure').toBeGreaterThan(0);

        // The next backup: incremental against b1, reads exactly the chunks of both rounds of writes.
        const expected = chunksOf([...w2, ...during], C);
        const b3 = await backupDevice(img, repo);
        const s3 = await contents(img);
        expect(b3.full, String(b3.fullReason)).toBe(false);
        expect(b3.parent).toBe(b1.id);
        expect(b3.chunksDirty).toBe(expected.size);
        if (failure.packsIndexed) {
          // Everything the failed backup uploaded is indexed: nothing new to store except what changed after its freeze.
          expect(b3.chunksNew).toBeLessThanOrEqual(chunksOf(during, C).size);
        }
        expect(await orphanPacks(repo), 'orphan packs were not adopted').toEqual([]);
        expect(img.hasBitmap(BITMAP + FROZEN_SUFFIX)).toBe(false);
        expect(await img.bitmapExtents(BITMAP)).toEqual([]);
        await expectRestores(repo, b3.id, join(dir, `after-${failure.prefix.slice(0, -1)}.raw`), s3, 'restore of the backup after the failed one');
        expect((await verifyRepo(repo)).ok).toBe(true);
      } finally {
        await img.close();
      }
    });
  }

  it('a frozen bitmap left by a crash is merged back at the next backup', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'repo-crash'));
    const path = await makeDisk(dir, 'crash', rng, { size: 64 * MiB, baseSize: 64 * MiB, baseRegions: 6, maxRegion: 4 * MiB });
    let img = await openKsc(path, { write: true });
    let w1: Touch[], w2: Touch[], b1: string;
    try {
      b1 = (await backupDevice(img, repo)).id;
      w1 = await randomChanges(img, rng, 12, { dataOnly: true, region: [0, 32 * MiB] });
      // What a backup killed right after the handover leaves: the bits moved to the frozen bitmap, the live one
      // cleared and collecting new writes.
      const g = await granularity(img, BITMAP);
      await img.addBitmap(BITMAP + FROZEN_SUFFIX, { enabled: false, granularity: g });
      await img.mergeBitmap(BITMAP, BITMAP + FROZEN_SUFFIX);
      await img.clearBitmap(BITMAP);
      w2 = await randomChanges(img, rng, 12, { dataOnly: true, region: [32 * MiB, 64 * MiB] });
      expect(sorted(granules(await img.bitmapExtents(BITMAP + FROZEN_SUFFIX), g))).toEqual(sorted(granules(w1, g)));
      expect(sorted(granules(await img.bitmapExtents(BITMAP), g))).toEqual(sorted(granules(w2, g)));
    } finally {
      await img.close();
    }
    img = await openKsc(path, { write: true });
    try {
      expect(img.hasBitmap(BITMAP + FROZEN_SUFFIX)).toBe(true);
      const b2 = await backupDevice(img, repo);
      const s2 = await contents(img);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.parent).toBe(b1);
      expect(b2.chunksDirty).toBe(chunksOf([...w1, ...w2], C).size);
      expect(img.hasBitmap(BITMAP + FROZEN_SUFFIX)).toBe(false);
      expect(await img.bitmapExtents(BITMAP)).toEqual([]);
      await expectRestores(repo, b2.id, join(dir, 'crash.raw'), s2, 'restore after merging a leftover frozen bitmap');
    } finally {
      await img.close();
    }
  });
});

describe('the freeze made while the repository is read (an incremental when the image allows one)', () => {
  it("a repository without the bitmap's parent: that freeze is undone and a full backup made; bits and later writes kept", async () => {
    const rng = root.fork();
    const repoA = await newRepo(join(dir, 'spec-A'));
    const repoB = await newRepo(join(dir, 'spec-B'));
    const path = await makeDisk(dir, 'spec', rng, { size: 48 * MiB, baseSize: 40 * MiB, baseRegions: 5, maxRegion: 4 * MiB });
    const img = await openKsc(path, { write: true });
    try {
      const a1 = await backupDevice(img, repoA);
      expect(a1.full).toBe(true);
      const w1 = await randomChanges(img, rng, 12, { dataOnly: true });
      const g = await granularity(img, BITMAP);
      const bits1 = granules(await img.bitmapExtents(BITMAP), g);
      expect(sorted(bits1)).toEqual(sorted(granules(w1, g)));

      // Repository B never saw this disk: the image's token matches nothing there.
      const b1 = await backupDevice(img, repoB);
      expect(b1.full).toBe(true);
      expect(b1.fullReason).toMatch(/no backup in .* matches bitmap "backup"'s state/);
      expect(img.hasBitmap(BITMAP + FROZEN_SUFFIX)).toBe(false);
      expect(await img.bitmapExtents(BITMAP)).toEqual([]); // handed over to b1
      const tokenB = (await repoB.readManifest(b1.id)).bitmapToken;
      expect(await tokenNames(img)).toEqual([`${BITMAP}${TOKEN_SEPARATOR}${tokenB}`]);
      const s1 = await contents(img);
      await expectRestores(repoB, b1.id, join(dir, 'spec-b1.raw'), s1, 'full backup made after the undone freeze');

      // Next into B: incremental from b1, exactly the chunks written since.
      const w2 = await randomChanges(img, rng, 6, { dataOnly: true });
      const b2 = await backupDevice(img, repoB);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.parent).toBe(b1.id);
      expect(b2.chunksDirty).toBe(chunksOf(w2, C).size);
      // And A now lacks the token: full again, and restorable.
      const a2 = await backupDevice(img, repoA);
      expect(a2.full).toBe(true);
      const s2 = await contents(img);
      await expectRestores(repoA, a2.id, join(dir, 'spec-a2.raw'), s2, 'full backup into A');
      expect((await verifyRepo(repoA)).ok && (await verifyRepo(repoB)).ok).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('a locked repository: the backup fails, the frozen bits merge back, the next backup is incremental and exact', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'spec-locked'));
    const path = await makeDisk(dir, 'spec-locked', rng, { size: 32 * MiB, baseSize: 30 * MiB, baseRegions: 4, maxRegion: 4 * MiB });
    const img = await openKsc(path, { write: true });
    try {
      const b1 = await backupDevice(img, repo);
      const w = await randomChanges(img, rng, 8, { dataOnly: true });
      const g = await granularity(img, BITMAP);
      const bits = granules(await img.bitmapExtents(BITMAP), g);
      const prune = await repo.lock('exclusive', 'a prune, say');
      try {
        await expectKscError(backupDevice(img, repo), 'KSC_E_LOCKED', 'backup while an exclusive lock is held');
      } finally {
        await prune.release();
      }
      expect(img.hasBitmap(BITMAP + FROZEN_SUFFIX), 'a frozen bitmap was left behind').toBe(false);
      expect(sorted(granules(await img.bitmapExtents(BITMAP), g))).toEqual(sorted(bits));
      const b2 = await backupDevice(img, repo);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.parent).toBe(b1.id);
      expect(b2.chunksDirty).toBe(chunksOf(w, C).size);
      const s2 = await contents(img);
      await expectRestores(repo, b2.id, join(dir, 'spec-locked-restored.raw'), s2, 'restore after the locked attempt');
    } finally {
      await img.close();
    }
  });
});
