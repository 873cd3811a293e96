/**
 * convert's zero skipping (src/engines/convert.ts): a unit is skipped only when all of it is zero. Units that
 * start with zero words but hold data further on, data in the very last bytes of a unit, units of the last
 * piece and a short last unit are all written; the output reads back as the source, byte for byte, and
 * `bytesWritten` counts exactly the units that hold data. Raw output (4 KiB units) and ksc_inc (its block).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { convertImage } from '../../src/engines/convert.js';
// @ts-ignore -- plain .mjs shared with child processes and bench/ (JSDoc types only)
import { mulberry32 } from '../helpers/prng.mjs';
import { tempDir } from '../helpers/tmp.js';
import { readAll } from '../helpers/read-all.js';

const dir = tempDir();

/** Bytes of `unit`-sized units of `data` that are not all zeros (the last unit may be short). */
function nonZeroUnitBytes(data: Buffer, unit: number): number {
  let n = 0;
  for (let pos = 0; pos < data.length; pos += unit) {
    const u = data.subarray(pos, Math.min(data.length, pos + unit));
    if (u.some((b) => b !== 0)) n += u.length;
  }
  return n;
}

describe('convert skips all-zero units only', () => {
  const seed = Number(process.env.TEST_SEED ?? Date.now() % 100000);
  const rnd = mulberry32(seed) as () => number;
  // 5 MiB + 1 KiB: two whole 2 MiB pieces, a short third one, and a short last 4 KiB unit.
  const size = (5 << 20) + 1024;
  const src = Buffer.alloc(size);
  const unit = 4096;
  // Per 4 KiB unit (and so per 64 KiB block): zero, random, data after zero words, data in its last byte.
  for (let pos = 0; pos + unit <= size; pos += unit) {
    const kind = Math.floor(rnd() * 4);
    if (kind === 1) for (let i = 0; i < unit; i++) src[pos + i] = Math.floor(rnd() * 256);
    if (kind === 2) src[pos + 4 + Math.floor(rnd() * (unit - 4))] = 1 + Math.floor(rnd() * 255);
    if (kind === 3) src[pos + unit - 1] = 0x80;
  }
  src[size - 1] = 7; // the short last unit holds data in its last byte
  src.fill(0, 3 << 20, (3 << 20) + (128 << 10)); // two whole zero 64 KiB blocks in the middle
  const srcPath = join(dir, 'src.raw');
  writeFileSync(srcPath, src);

  it(`raw output: every data unit written, zeros skipped (seed ${seed})`, async () => {
    const out = join(dir, 'out.raw');
    const r = await convertImage(srcPath, out, { format: 'raw' });
    expect(readFileSync(out).equals(src), `seed ${seed}`).toBe(true);
    expect(r.bytesWritten, `seed ${seed}`).toBe(nonZeroUnitBytes(src, unit));
  });

  it(`ksc_inc output: reads back as the source, written per block (seed ${seed})`, async () => {
    const out = join(dir, 'out.ksc');
    const r = await convertImage(srcPath, out, { format: 'ksc_inc', blockSize: 64 << 10 });
    expect((await readAll(out, size)).equals(src), `seed ${seed}`).toBe(true);
    expect(r.bytesWritten, `seed ${seed}`).toBe(nonZeroUnitBytes(src, 64 << 10));
  });
});
