/**
 * Hostile: convert's O_DIRECT reads of raw sources the page cache does not hold (src/engines/convert-direct.ts).
 * Every output is compared byte for byte with the source's model and with what `qemu-img convert -O raw` makes
 * of the same source:
 *  - sizes that are not a multiple of 4096 nor of 512 (1, 511, 4097, a piece plus one byte, …), cold (written
 *    with O_DIRECT, so nothing is cached) and sparse (holes at piece boundaries, a hole-only piece);
 *  - a source on tmpfs (every page cached: the usual reads) and on an ext4 with 1 KiB blocks (root: a loop device);
 *  - a source partly in the page cache, at every kind of boundary between cached and uncached pages (a first or
 *    last page of a piece cached, all of a piece but its first or last page, one page in the middle), some of the
 *    cached pages dirty with data newer than the disk's (a direct read must see them: the kernel writes them back);
 *  - a source that fails with EIO part-way (root: an ext4 on a loop device whose backing file is cut short under
 *    the middle of the source, its tail elsewhere): a clear error naming the source, and nothing left behind in
 *    the target's folder, not even after the workers still running when the error came have finished.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, fdatasyncSync, ftruncateSync, mkdirSync, openSync, readdirSync, readSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { convertImage } from '../../src/engines/convert.js';
import { isKscError } from '../../src/errors.js';
import { nativeOps } from '../../src/io/native.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { undoAfterAll } from '../helpers/undo.js';
import { loopFs } from '../helpers/loop-fs.js';
import { writeCold } from '../helpers/cold-file.js';
import { readAll } from '../helpers/read-all.js';

const root = process.getuid?.() === 0;
const native = process.env.KSCINC_NO_NATIVE !== '1' && typeof nativeOps()?.cachedRange === 'function';
const seed = seedFor('test/hostile/convert-direct-edges.test.ts');
const KiB = 1024;
const MiB = 1024 * KiB;
const PIECE = 2 * MiB;
const dir = tempDir('kscinc-hostile-direct-');
const undo = undoAfterAll();

/** A model of `size` bytes: random 64 KiB blocks, zero blocks, lone bytes, and data in the last byte. */
function model(rng: Rng, size: number): Buffer {
  const m = Buffer.alloc(size);
  for (let pos = 0; pos < size; pos += 64 * KiB) {
    const end = Math.min(size, pos + 64 * KiB);
    const kind = rng.int(0, 2);
    if (kind === 1) rng.bytes(end - pos).copy(m, pos);
    if (kind === 2) m[rng.int(pos, end - 1)] = rng.int(1, 255);
  }
  if (size > 2 * PIECE) m.fill(0, PIECE, 2 * PIECE); // a piece of holes only
  m[size - 1] = 0xa5;
  return m;
}

function cachedPages(path: string, from: number, to: number): number[] {
  const fd = openSync(path, 'r');
  try {
    const out: number[] = [];
    for (let p = from; p < to; p += 4096) if (nativeOps()!.cachedRange!(fd, p, 4096) === 1) out.push(p);
    return out;
  } finally {
    closeSync(fd);
  }
}

/**
 * Converts `src` to raw and ksc_inc; each output must read as `m` and as qemu-img convert's output. `cold`:
 * the source was not cached, and the pieces past the first must have been read directly: none of their pages
 * is cached afterwards but for the last, which the format probe reads (checked before qemu-img reads it all).
 */
async function convertsAs(src: string, m: Buffer, label: string, cold = false): Promise<void> {
  const outs: string[] = [];
  for (const format of ['raw', 'ksc_inc'] as const) {
    const out = join(dir, `${label}.out.${format}`);
    await convertImage(src, out, { format, force: true });
    outs.push(out);
  }
  const lastPage = Math.floor((m.length - 1) / 4096) * 4096;
  if (cold && native && m.length > PIECE) expect(cachedPages(src, PIECE, lastPage).length, `${label}: pages cached past the first piece`).toBe(0);
  const ref = join(dir, `${label}.qemu.raw`);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', src, ref]);
  // qemu-img's raw output is the source rounded up to whole 512-byte sectors, with zeros.
  const qemu = readFileSync(ref);
  expect(qemu.length, `${label}: qemu-img convert's output size`).toBe(Math.ceil(m.length / 512) * 512);
  expect(qemu.subarray(0, m.length).equals(m) && qemu.subarray(m.length).every((b) => b === 0), `${label}: qemu-img convert's output is the model`).toBe(true);
  for (const out of outs) {
    const got = await readAll(out);
    expect(got.length, `${out}: size`).toBe(m.length);
    if (!got.equals(m)) {
      let at = 0;
      while (got[at] === m[at]) at++;
      expect.fail(`${out}: differs from qemu-img convert's output first at byte ${at}`);
    }
  }
  execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', outs[0]!, ref]);
}

const sizes = [1, 511, 4095, 4097, 64 * KiB + 1, PIECE - 1, PIECE + 1, 3 * PIECE + 512, 3 * PIECE + 4095];

describe(`convert of a cold raw source: odd sizes, holes, file systems (seed ${seed})`, () => {
  it('on the local disk, not cached: each size reads back as qemu-img convert makes it, read directly', async () => {
    const rng = new Rng(seed);
    for (const size of sizes) {
      const m = model(rng, size);
      const src = join(dir, `cold-${size}.raw`);
      writeCold(src, m);
      await convertsAs(src, m, `cold-${size}`, true);
    }
  });

  it('on tmpfs (every page cached): each size reads back as qemu-img convert makes it', async () => {
    const shm = join('/dev/shm', `kscinc-hostile-direct-${process.pid}`);
    mkdirSync(shm);
    undo(() => execFileSync('rm', ['-rf', shm]));
    const rng = new Rng(seed + 1);
    for (const size of sizes) {
      const m = model(rng, size);
      const src = join(shm, `shm-${size}.raw`);
      const fd = openSync(src, 'w');
      for (let pos = 0; pos < size; pos += 4096) {
        const piece = m.subarray(pos, Math.min(size, pos + 4096));
        if (piece.some((b) => b !== 0)) writeSync(fd, piece, 0, piece.length, pos);
      }
      ftruncateSync(fd, size);
      closeSync(fd);
      await convertsAs(src, m, `shm-${size}`);
    }
  });

  it.skipIf(!root)('on an ext4 with 1 KiB blocks (a loop device), not cached: each size reads back as qemu-img convert makes it', async () => {
    const mnt = loopExt4('ext4-1k', 32, ['-b', '1024']).mnt;
    const rng = new Rng(seed + 2);
    for (const size of sizes) {
      const m = model(rng, size);
      const src = join(mnt, `k1-${size}.raw`);
      writeCold(src, m);
      await convertsAs(src, m, `k1-${size}`, true);
    }
  });
});

describe.skipIf(!native)(`convert of a raw source partly in the page cache (seed ${seed})`, () => {
  it('every boundary between cached and uncached pages, some cached pages dirty and newer than the disk', async () => {
    const rng = new Rng(seed + 3);
    const size = 5 * PIECE + 3000;
    const m = model(rng, size);
    m.fill(0x11, 0, 4096); // data in the first page and around each piece boundary
    for (let p = PIECE; p < size; p += PIECE) m.fill(0x22, p - 4096, Math.min(size, p + 4096));
    const src = join(dir, 'partly.raw');
    writeCold(src, m);
    const P = (k: number): number => k * PIECE;
    // Ranges put in the page cache: [start, end) in whole pages, by piece.
    const ranges: [number, number][] = [
      [P(0), P(0) + 4096], // piece 0: its first page only
      [P(1) - 4096, P(1)], //          its last page only
      [P(1) + 4096, P(2)], // piece 1: all but its first page
      [P(2), P(3) - 4096], // piece 2: all but its last page
      [P(3) + 64 * KiB, P(3) + 68 * KiB], // piece 3: one page in the middle
      [P(5), size], // the short last piece, whole (its last page partial)
    ];
    const fd = openSync(src, 'r+');
    try {
      ranges.forEach(([a, b], k) => {
        const dirty = k % 2 === 1; // clean pages hold the disk's bytes; dirty ones new bytes the disk has not seen
        if (dirty) rng.bytes(b - a).copy(m, a);
        writeSync(fd, m, a, b - a, a);
        if (!dirty) fdatasyncSync(fd);
      });
    } finally {
      closeSync(fd);
    }
    for (const [a, b] of ranges) expect(cachedPages(src, a, b).length, `precondition: [${a}, ${b}) cached`).toBe(Math.ceil((b - a) / 4096));
    expect(cachedPages(src, P(4), P(5)), 'precondition: piece 4 not cached').toEqual([]);
    await convertsAs(src, m, 'partly');
  });
});

/** An ext4 without a journal on a loop device over a `mib` MiB file in `dir`, made with `mkfsArgs` and mounted (errors=continue). */
function loopExt4(name: string, mib: number, mkfsArgs: string[]): { dev: string; backing: string; mnt: string } {
  return loopFs(dir, name, { mkfs: 'mkfs.ext4', args: ['-q', '-F', '-O', '^has_journal', ...mkfsArgs], mib, mountOptions: 'errors=continue' }, undo);
}

/** Physical 4 KiB blocks of `path`'s extents (filefrag -v): [logical, physical, length] each. */
function extentsOf(path: string): [number, number, number][] {
  const out = execFileSync('filefrag', ['-v', '-b4096', path]).toString();
  return [...out.matchAll(/^\s*\d+:\s+(\d+)\.\.\s*\d+:\s+(\d+)\.\.\s*\d+:\s+(\d+):/gm)].map((x) => [Number(x[1]), Number(x[2]), Number(x[3])]);
}

describe.skipIf(!root)(`convert of a raw source that fails with EIO part-way (seed ${seed})`, () => {
  it('a clear error naming the source, and nothing left in the target folder', async () => {
    const { dev, backing, mnt } = loopExt4('eio', 64, ['-b', '4096']);
    const rng = new Rng(seed + 4);
    const size = 8 * MiB;
    const m = rng.bytes(size);
    const src = join(mnt, 'src.raw');
    writeCold(src, m);
    const ext = extentsOf(src);
    const phys = (block: number): number => {
      const e = ext.find(([logical, , len]) => logical <= block && block < logical + len)!;
      return e[1] + block - e[0];
    };
    // The device is cut short at the block of the file's byte 4 MiB + 12 KiB: the file's blocks before it must
    // lie before the cut, those from there to 7 MiB past it.
    const cut = phys(1027);
    for (let b = 0; b < 1792; b++) {
      if (b >= 1027 !== phys(b) >= cut) expect.fail(`precondition: block ${b} of the file at ${phys(b)}, the cut at ${cut}: ${JSON.stringify(ext)}`);
    }
    execFileSync('umount', [mnt]); // drop what the page cache holds of the file system
    execFileSync('mount', ['-o', 'errors=continue', dev, mnt]);
    // The format probe reads the first and the last bytes: those pages are put in the page cache before the cut.
    const probe = openSync(src, 'r');
    readSync(probe, Buffer.alloc(4096), 0, 4096, 0);
    readSync(probe, Buffer.alloc(4096), 0, 4096, size - 4096);
    closeSync(probe);
    // Cut the device 4 MiB + 12 KiB into the file: from there to 7 MiB every read fails.
    execFileSync('truncate', ['-s', String(cut * 4096), backing]);
    execFileSync('losetup', ['-c', dev]);
    const q = execFileSync('sh', ['-c', `qemu-img convert -f raw -O raw '${src}' '${join(dir, 'eio.qemu.raw')}' 2>&1 || true`]).toString();
    expect(q, 'qemu-img meets the error too').toMatch(/Input\/output error/);
    for (const format of ['raw', 'ksc_inc'] as const) {
      const outDir = join(dir, `eio-out-${format}`);
      mkdirSync(outDir);
      const e = await convertImage(src, join(outDir, 'out'), { format }).catch((x: unknown) => x);
      expect(isKscError(e, 'KSC_E_IO'), `${format}: ${e instanceof Error ? e.message : 'no error'}`).toBe(true);
      expect((e as Error).message).toContain(src);
      expect(readdirSync(outDir), `${format}: left behind`).toEqual([]);
      // Workers still reading when the error came finish later: they must not make anything either.
      await new Promise((r) => setTimeout(r, 500));
      expect(readdirSync(outDir), `${format}: left behind after the other workers`).toEqual([]);
    }
  });
});
