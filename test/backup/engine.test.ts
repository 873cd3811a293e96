/**
 * Backup and restore engines on a local-folder repository: backup → modify → incremental → restore round
 * trips on small ksc_inc disks (a sparse raw base with random regions, a ksc_inc overlay, seeded random
 * changes), every restored point compared byte for byte with the image contents read through the library
 * right after its backup. Also: what an incremental reads, --full, raw disks, ksc_inc output, restoring
 * over an existing file, holes for zero chunks, dedupe across disks, and "latest" with several disks.
 */
import { statSync, copyFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { createImage, openImage, openKsc } from '../../src/image/open.js';
import { RawDevice } from '../../src/image/raw.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import {
  MiB,
  KiB,
  chunkLen,
  expectRestores,
  chunksOf,
  contents,
  differingChunks,
  expectKscError,
  expectSame,
  makeDisk,
  newRepo,
  randomChanges,
  readImage,
  writeFile,
  writeRawRegions,
  zeroChunks,
} from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-engine-');
const seed = seedFor('test/backup/engine.test.ts');
const root = new Rng(seed);
const C = MiB;
afterAll(() => closePool());

describe('backup → change → incremental → restore', () => {
  it('every point restores exactly; an incremental reads exactly the chunks the bitmap marks', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'repo1'));
    const path = await makeDisk(dir, 'rt', rng, { size: 64 * MiB, baseSize: 56 * MiB - 5000, baseRegions: 10, maxRegion: 4 * MiB });
    const img = await openKsc(path, { write: true });
    const points: { id: string; data: Buffer }[] = [];
    const stored = { chunks: 0, bytes: 0 };
    const count = <T extends { chunksNew: number; bytesStored: number }>(r: T): T => {
      stored.chunks += r.chunksNew;
      stored.bytes += r.bytesStored;
      return r;
    };
    try {
      // 1: the first backup is full (the bitmap did not exist), and reads every chunk holding data.
      const b1 = count(await backupDevice(img, repo));
      expect(b1.full).toBe(true);
      expect(b1.fullReason).toMatch(/did not exist/);
      expect(b1.parent).toBeNull();
      const s1 = await contents(img);
      const nonZero1 = b1.chunks - zeroChunks(s1).length;
      expect(b1.chunks).toBe(64);
      expect(b1.chunksDirty).toBeGreaterThanOrEqual(nonZero1);
      expect(b1.bytesRead).toBe(b1.chunksDirty * C);
      expect(b1.chunksNew).toBe(nonZero1); // random regions: no two non-zero chunks are equal
      points.push({ id: b1.id, data: s1 });
      expect(img.hasBitmap('backup')).toBe(true);

      // 2: data writes only: every touched chunk holds data, so the incremental reads exactly those.
      // (Packed on this thread; step 3 uses the workers: both paths feed the same checks and restores.)
      const w2 = await randomChanges(img, rng, 40, { dataOnly: true });
      const d2 = chunksOf(w2, C);
      const b2 = count(await backupDevice(img, repo, { inlineBytes: 64 * MiB }));
      const s2 = await contents(img);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.fullReason).toBeNull();
      expect(b2.parent).toBe(b1.id);
      expect(b2.chunksDirty).toBe(d2.size);
      expect(b2.bytesRead).toBe([...d2].reduce((s, k) => s + chunkLen(img.size, C, k), 0));
      expect(b2.chunksNew).toBeLessThanOrEqual(d2.size);
      expect(b2.chunksNew).toBe(differingChunks(s1, s2).filter((k) => !s2.subarray(k * C, (k + 1) * C).every((x) => x === 0)).length);
      points.push({ id: b2.id, data: s2 });

      // 3: writes, zeroes and discards: chunks that hold data after the changes are read, no others.
      const w3 = await randomChanges(img, rng, 30);
      const d3 = chunksOf(w3, C);
      const b3 = count(await backupDevice(img, repo, { inlineBytes: 0 }));
      const s3 = await contents(img);
      expect(b3.full).toBe(false);
      expect(b3.parent).toBe(b2.id);
      const z3 = new Set(zeroChunks(s3));
      expect(b3.chunksDirty).toBeLessThanOrEqual(d3.size);
      expect(b3.chunksDirty).toBeGreaterThanOrEqual([...d3].filter((k) => !z3.has(k)).length);
      points.push({ id: b3.id, data: s3 });

      // 4: nothing changed: nothing read, nothing stored.
      const b4 = count(await backupDevice(img, repo));
      expect(b4.full).toBe(false);
      expect(b4.parent).toBe(b3.id);
      expect([b4.chunksDirty, b4.bytesRead, b4.chunksNew, b4.bytesUploaded]).toEqual([0, 0, 0, 0]);
      points.push({ id: b4.id, data: s3 });
    } finally {
      await img.close();
    }
    for (const [i, p] of points.entries()) {
      const target = join(dir, `rt-${i}.raw`);
      const r = await restoreBackup(repo, p.id, target);
      expect(r.backup).toBe(p.id);
      expect(r.chunksZero).toBe(zeroChunks(p.data).length);
      expectSame(await readImage(target), p.data, `restore of point ${i + 1} (${p.id})`);
    }
    const latest = await restoreBackup(repo, 'latest', join(dir, 'rt-latest.raw'));
    expect(latest.backup).toBe(points[3]!.id);
    // verify reads every stored blob once: every blob is some backup's (nothing pruned), packs hold no gaps.
    const v = await verifyRepo(repo);
    expect(v.ok).toBe(true);
    expect(v.chunksChecked).toBe(stored.chunks);
    expect(v.bytesRead).toBe(stored.bytes);
  });

  it('many dirty chunks: the map is asked which hold data (discarded ones are not read); a few: all are read', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'repo-dirty-map'));
    const path = await makeDisk(dir, 'dirtymap', rng, { size: 160 * MiB });
    const img = await openKsc(path, { write: true });
    try {
      await img.write(0, rng.bytes(150 * MiB));
      const b1 = await backupDevice(img, repo);
      expect(b1.chunksDirty).toBe(150);
      // 100 dirty chunks (over the direct-read limit): 90 discarded whole, 10 rewritten.
      await img.discard(10 * MiB, 90 * MiB);
      await img.write(120 * MiB, rng.bytes(10 * MiB));
      const b2 = await backupDevice(img, repo);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.chunksDirty).toBe(10); // the 90 holes were skipped
      const s2 = await contents(img);
      // 5 dirty chunks: 3 discarded, 2 rewritten — all 5 read (holes read as zeros), the same result.
      await img.discard(130 * MiB, 3 * MiB);
      await img.write(140 * MiB, rng.bytes(2 * MiB));
      const b3 = await backupDevice(img, repo);
      expect(b3.full).toBe(false);
      expect(b3.chunksDirty).toBe(5);
      expect(b3.chunksNew).toBe(2);
      const s3 = await contents(img);
      for (const [b, data] of [
        [b2, s2],
        [b3, s3],
      ] as const) {
        const target = join(dir, `dirtymap-${b.id}.raw`);
        await expectRestores(repo, b.id, target, data, `restore of ${b.id}`);
      }
    } finally {
      await img.close();
    }
  });

  it('--full reads every data chunk but stores nothing already there; the next backup is incremental again', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'repo-full'));
    const path = await makeDisk(dir, 'full', rng, { size: 64 * MiB, baseSize: 64 * MiB, baseRegions: 6, maxRegion: 5 * MiB });
    const img = await openKsc(path, { write: true });
    try {
      const b1 = await backupDevice(img, repo);
      const w = await randomChanges(img, rng, 10, { dataOnly: true });
      const s2 = await contents(img);
      const b2 = await backupDevice(img, repo, { full: true });
      expect(b2.full).toBe(true);
      expect(b2.fullReason).toMatch(/full backup was asked/);
      expect(b2.parent).toBeNull();
      expect(b2.chunksDirty).toBeGreaterThanOrEqual(b2.chunks - zeroChunks(s2).length);
      expect(b2.chunksDirty).toBeGreaterThan(b1.chunksDirty - 1);
      // Only the chunks the writes changed are new.
      const changed = chunksOf(w, C);
      expect(b2.chunksNew).toBeLessThanOrEqual(changed.size);
      expect(b2.chunksNew).toBeGreaterThan(0);
      const b3 = await backupDevice(img, repo);
      expect(b3.full).toBe(false);
      expect(b3.parent).toBe(b2.id);
      expect(b3.chunksDirty).toBe(0);
      await expectRestores(repo, b2.id, join(dir, 'full-2.raw'), s2, 'restore of the --full backup');
    } finally {
      await img.close();
    }
  });

  it('a raw disk is always backed up in full, and says why', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'repo-raw'));
    const path = join(dir, 'plain.raw');
    writeRawRegions(path, 48 * MiB + 12345, rng, 6, 4 * MiB);
    const dev = await RawDevice.open(path, { write: true });
    try {
      const b1 = await backupDevice(dev, repo);
      expect(b1.full).toBe(true);
      expect(b1.fullReason).toMatch(/raw disk/);
      expect(b1.chunks).toBe(49);
      const s1 = await contents(dev);
      await randomChanges(dev, rng, 5, { dataOnly: true, maxLen: 64 * KiB });
      const s2 = await contents(dev);
      const b2 = await backupDevice(dev, repo);
      expect(b2.full).toBe(true);
      expect(b2.fullReason).toMatch(/raw disk/);
      expect(b2.parent).toBeNull();
      expect(b2.chunksNew).toBe(differingChunks(s1, s2).length);
      expect(b2.disk).toBe(b1.disk); // §7.4: derived from the path
      for (const [id, data, name] of [
        [b1.id, s1, 'raw-1'],
        [b2.id, s2, 'raw-2'],
      ] as const) {
        await expectRestores(repo, id, join(dir, `${name}.out`), data, `restore of ${name}`);
      }
    } finally {
      await dev.close();
    }
  });

  it('restores to a new ksc_inc image (same disk UUID, zero chunks unallocated) and into existing files writing only what differs', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'repo-out'));
    const path = await makeDisk(dir, 'out', rng, { size: 64 * MiB, baseSize: 60 * MiB, baseRegions: 8, maxRegion: 3 * MiB });
    const img = await openKsc(path, { write: true });
    let s1: Buffer, s2: Buffer, id1: string, id2: string, uuid: string;
    try {
      const b1 = await backupDevice(img, repo);
      s1 = await contents(img);
      await randomChanges(img, rng, 25);
      const b2 = await backupDevice(img, repo);
      s2 = await contents(img);
      [id1, id2, uuid] = [b1.id, b2.id, b1.disk];
    } finally {
      await img.close();
    }
    // ksc_inc output.
    const kOut = join(dir, 'out-1.ksc');
    const rk = await restoreBackup(repo, id1, kOut, { format: 'ksc_inc' });
    expect(rk.format).toBe('ksc_inc');
    const k = await openKsc(kOut);
    try {
      expectSame(await contents(k), s1, 'ksc_inc restore');
      const hex = uuid.replace(/-/g, '');
      expect(k.diskUuid.toString('hex')).toBe(hex);
      const zeros = new Set(zeroChunks(s1));
      for (const e of await k.extents(0, k.size)) {
        if (e.state !== 'data') continue;
        for (const c of chunksOf([e], C)) expect(zeros.has(c), `zero chunk ${c} is allocated in the ksc_inc output`).toBe(false);
      }
    } finally {
      await k.close();
    }

    // Over an existing raw file holding backup 1: only chunks that differ from backup 2 are written.
    const raw = join(dir, 'out-over.raw');
    await restoreBackup(repo, id1, raw);
    const diff = differingChunks(s1, s2);
    expect(diff.length).toBeGreaterThan(0);
    const r2 = await restoreBackup(repo, id2, raw);
    expect(r2.chunksUnchanged).toBe(r2.chunks - diff.length);
    expect(r2.bytesWritten).toBe(diff.reduce((s, k) => s + chunkLen(s2.length, C, k), 0));
    expect(r2.chunksFetched).toBeLessThanOrEqual(diff.length);
    expectSame(await readImage(raw), s2, 'restore of backup 2 over backup 1 (raw)');
    // Same again: nothing to do.
    const r3 = await restoreBackup(repo, id2, raw);
    expect([r3.chunksUnchanged, r3.bytesWritten, r3.chunksFetched]).toEqual([r3.chunks, 0, 0]);
    // And back to backup 1, over the ksc_inc image of backup 1 after scribbling on it.
    const dev = await openImage(kOut, { write: true });
    const scribble = [
      { offset: 3 * MiB + 77, length: 5000 },
      { offset: 40 * MiB, length: 2 * MiB },
    ];
    try {
      for (const s of scribble) await dev.write(s.offset, rng.bytes(s.length));
    } finally {
      await dev.close();
    }
    const r4 = await restoreBackup(repo, id1, kOut);
    expect(r4.format).toBe('ksc_inc');
    expect(r4.chunksUnchanged).toBe(r4.chunks - chunksOf(scribble, C).size);
    expectSame(await readImage(kOut), s1, 'restore of backup 1 over a changed ksc_inc image');
  });

  it('zero chunks are holes in a new raw target', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'repo-holes'));
    // A disk that is mostly zeros: a few random regions, and one region of written zeros (data in the image).
    const path = await makeDisk(dir, 'holes', rng, { size: 128 * MiB, baseSize: 128 * MiB, baseRegions: 4, maxRegion: 2 * MiB });
    const img = await openKsc(path, { write: true });
    let s: Buffer;
    let id: string;
    try {
      await img.write(100 * MiB, Buffer.alloc(8 * MiB)); // explicit zeros: chunks with data that are zero
      id = (await backupDevice(img, repo)).id;
      s = await contents(img);
    } finally {
      await img.close();
    }
    const target = join(dir, 'holes-out.raw');
    const r = await restoreBackup(repo, id, target);
    const zeros = zeroChunks(s);
    expect(r.chunksZero).toBe(zeros.length);
    expect(zeros.length).toBeGreaterThan(100);
    const st = statSync(target);
    expect(st.size).toBe(128 * MiB);
    const allocated = st.blocks * 512;
    const nonZeroBytes = (r.chunks - zeros.length) * C;
    // ext4 may preallocate a little around scattered writes (seen: +412 KiB for 5 chunks); what matters is
    // that the > 100 MiB of zero chunks take no space.
    expect(allocated, `allocated ${allocated} bytes for ${r.chunks - zeros.length} non-zero chunks`).toBeLessThanOrEqual(nonZeroBytes + 2 * MiB);
    expectSame(await readImage(target), s, 'restore of a mostly-zero disk');
  });

  it('a chunk repeated at many positions is stored and fetched once and written at every one (small reads too)', async () => {
    const rng = root.fork();
    const repo = await newRepo(join(dir, 'repo-repeat'), { packSize: 4 * MiB });
    const raw = join(dir, 'repeat.raw');
    const size = 40 * MiB + 4096;
    const patterns = Array.from({ length: 3 }, () => {
      const b = Buffer.alloc(C);
      for (let i = 0; i < b.length; i += 4096) b.writeUInt32LE(rng.int(1, 0xffffffff), i + rng.int(0, 1023) * 4);
      return b;
    });
    const data = Buffer.alloc(size);
    const used = new Map<number, number>();
    for (let k = 0; k * C < size; k++) {
      const pick = rng.int(0, 4); // 0-2: one of three patterns; 3: zeros; 4: unique data
      const len = Math.min(C, size - k * C);
      if (pick < 3 && len === C) {
        patterns[pick]!.copy(data, k * C);
        used.set(pick, (used.get(pick) ?? 0) + 1);
      } else if (pick === 4) for (let i = 0; i < len; i += 512) data.writeUInt32LE(rng.int(1, 0xffffffff), k * C + i);
    }
    writeFile(raw, data);
    const dev = await openImage(raw);
    let b: Awaited<ReturnType<typeof backupDevice>>;
    try {
      b = await backupDevice(dev, repo);
    } finally {
      await dev.close();
    }
    const distinct = new Set<string>();
    for (let k = 0; k * C < size; k++) {
      const c = data.subarray(k * C, Math.min(size, (k + 1) * C));
      if (c.some((x) => x !== 0)) distinct.add(createHash('sha256').update(c).digest('hex'));
    }
    expect(
      [...used.values()].some((n) => n > 1),
      'the disk repeats a chunk',
    ).toBe(true);
    expect(b.chunksNew).toBe(distinct.size);
    for (const maxReadBytes of [1, 300 * KiB, 4 * MiB]) {
      const out = join(dir, `repeat-${maxReadBytes}.raw`);
      const r = await restoreBackup(repo, b.id, out, { maxReadBytes, concurrency: 3 });
      expect(r.chunksFetched, `maxReadBytes ${maxReadBytes}`).toBe(b.chunksNew);
      expectSame(await readImage(out), data, `restore with reads of at most ${maxReadBytes} bytes`);
    }
    // verify reads every stored blob once (one backup, packs holding only its chunks: no gaps to skip).
    const v = await verifyRepo(repo);
    expect(v.ok).toBe(true);
    expect(v.chunksChecked).toBe(b.chunksNew);
    expect(v.bytesRead).toBe(b.bytesStored);
    // Over an existing file that differs everywhere but in one repeated chunk.
    const over = join(dir, 'repeat-over.raw');
    writeFile(over, Buffer.alloc(size, 0x5a));
    // Not restored by kscinc: overwritten only on purpose (§9.5).
    await expect(restoreBackup(repo, b.id, over)).rejects.toThrow(/not a copy of disk.*option force/);
    await restoreBackup(repo, b.id, over, { force: true });
    expectSame(await readImage(over), data, 'restore over an existing file');
  });

  it('dedupes across two disks with equal contents; "latest" then needs --disk', async () => {
    const rng = root.fork();
    const repoDir = join(dir, 'repo-dedupe');
    const repo = await newRepo(repoDir);
    const a = await makeDisk(dir, 'twinA', rng, { size: 64 * MiB, baseSize: 64 * MiB, baseRegions: 8, maxRegion: 4 * MiB });
    // Twin B: a copy of A's base under another overlay (another disk UUID), then the same writes.
    copyFileSync(join(dir, 'twinA-base.raw'), join(dir, 'twinB.raw'));
    const b = join(dir, 'twinB.ksc');
    await createImage(b, { size: 64 * MiB, blockSize: 64 * KiB, backing: join(dir, 'twinB.raw'), backingFormat: 'raw' });
    const writes = rng.fork();
    const imgA = await openKsc(a, { write: true });
    const imgB = await openKsc(b, { write: true });
    try {
      await randomChanges(imgA, writes.fork(), 10, { dataOnly: true });
      const ra = await backupDevice(imgA, repo);
      const sa = await contents(imgA);
      // The same writes on B: copy what A's overlay holds.
      const copy = await contents(imgA);
      for (const e of await imgA.extents(0, imgA.size)) if (e.state === 'data' && e.depth === 0) await imgB.write(e.offset, copy.subarray(e.offset, e.offset + e.length));
      const sb = await contents(imgB);
      expectSame(sb, sa, 'the twins hold the same bytes');
      const rb = await backupDevice(imgB, repo);
      expect(rb.disk).not.toBe(ra.disk);
      expect(ra.chunksNew).toBeGreaterThan(0);
      expect(rb.chunksNew).toBe(0);
      expect(rb.bytesNew).toBe(0);
      expect(rb.bytesUploaded).toBe(0);
      expect(rb.bytesRead).toBeGreaterThan(0);

      // "latest" is ambiguous now.
      const err = await expectKscError(restoreBackup(repo, 'latest', join(dir, 'twin-latest.raw')), 'KSC_E_INVALID', 'latest with two disks');
      expect(err.message).toMatch(/option disk/); // the library names its option; the CLI its flag
      const cli = kscinc(['restore', 'latest', join(dir, 'twin-cli.raw'), '--repo', repoDir]);
      expect(cli.code).not.toBe(0);
      expect(cli.stderr).toMatch(/--disk/);
      const r = await restoreBackup(repo, 'latest', join(dir, 'twin-a.raw'), { disk: ra.disk });
      expect(r.backup).toBe(ra.id);
      expectSame(await readImage(join(dir, 'twin-a.raw')), sa, 'latest of disk A');
      const cliB = kscinc(['restore', 'latest', join(dir, 'twin-b.raw'), '--repo', repoDir, '--disk', rb.disk, '--json']);
      expect(cliB.code, cliB.stderr).toBe(0);
      expect(JSON.parse(cliB.stdout).backup).toBe(rb.id);
      expectSame(await readImage(join(dir, 'twin-b.raw')), sb, 'latest of disk B through the CLI');
    } finally {
      await imgA.close();
      await imgB.close();
    }
  });
});
