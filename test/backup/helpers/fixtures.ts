/**
 * Shared fixtures of the backup tests: local-folder repositories, small ksc_inc disks (a sparse raw base
 * with random regions and an overlay on it), seeded random writes that record which chunks they touched,
 * and exact comparisons of restored files against the image contents recorded at backup time.
 */
import { readdirSync, statSync, writeFileSync, openSync, closeSync, writeSync, ftruncateSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { FsStore } from '../../../src/objstore/fs.js';
import type { ObjectStore } from '../../../src/objstore/types.js';
import { Repository } from '../../../src/repo/repository.js';
import { restoreBackup } from '../../../src/engines/restore.js';
import { createImage, openImage, openKsc } from '../../../src/image/open.js';
import type { KscImage } from '../../../src/image/ksc.js';
import type { BlockDevice } from '../../../src/image/types.js';
import { isKscError } from '../../../src/errors.js';
import type { Rng } from '../../helpers/rng.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

/**
 * A fresh repository in `dir` (4 MiB packs so that small disks still make several): encrypted, the default
 * (the test environment's password, test/setup-password.ts), unless `encrypt: false` — for tests that read
 * or damage the plain byte layouts.
 */
export async function newRepo(dir: string, opts: { chunkSize?: number; packSize?: number; wrap?: (s: ObjectStore) => ObjectStore; encrypt?: false } = {}): Promise<Repository> {
  const fs = await FsStore.open(dir, { create: true });
  const store = opts.wrap ? opts.wrap(fs) : fs;
  return Repository.init(store, { chunkSize: opts.chunkSize ?? MiB, packSize: opts.packSize ?? 4 * MiB, encrypt: opts.encrypt });
}

/** Opens an existing repository folder, optionally through a wrapper (FaultStore). */
export async function openRepo(dir: string, wrap?: (s: ObjectStore) => ObjectStore): Promise<Repository> {
  const fs = await FsStore.open(dir);
  return Repository.open(wrap ? wrap(fs) : fs);
}

export interface DiskSpec {
  size: number;
  /** Size of the raw base (may be shorter than the disk); 0: no base. */
  baseSize?: number;
  /** Random regions written into the base. */
  baseRegions?: number;
  /** Largest random region. */
  maxRegion?: number;
  blockSize?: number;
}

/**
 * Creates DIR/NAME.raw (a sparse raw base with random regions) and DIR/NAME.ksc (an overlay on it).
 * Returns the overlay's path.
 */
export async function makeDisk(dir: string, name: string, rng: Rng, spec: DiskSpec): Promise<string> {
  const ksc = join(dir, `${name}.ksc`);
  const baseSize = spec.baseSize ?? 0;
  if (baseSize > 0) {
    const base = join(dir, `${name}-base.raw`);
    writeRawRegions(base, baseSize, rng, spec.baseRegions ?? 8, spec.maxRegion ?? 3 * MiB);
    await createImage(ksc, { size: spec.size, blockSize: spec.blockSize ?? 64 * KiB, backing: base, backingFormat: 'raw' });
  } else {
    await createImage(ksc, { size: spec.size, blockSize: spec.blockSize ?? 64 * KiB });
  }
  return ksc;
}

/** A sparse raw file of `size` bytes with `regions` random regions (unaligned). */
export function writeRawRegions(path: string, size: number, rng: Rng, regions: number, maxRegion: number): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (let i = 0; i < regions; i++) {
      const len = rng.int(1, Math.min(maxRegion, size));
      const off = rng.int(0, size - len);
      writeSync(fd, rng.bytes(len), 0, len, off);
    }
  } finally {
    closeSync(fd);
  }
}

export interface Touch {
  offset: number;
  length: number;
  kind: 'write' | 'zero' | 'discard';
}

/**
 * Random changes to `dev`; returns what was done. With `dataOnly` every change is a write of random (or
 * half-compressible) bytes, so every chunk it touches holds data afterwards.
 */
export async function randomChanges(dev: BlockDevice, rng: Rng, n: number, opts: { maxLen?: number; dataOnly?: boolean; region?: [number, number] } = {}): Promise<Touch[]> {
  const maxLen = opts.maxLen ?? 300 * KiB;
  const [lo, hi] = opts.region ?? [0, dev.size];
  const out: Touch[] = [];
  for (let i = 0; i < n; i++) {
    const length = rng.int(1, Math.min(maxLen, hi - lo));
    const offset = rng.int(lo, hi - length);
    const kind = opts.dataOnly ? 'write' : rng.weighted({ write: 8, zero: 1, discard: 1 });
    if (kind === 'write') {
      const data = rng.chance(0.3) ? Buffer.alloc(length, rng.int(1, 255)) : rng.bytes(length);
      await dev.write(offset, data);
    } else if (kind === 'zero') await dev.writeZeroes(offset, length, { mayTrim: rng.chance(0.5) });
    else await dev.discard(offset, length);
    out.push({ offset, length, kind });
  }
  return out;
}

/** Chunk indexes the ranges touch. */
export function chunksOf(ranges: { offset: number; length: number }[], chunkSize: number): Set<number> {
  const s = new Set<number>();
  for (const r of ranges) {
    if (r.length <= 0) continue;
    for (let k = Math.floor(r.offset / chunkSize); k <= Math.floor((r.offset + r.length - 1) / chunkSize); k++) s.add(k);
  }
  return s;
}

export function chunkLen(size: number, chunkSize: number, k: number): number {
  return Math.min(chunkSize, size - k * chunkSize);
}

/** Whole contents of a device. */
export function contents(dev: BlockDevice): Promise<Buffer> {
  return dev.read(0, dev.size);
}

/** Reads an image file (raw or ksc_inc) through the library. */
export async function readImage(path: string): Promise<Buffer> {
  const dev = await openImage(path);
  try {
    return await contents(dev);
  } finally {
    await dev.close();
  }
}

/** null when equal, otherwise where they first differ (chunk-wise, for a readable failure). */
export function firstDifference(a: Buffer, b: Buffer, chunkSize = MiB): string | null {
  if (a.length !== b.length) return `lengths differ: ${a.length} vs ${b.length}`;
  if (a.equals(b)) return null;
  for (let off = 0; off < a.length; off += chunkSize) {
    const x = a.subarray(off, off + chunkSize);
    const y = b.subarray(off, off + chunkSize);
    if (!x.equals(y)) {
      let i = 0;
      while (x[i] === y[i]) i++;
      return `first difference in chunk ${off / chunkSize} at byte ${off + i}`;
    }
  }
  return 'differs';
}

/** Chunks whose contents differ between two disk states. */
export function differingChunks(a: Buffer, b: Buffer, chunkSize = MiB): number[] {
  const out: number[] = [];
  for (let off = 0, k = 0; off < a.length; off += chunkSize, k++) if (!a.subarray(off, off + chunkSize).equals(b.subarray(off, off + chunkSize))) out.push(k);
  return out;
}

export function zeroChunks(a: Buffer, chunkSize = MiB): number[] {
  const out: number[] = [];
  for (let off = 0, k = 0; off < a.length; off += chunkSize, k++) {
    const c = a.subarray(off, off + chunkSize);
    if (c.every((x) => x === 0)) out.push(k);
  }
  return out;
}

export function expectSame(actual: Buffer, expected: Buffer, what: string): void {
  const d = firstDifference(actual, expected);
  expect(d, what).toBeNull();
}

/** Expects `p` to reject with a KscError of one of `codes`; returns it. */
export async function expectKscError(p: Promise<unknown>, codes: string[] | string, what = ''): Promise<Error & { code: string }> {
  const want = Array.isArray(codes) ? codes : [codes];
  let err: unknown = null;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  expect(err, `${what}: expected a rejection with ${want.join('/')}`).not.toBeNull();
  expect(isKscError(err), `${what}: not a KscError: ${String(err)}`).toBe(true);
  expect(want, `${what}: ${String((err as Error).message)}`).toContain((err as { code: string }).code);
  return err as Error & { code: string };
}

/** Every file under a folder with its size (relative path → size), for "untouched" and "shrank" checks. */
export function listTree(root: string): Map<string, { size: number; mtimeMs: number }> {
  const out = new Map<string, { size: number; mtimeMs: number }>();
  const walk = (d: string, rel: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) walk(p, r);
      else if (e.isFile()) {
        const st = statSync(p);
        out.set(r, { size: st.size, mtimeMs: st.mtimeMs });
      }
    }
  };
  walk(root, '');
  return out;
}

export function treeBytes(root: string): number {
  let n = 0;
  for (const v of listTree(root).values()) n += v.size;
  return n;
}

/** Bytes and hashes of every file under a folder: equal maps mean an untouched folder. */
export async function treeDigest(root: string): Promise<Map<string, string>> {
  const { createHash } = await import('node:crypto');
  const out = new Map<string, string>();
  for (const [rel] of listTree(root)) {
    out.set(
      rel,
      createHash('sha256')
        .update(await readFile(join(root, rel)))
        .digest('hex'),
    );
  }
  return out;
}

export async function withKsc<T>(path: string, fn: (img: KscImage) => Promise<T>, write = true): Promise<T> {
  const img = await openKsc(path, { write });
  try {
    return await fn(img);
  } finally {
    await img.close();
  }
}

export function writeFile(path: string, data: Buffer): void {
  writeFileSync(path, data);
}

/** Restores backup `id` to a new raw file `target` and expects exactly `expected` there. */
export async function expectRestores(repo: Repository, id: string, target: string, expected: Buffer, what: string): Promise<void> {
  await restoreBackup(repo, id, target);
  expectSame(await readImage(target), expected, what);
}

/** Packs in the repository that no index object names (left by an interrupted backup). */
export async function orphanPacks(repo: Repository): Promise<string[]> {
  const idx = await repo.loadIndex();
  return [...(await repo.listPacks()).keys()].filter((p) => !idx.hasPack(p));
}
