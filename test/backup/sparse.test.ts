/**
 * A sparse 16 TiB disk (the format's largest) backed up, changed, backed up incrementally, restored and
 * verified inside a test: the chunk lists hold only the segments with non-zero ids (formats/repository.md
 * §7.5), so none of this is proportional to the virtual size. A flat list would be 256 MiB per manifest.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { createImage, openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { SEGMENT_IDS } from '../../src/repo/chunklist.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, newRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-sparse-');
const seed = seedFor('test/backup/sparse.test.ts');
const TiB = 1024 * 1024 * MiB;
const C = MiB;
afterAll(() => closePool());

describe('a sparse 16 TiB disk', () => {
  it('backs up, increments and restores with chunk lists of only the non-zero segments', async () => {
    const rng = new Rng(seed);
    const size = 16 * TiB;
    const chunks = size / C;
    const repo = await newRepo(join(dir, 'repo'));
    const path = join(dir, 'big.ksc');
    await createImage(path, { size });
    const segOf = (offset: number): number => Math.floor(offset / C / SEGMENT_IDS);
    // Writes of up to 2 MiB at random places (and the very end), each inside one segment's range.
    const writes = (n: number): { offset: number; data: Buffer }[] => {
      const out = [{ offset: size - 3 * MiB, data: rng.bytes(3 * MiB) }];
      for (let i = 0; i < n; i++) {
        const len = rng.int(1, 2 * MiB);
        const offset = rng.int(0, size / MiB - 3) * MiB + rng.int(0, MiB - 1);
        out.push({ offset, data: rng.bytes(len) });
      }
      return out;
    };
    const state = new Map<number, Buffer>(); // offset -> data, applied in order
    const w1 = writes(6);
    const img = await openKsc(path, { write: true });
    let b1: Awaited<ReturnType<typeof backupDevice>>;
    let b2: Awaited<ReturnType<typeof backupDevice>>;
    const w2 = writes(5).slice(1);
    try {
      for (const w of w1) await img.write(w.offset, w.data);
      b1 = await backupDevice(img, repo);
      expect(b1.full).toBe(true);
      for (const w of w2) await img.write(w.offset, w.data);
      b2 = await backupDevice(img, repo);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.parent).toBe(b1.id);
    } finally {
      await img.close();
    }
    for (const w of [...w1, ...w2]) state.set(w.offset, w.data);

    // The lists: 256 segments each, allocated only where writes landed.
    const m1 = await repo.readManifest(b1.id);
    const m2 = await repo.readManifest(b2.id);
    expect(m1.ids.length).toBe(chunks);
    expect(m1.ids.segmentCount).toBe(256);
    const segs1 = new Set(w1.flatMap((w) => [segOf(w.offset), segOf(w.offset + w.data.length - 1)]));
    const segs2 = new Set([...segs1, ...w2.flatMap((w) => [segOf(w.offset), segOf(w.offset + w.data.length - 1)])]);
    expect(m1.ids.allocatedSegments()).toBe(segs1.size);
    expect(m2.ids.allocatedSegments()).toBe(segs2.size);
    expect(m2.ids.allocatedSegments()).toBeLessThan(16);
    let nonZero = 0;
    m2.ids.forEachNonZero(() => void nonZero++);
    expect(nonZero).toBe(m2.ids.nonZeroCount());
    expect(nonZero).toBeLessThanOrEqual(b1.chunksDirty + b2.chunksDirty);

    // Restore the increment to a new ksc_inc image, then the full point over it (an existing target).
    const out = join(dir, 'restored.ksc');
    const r2 = await restoreBackup(repo, b2.id, out, { format: 'ksc_inc' });
    expect(r2.chunks).toBe(chunks);
    expect(r2.chunksZero).toBe(chunks - m2.ids.nonZeroCount());
    const check = async (writesApplied: { offset: number; data: Buffer }[], what: string): Promise<void> => {
      const expected = new Map<number, Buffer>();
      for (const w of writesApplied) expected.set(w.offset, w.data);
      const r = await openKsc(out);
      try {
        // Every written range reads back as the last write there left it (ranges are compared in write order).
        const touched = new Set<number>();
        for (const w of writesApplied) {
          const k0 = Math.floor(w.offset / C),
            k1 = Math.floor((w.offset + w.data.length - 1) / C);
          for (let k = k0; k <= k1; k++) touched.add(k);
        }
        for (const k of touched) {
          const want = Buffer.alloc(Math.min(C, size - k * C));
          for (const w of writesApplied) {
            const s = Math.max(w.offset, k * C),
              e = Math.min(w.offset + w.data.length, k * C + want.length);
            if (s < e) w.data.copy(want, s - k * C, s - w.offset, e - w.offset);
          }
          expect((await r.read(k * C, want.length)).equals(want), `${what}: chunk ${k} (seed ${seed})`).toBe(true);
        }
        // Data only where the backup has non-zero chunks.
        for (const e of await r.extents(0, size)) {
          if (e.state !== 'data') continue;
          for (let k = Math.floor(e.offset / C); k <= Math.floor((e.offset + e.length - 1) / C); k++) {
            expect(touched.has(k), `${what}: chunk ${k} is allocated but was never written`).toBe(true);
          }
        }
        for (let i = 0; i < 8; i++) {
          const k = rng.int(0, chunks - 1);
          if (!touched.has(k)) expect((await r.read(k * C, C)).equals(Buffer.alloc(C)), `${what}: chunk ${k} reads zeros`).toBe(true);
        }
      } finally {
        await r.close();
      }
    };
    await check([...w1, ...w2], 'restore of the increment');
    const r1 = await restoreBackup(repo, b1.id, out);
    expect(r1.chunksUnchanged + r1.chunksFetched).toBeGreaterThan(chunks - 100);
    expect(r1.chunksFetched).toBeLessThanOrEqual(w2.length * 3);
    await check(w1, 'restore of the full point over the increment');

    const v = await verifyRepo(repo);
    expect(v.ok, JSON.stringify(v.damage)).toBe(true);
    expect(v.backupsChecked).toBe(2);
    const p = await pruneRepo(repo, { last: 1 });
    expect(p.removed).toEqual([b1.id]);
    expect(p.chunksMissing).toBe(0);
    expect((await verifyRepo(repo)).ok).toBe(true);
  }, 60_000);
});
