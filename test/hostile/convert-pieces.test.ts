/**
 * Hostile: convert's 2 MiB pieces and its cheap zero check (src/engines/convert.ts copyDevice: a unit whose
 * first 32-bit word is non-zero is data without a compare; the others are compared whole). Sources whose
 * bytes are zero except one that the first-word check cannot see — the last byte of a piece, of a unit,
 * of the disk; byte 4 of a unit (just past the first word); the first byte of a piece after a zero piece —
 * at sizes that are not a multiple of the piece, the unit or 4 bytes, into raw (4 KiB units) and ksc_inc
 * (64 KiB and 4 KiB clusters) outputs, from raw and ksc_inc sources. The output must read exactly as the
 * source (qemu-img compare for raw outputs as a second opinion), stay sparse where the source is zero, and
 * check clean.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, statSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { convertImage } from '../../src/engines/convert.js';
import { createImage, openKsc } from '../../src/index.js';
import { openHostFile } from '../../src/io/file.js';
import { tempDir } from '../helpers/tmp.js';
import { readAll } from '../helpers/read-all.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PIECE = 2 * MiB;

/** Offsets of single non-zero bytes the first-word check cannot see, for a disk of `size` bytes. */
function lonelyBytes(size: number): number[] {
  const at = new Set<number>();
  for (let p = 0; p < size; p += PIECE) {
    at.add(Math.min(size, p + PIECE) - 1); // the last byte of each piece
    if (p > 0 && (p / PIECE) % 2 === 0) at.add(p); // the first byte of a piece after a zero-but-one piece
    at.add(p + 4 * KiB + 4); // byte 4 of a unit: past its first word
    at.add(p + 64 * KiB - 1); // the last byte of a 64 KiB unit
    at.add(p + 3); // the last byte of a piece's first word (first word non-zero: the fast path)
  }
  at.add(size - 1); // the last byte of the disk
  return [...at].filter((o) => o >= 0 && o < size).sort((a, b) => a - b);
}

function rawSource(path: string, size: number, bytes: number[]): Buffer {
  const model = Buffer.alloc(size);
  const fd = openSync(path, 'w');
  try {
    truncateSync(path, size);
    bytes.forEach((o, k) => {
      const v = Buffer.from([(k % 251) + 1]);
      v.copy(model, o);
      writeSync(fd, v, 0, 1, o);
    });
  } finally {
    closeSync(fd);
  }
  return model;
}

/** The bytes of `path` in data extents (SEEK_DATA / SEEK_HOLE). */
async function dataBytes(path: string): Promise<number> {
  const f = await openHostFile(path, { write: false });
  try {
    const size = await f.size();
    let n = 0;
    for (let at = f.seekData(0); at !== null && at >= 0 && at < size;) {
      const end = f.seekHole(at) ?? size;
      n += end - at;
      at = f.seekData(end);
    }
    return n;
  } finally {
    await f.close();
  }
}

function firstDiff(a: Buffer, b: Buffer): string {
  if (a.length !== b.length) return `sizes ${a.length} vs ${b.length}`;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return `byte 0x${i.toString(16)}: ${a[i]} vs ${b[i]}`;
  return 'none';
}

describe('convert: single bytes the cheap zero check must not miss', () => {
  const sizes = [3 * PIECE + 4097, 2 * PIECE + 1, 3 * PIECE - 1, MiB + 3, PIECE + 64 * KiB + 2];
  for (const size of sizes) {
    for (const [format, blockSize] of [
      ['raw', undefined],
      ['ksc_inc', 64 * KiB],
      ['ksc_inc', 4 * KiB],
    ] as const) {
      it(`a raw source of ${size} bytes into ${format}${blockSize ? ` (${blockSize / KiB} KiB clusters)` : ''}`, async () => {
        const dir = tempDir('kscinc-convert-pieces-');
        const src = join(dir, 'src.raw');
        const bytes = lonelyBytes(size);
        const model = rawSource(src, size, bytes);
        const dst = join(dir, `out.${format === 'raw' ? 'raw' : 'ksc'}`);
        await convertImage(src, dst, { format, blockSize });
        const got = await readAll(dst);
        expect(firstDiff(got, model), `${bytes.length} lonely bytes`).toBe('none');
        if (format === 'raw') {
          expect(statSync(dst).size).toBe(size);
          execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, dst]);
          // Sparse where the source is: data only in the 4 KiB pages that hold a lonely byte.
          const pages = new Set(bytes.map((o) => Math.floor(o / (4 * KiB))));
          expect(await dataBytes(dst)).toBeLessThanOrEqual(pages.size * 4 * KiB);
        } else {
          const r = await checkImage(dst, { verify: true });
          expect(r.errors).toEqual([]);
        }
      });
    }
  }

  for (const B of [64 * KiB, 4 * KiB]) {
    it(`a ksc_inc source (${B / KiB} KiB blocks) of data blocks zero but for one byte, into raw and ksc_inc`, async () => {
      const dir = tempDir('kscinc-convert-pieces-');
      const src = join(dir, 'src.ksc');
      const size = 3 * PIECE + 3 * B + 5; // a short last block
      await createImage(src, { size, blockSize: B });
      const model = Buffer.alloc(size);
      const k = await openKsc(src, { write: true });
      const offs = lonelyBytes(size);
      for (const [i, o] of offs.entries()) {
        const blk = Math.floor(o / B) * B;
        const n = Math.min(B, size - blk);
        const data = Buffer.from(model.subarray(blk, blk + n));
        data[o - blk] = (i % 251) + 1;
        data.copy(model, blk);
        await k.write(blk, data); // a DATA block, zero but for its lonely bytes
      }
      await k.close();
      for (const format of ['raw', 'ksc_inc'] as const) {
        const dst = join(dir, `out-${format}`);
        await convertImage(src, dst, { format });
        expect(firstDiff(await readAll(dst), model), format).toBe('none');
        if (format === 'ksc_inc') expect((await checkImage(dst, { verify: true })).errors).toEqual([]);
      }
    });
  }
});
