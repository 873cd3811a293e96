/**
 * Repository chunk sizes from 64 KiB to 4 MiB (formats/repository.md §3, issue 19): backup → change →
 * incremental → restore round trips, verify and prune at 64 KiB, 256 KiB and 4 MiB on the folder store;
 * a scattered-1% incremental at 64 KiB reads and stores about the changed bytes (16× less than at 1 MiB);
 * sizes outside the range or not a power of two are refused with a clear error, in `repo init`, in a config
 * and in a manifest header.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { FsStore } from '../../src/objstore/fs.js';
import { Repository } from '../../src/repo/repository.js';
import { ChunkList } from '../../src/repo/chunklist.js';
import { decodeManifest, encodeManifest } from '../../src/repo/manifest.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { KiB, MiB, contents, expectKscError, expectSame, makeDisk, newRepo, openRepo, randomChanges, readImage, zeroChunks } from './helpers/fixtures.js';

const dir = tempDir('kscinc-chunk-sizes-');
const seed = seedFor('test/backup/chunk-sizes.test.ts');
const root = new Rng(seed);
afterAll(() => closePool());

describe('chunk sizes 64 KiB … 4 MiB', () => {
  for (const C of [64 * KiB, 256 * KiB, 4 * MiB]) {
    it(`${C / KiB} KiB: full, incremental, restore of both, verify, prune, restore again (seed ${seed})`, async () => {
      const rng = root.fork();
      const repoDir = join(dir, `rt-${C}`);
      const repo = await newRepo(repoDir, { chunkSize: C });
      expect(repo.chunkSize).toBe(C);
      // Not a multiple of the chunk size: the last chunk is short.
      const size = 20 * MiB + 4 * C - 64 * KiB;
      const path = await makeDisk(dir, `rt-${C}`, rng, { size, baseSize: size - 3 * MiB - 5000, baseRegions: 10, maxRegion: 2 * MiB });
      const img = await openKsc(path, { write: true });
      const points: { id: string; data: Buffer }[] = [];
      try {
        const b1 = await backupDevice(img, repo);
        expect(b1.full).toBe(true);
        expect(b1.chunks).toBe(Math.ceil(size / C));
        points.push({ id: b1.id, data: await contents(img) });
        await randomChanges(img, rng, 25, { maxLen: 200 * KiB });
        const b2 = await backupDevice(img, repo);
        expect(b2.full, String(b2.fullReason)).toBe(false);
        expect(b2.parent).toBe(b1.id);
        points.push({ id: b2.id, data: await contents(img) });
      } finally {
        await img.close();
      }
      for (const [i, p] of points.entries()) {
        const target = join(dir, `rt-${C}-${i}.raw`);
        const r = await restoreBackup(repo, p.id, target);
        expect(r.chunksZero).toBe(zeroChunks(p.data, C).length);
        expectSame(await readImage(target), p.data, `restore of point ${i + 1} at chunk size ${C}, seed ${seed}`);
      }
      expect((await verifyRepo(repo)).ok).toBe(true);
      const pr = await pruneRepo(repo, { last: 1, graceMs: 0 });
      expect(pr.removed).toEqual([points[0]!.id]);
      const again = await openRepo(repoDir);
      expect((await verifyRepo(again)).ok).toBe(true);
      const target = join(dir, `rt-${C}-after-prune.raw`);
      await restoreBackup(again, 'latest', target);
      expectSame(await readImage(target), points[1]!.data, `restore after prune at chunk size ${C}, seed ${seed}`);
    });
  }

  it('a scattered-1% incremental at 64 KiB reads and stores about the changed bytes (at 1 MiB: about 16× more)', async () => {
    const rng = root.fork();
    const size = 96 * MiB;
    const blocks = size / (64 * KiB);
    const changed = Math.round(blocks * 0.01);
    const data = rng.bytes(size);
    // The same rewritten blocks at both chunk sizes.
    const picks = new Set<number>();
    while (picks.size < changed) picks.add(rng.int(0, blocks - 1));
    const results: Record<number, { bytesRead: number; bytesStored: number; chunksDirty: number }> = {};
    for (const C of [64 * KiB, MiB]) {
      const repo = await newRepo(join(dir, `scatter-${C}`), { chunkSize: C });
      const path = await makeDisk(dir, `scatter-${C}`, new Rng(1), { size });
      const img = await openKsc(path, { write: true });
      try {
        await img.write(0, data);
        await backupDevice(img, repo);
        for (const b of picks) await img.write(b * 64 * KiB, rng.bytes(64 * KiB));
        const r = await backupDevice(img, repo);
        expect(r.full, String(r.fullReason)).toBe(false);
        results[C] = r;
      } finally {
        await img.close();
      }
    }
    const bytesChanged = changed * 64 * KiB;
    const small = results[64 * KiB]!;
    // Exactly the rewritten blocks are read; stored: their (incompressible) bytes plus blob headers, tags.
    expect(small.chunksDirty, `seed ${seed}`).toBe(changed);
    expect(small.bytesRead).toBe(bytesChanged);
    expect(small.bytesStored).toBeGreaterThanOrEqual(bytesChanged);
    expect(small.bytesStored).toBeLessThanOrEqual(bytesChanged + changed * 128);
    // At 1 MiB each dirty block costs its whole chunk (fewer when two share one).
    const big = results[MiB]!;
    expect(big.bytesRead).toBeGreaterThan(8 * bytesChanged);
    expect(big.bytesStored).toBeGreaterThan(8 * bytesChanged);
  });

  it('a bitmap granule larger than the chunk (256 KiB blocks, 64 KiB chunks) still gives incrementals: each dirty granule reads its chunks', async () => {
    const rng = root.fork();
    const C = 64 * KiB;
    const repo = await newRepo(join(dir, 'granule'), { chunkSize: C });
    const size = 16 * MiB;
    const path = await makeDisk(dir, 'granule', rng, { size, blockSize: 256 * KiB });
    const img = await openKsc(path, { write: true });
    try {
      await img.write(0, rng.bytes(size));
      const b1 = await backupDevice(img, repo);
      expect(b1.full).toBe(true);
      expect(img.bitmapInfo('backup')!.granularity).toBe(256 * KiB);
      // Two writes of 4 KiB inside two granules: 4 chunks each are dirty.
      await img.write(1 * MiB + 8192, rng.bytes(4096));
      await img.write(9 * MiB + 300 * KiB, rng.bytes(4096));
      const b2 = await backupDevice(img, repo);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.chunksDirty).toBe(8);
      expect(b2.bytesRead).toBe(8 * C);
      expect(b2.chunksNew).toBe(2);
      const target = join(dir, 'granule.raw');
      await restoreBackup(repo, b2.id, target);
      expectSame(await readImage(target), await contents(img), `restore, seed ${seed}`);
    } finally {
      await img.close();
    }
  });

  it('at 64 KiB the bounded-memory dedupe (Bloom filter, windows of chunks) gives the manifest of the exact one and restores (repository.md §3.2 rule 5)', async () => {
    const rng = root.fork();
    const C = 64 * KiB;
    const size = 24 * MiB;
    const path = await makeDisk(dir, 'filter64', rng, { size });
    const img = await openKsc(path, { write: true });
    try {
      // Random data with repeats: a quarter of the chunks copy another, so dedupe has work in both modes.
      const data = rng.bytes(size);
      for (let k = 0; k < size / C; k += 4) data.copy(data, k * C, 0, C);
      await img.write(0, data);
      // Unencrypted: chunk ids (so Merkle roots) are then the same in both repositories (§2).
      const exactRepo = await newRepo(join(dir, 'filter64-exact'), { chunkSize: C, encrypt: false });
      const exact = await backupDevice(img, exactRepo, { bitmap: null });
      const repo = await newRepo(join(dir, 'filter64-filter'), { chunkSize: C, encrypt: false });
      const filtered = await backupDevice(img, repo, { bitmap: null, exactIds: 0, windowChunks: 16, batchBytes: 4 * C });
      expect([exact.dedupe, filtered.dedupe]).toEqual(['exact', 'filter']);
      expect(filtered.chunksNew).toBe(exact.chunksNew);
      expect(filtered.chunksNew).toBe(size / C - size / C / 4 + 1);
      expect((await repo.readManifest(filtered.id)).root.toString('hex')).toBe((await exactRepo.readManifest(exact.id)).root.toString('hex'));
      const target = join(dir, 'filter64.raw');
      await restoreBackup(repo, filtered.id, target);
      expectSame(await readImage(target), data, `restore, seed ${seed}`);
      expect((await verifyRepo(repo)).ok).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('refuses sizes outside 64 KiB … 4 MiB or not a power of two, in repo init, a config and a manifest', async () => {
    for (const bad of [32 * KiB, 8 * MiB, 3 * 64 * KiB, 0]) {
      const e = await expectKscError(Repository.init(await FsStore.open(join(dir, `bad-${bad}`), { create: true }), { chunkSize: bad }), 'KSC_E_INVALID', `chunk size ${bad}`);
      expect(e.message).toMatch(new RegExp(`chunk size ${bad} must be a power of two from 64 KiB to 4 MiB`));
    }
    for (const [arg, shown] of [
      ['32K', '32768'],
      ['8M', '8388608'],
      ['96K', '98304'],
    ]) {
      const r = kscinc(['repo', 'init', join(dir, `bad-cli-${arg}`), '--chunk-size', arg, '--no-encrypt']);
      expect(r.code, r.stderr).not.toBe(0);
      expect(r.stderr).toMatch(new RegExp(`chunk size ${shown} must be a power of two from 64 KiB to 4 MiB`));
    }
    const ok = kscinc(['repo', 'init', join(dir, 'cli-64k'), '--chunk-size', '64K', '--no-encrypt']);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/chunk size 64(\.0)? KiB/);
    // A config saying 32 KiB is refused on open, naming the object.
    const cfgPath = join(dir, 'cli-64k', 'config');
    const cfg = JSON.parse(readFileSync(cfgPath, 'utf8')) as { chunkSize: number };
    writeFileSync(cfgPath, JSON.stringify({ ...cfg, chunkSize: 32 * KiB }));
    const e = await expectKscError(openRepo(join(dir, 'cli-64k')), 'KSC_E_CORRUPT', 'config of 32 KiB');
    expect(e.message).toMatch(/config.*chunkSize 32768 is not a power of two from 64 KiB to 4 MiB/);
    // A manifest header (§7.2 bytes 48 … 51) of 64 KiB reads; of 32 KiB or 96 KiB it is refused, named.
    const meta = { id: '20261126T120000000Z-0000abcd', parent: null, tags: [], source: 'd', bitmap: null, stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksDirty: 0, durationMs: 0 } };
    const m = (chunkSize: number) =>
      encodeManifest({ full: true, disk: '6b736369-6e63-4000-8000-000000000001', timeMs: 1, size: 3 * chunkSize, chunkSize, bitmapToken: null, meta, ids: new ChunkList(3) });
    expect(decodeManifest(m(64 * KiB), 'm64').chunkSize).toBe(64 * KiB);
    for (const bad of [32 * KiB, 96 * KiB]) {
      let err: unknown = null;
      try {
        decodeManifest(m(bad), `m${bad}`);
      } catch (x) {
        err = x;
      }
      expect(String(err)).toMatch(new RegExp(`m${bad}.*chunk size ${bad} is not a power of two from 64 KiB to 4 MiB`));
      expect((err as { code?: string }).code).toBe('KSC_E_CORRUPT');
    }
  });
});
