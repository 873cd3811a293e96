/**
 * Interop with the real qemu-img (Debian qemu-utils): raw results of convert, commit and overlays are
 * compared byte for byte with `qemu-img compare`, and our map agrees with `qemu-img map` about data.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, expect, beforeAll } from 'vitest';
import { commitImage, snapshotImage } from '../../src/engines/ops.js';
import { convertImage } from '../../src/engines/convert.js';
import { createImage, openImage, openKsc } from '../../src/index.js';
import { run } from '../helpers/cli.js';
// @ts-ignore -- plain .mjs shared with child processes and bench/ (JSDoc types only)
import { mulberry32 } from '../helpers/prng.mjs';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir();

/** Whole numbers below n from the project's seeded PRNG. */
function makeRng(seed: number): { int(n: number): number } {
  const next = mulberry32(seed) as () => number;
  return { int: (n: number): number => Math.floor(next() * n) };
}
const base = join(dir, 'base.raw');

function compare(a: string, b: string): void {
  const r = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  expect(r.stdout + r.stderr).toContain('Images are identical');
  expect(r.code).toBe(0);
}

function qemuDataRanges(file: string): { start: number; length: number }[] {
  const r = run('qemu-img', ['map', '--output=json', '-f', 'raw', file]);
  expect(r.code).toBe(0);
  return (JSON.parse(r.stdout) as { start: number; length: number; data: boolean }[]).filter((e) => e.data);
}

/** Writes `data` at `offset` into a plain file (the reference side of every comparison). */
function patch(file: string, offset: number, data: Buffer): void {
  const buf = readFileSync(file);
  data.copy(buf, offset);
  writeFileSync(file, buf);
}

beforeAll(() => {
  const r = run('bash', [join(__dirname, '../../scripts/make-test-image.sh'), base, '64M']);
  expect(r.code, r.stderr).toBe(0);
});

describe('qemu-img interop', () => {
  it('raw -> ksc_inc -> raw is byte-identical, and sparseness is kept', async () => {
    const ksc = join(dir, 'conv.ksc');
    const back = join(dir, 'conv.raw');
    await convertImage(base, ksc, { format: 'ksc_inc' });
    await convertImage(ksc, back, { format: 'raw' });
    compare(base, back);
    // Agreement with qemu-img map of the source about where data is: every block we call data overlaps a
    // range qemu calls data (we invent none), and every byte of qemu's data outside our data is zero
    // (we skipped only zero blocks).
    const img = await openImage(ksc);
    const ours = (await img.extents(0, img.size)).filter((e) => e.state === 'data');
    await img.close();
    const theirs = qemuDataRanges(base);
    expect(ours.length).toBeGreaterThan(0);
    for (const e of ours) {
      for (let blk = e.offset; blk < e.offset + e.length; blk += 65536) {
        expect(
          theirs.some((t) => t.start < blk + 65536 && blk < t.start + t.length),
          `block at ${blk}`,
        ).toBe(true);
      }
    }
    const src = readFileSync(base);
    const inOurs = (pos: number): boolean => ours.some((e) => pos >= e.offset && pos < e.offset + e.length);
    let zeroSkipped = 0;
    for (const t of theirs) {
      for (let pos = t.start; pos < t.start + t.length; pos += 4096) {
        if (!inOurs(pos)) {
          expect(
            src.subarray(pos, pos + 4096).every((b) => b === 0),
            `page at ${pos}`,
          ).toBe(true);
          zeroSkipped++;
        }
      }
    }
    console.log(`qemu data ranges: ${theirs.length}; our data extents: ${ours.length}; zero pages skipped inside qemu data: ${zeroSkipped}`);
  });

  it('an overlay on a raw base reads like the same writes applied to a copy of the base', async () => {
    const seed = Number(process.env.KSC_SEED ?? Date.now() % 1e9);
    console.log(`overlay interop seed ${seed}`);
    const rng = makeRng(seed);
    const ov = join(dir, 'ov.ksc');
    const ref = join(dir, 'ref.raw');
    copyFileSync(base, ref);
    await createImage(ov, { backing: base, blockSize: 65536 });
    const img = await openKsc(ov, { write: true });
    for (let i = 0; i < 60; i++) {
      const len = 1 + rng.int(200000);
      const off = rng.int(img.size - len);
      const data = Buffer.alloc(len, rng.int(256));
      await img.write(off, data);
      patch(ref, off, data);
    }
    await img.writeZeroes(3 * 65536 + 100, 5 * 65536);
    patch(ref, 3 * 65536 + 100, Buffer.alloc(5 * 65536));
    await img.close();
    const out = join(dir, 'ov.raw');
    await convertImage(ov, out, { format: 'raw' });
    compare(out, ref);
    // qemu-img reads the raw result too: its checksum of the image matches ours.
    const r = run('qemu-img', ['info', '--output=json', out]);
    expect(JSON.parse(r.stdout)['virtual-size']).toBe(64 << 20);
  });

  it('snapshot then commit into a raw base leaves the base equal to the reference', async () => {
    const b2 = join(dir, 'b2.raw');
    const ref = join(dir, 'ref2.raw');
    copyFileSync(base, b2);
    copyFileSync(base, ref);
    const top = join(dir, 'top.ksc');
    await snapshotImage(b2, top);
    const img = await openKsc(top, { write: true });
    const data = Buffer.alloc(300000, 0x5a);
    await img.write(1234567, data);
    patch(ref, 1234567, data);
    await img.discard(8 << 20, 1 << 20);
    patch(ref, 8 << 20, Buffer.alloc(1 << 20));
    await img.close();
    await commitImage(top);
    compare(b2, ref);
    const after = await openKsc(top);
    expect((await after.extents(0, after.size)).every((e) => e.depth !== 0)).toBe(true);
    await after.close();
  });
});
