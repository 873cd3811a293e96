/**
 * convert's direct reads (src/engines/convert-direct.ts): a raw source the page cache does not hold is read
 * with O_DIRECT. The source here is written with O_DIRECT, so none of its pages is cached (cachestat says so
 * before each test): the output must read back as the source, byte for byte (data, holes, a size that is not
 * a multiple of 4 KiB), and the source must still not be in the page cache afterwards, past what opening it
 * reads (the reads were direct: a buffered read would have cached it). A source that shrinks under the
 * reader reads as zeros past its new end; a cached source and a ksc_inc source are read the usual way.
 */
import { closeSync, ftruncateSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { pieceReader } from '../../src/engines/convert-direct.js';
import { convertImage } from '../../src/engines/convert.js';
import { RawDevice } from '../../src/image/raw.js';
import { openImage } from '../../src/index.js';
import { nativeOps } from '../../src/io/native.js';
// @ts-ignore -- plain .mjs shared with child processes and bench/ (JSDoc types only)
import { mulberry32 } from '../helpers/prng.mjs';
import { tempDir } from '../helpers/tmp.js';
import { readAll } from '../helpers/read-all.js';
import { writeCold as writeColdFile } from '../helpers/cold-file.js';

const dir = tempDir();
const seed = Number(process.env.TEST_SEED ?? Date.now() % 100000);
const MiB = 1 << 20;

/** Writes `data` to a new file with O_DIRECT (whole 4 KiB blocks; holes where `data` is zero for a whole 64 KiB), then sets its size. */
const writeCold = (path: string, data: Buffer): void => writeColdFile(path, data, 65536);

/** cachestat of [position, position + length) of `path`: 1 all cached, 0 not, -2 cannot tell. */
function cached(path: string, position: number, length: number): number {
  const fd = openSync(path, 'r');
  try {
    return nativeOps()!.cachedRange!(fd, position, length);
  } finally {
    closeSync(fd);
  }
}

/** Offsets of the whole 64 KiB blocks of `data` that hold data. */
function dataBlocks(data: Buffer): number[] {
  const out: number[] = [];
  for (let pos = 0; pos + 65536 <= data.length; pos += 65536) if (data.subarray(pos, pos + 65536).some((b) => b !== 0)) out.push(pos);
  return out;
}

/** Offsets (from `from` on) of the 64 KiB blocks of `data` that hold data and are wholly in the page cache. */
function cachedDataBlocks(path: string, data: Buffer, from = 0): number[] {
  return dataBlocks(data).filter((pos) => pos >= from && cached(path, pos, 65536) === 1);
}

const rnd = mulberry32(seed) as () => number;
// 7 MiB + 3000 bytes: whole 2 MiB pieces, a short last one, a size that is not a multiple of 4 KiB.
const size = 7 * MiB + 3000;
const data = Buffer.alloc(size);
for (let pos = 0; pos < size; pos += 65536) {
  const kind = Math.floor(rnd() * 3); // a hole, random data, or one byte of data at a random place
  const end = Math.min(size, pos + 65536);
  if (kind === 1) for (let i = pos; i < end; i++) data[i] = Math.floor(rnd() * 256);
  if (kind === 2) data[pos + Math.floor(rnd() * (end - pos))] = 1 + Math.floor(rnd() * 255);
}
data.fill(0x5a, size - 100); // data in the last, partial 4 KiB block
const src = join(dir, 'cold.raw');
/** The suite's pure-TypeScript run (scripts/test.sh): no addon, so no direct reads; convert must read the usual way. */
const noNative = process.env.KSCINC_NO_NATIVE === '1';

describe.runIf(noNative)(`without the addon, convert reads a raw source that is not cached the usual way (seed ${seed})`, () => {
  for (const format of ['ksc_inc', 'raw'] as const) {
    it(`into ${format}: the output reads as the source`, async () => {
      writeCold(src, data);
      const out = join(dir, `plain-${format}`);
      const r = await convertImage(src, out, { format, force: true });
      expect(r.size).toBe(size);
      expect((await readAll(out, size)).equals(data)).toBe(true);
    });
  }
});

describe.skipIf(noNative)(`convert reads a raw source that is not cached with O_DIRECT (seed ${seed})`, () => {
  beforeAll(() => {
    // The addon and cachestat are what the feature stands on: without them this file tests nothing.
    expect(nativeOps()?.cachedRange, 'the native addon with cachedRange').toBeTypeOf('function');
  });

  for (const format of ['ksc_inc', 'raw'] as const) {
    it(`into ${format}: the output reads as the source, and the source stays out of the page cache`, async () => {
      writeCold(src, data);
      expect(cachedDataBlocks(src, data), 'precondition: the source is not cached').toEqual([]);
      // Opening the source reads its first bytes (the format probe, once here and once in convert), and the
      // kernel's readahead around them caches a few hundred KiB: only the blocks past the first piece count.
      await (await openImage(src)).close();
      expect(cachedDataBlocks(src, data, 2 * MiB), 'the probe caches nothing past the first piece').toEqual([]);
      const out = join(dir, `out-${format}`);
      const r = await convertImage(src, out, { format, force: true });
      expect(r.size).toBe(size);
      expect((await readAll(out, size)).equals(data)).toBe(true);
      // Direct reads leave no page behind; buffered reads (the old way) cache every 64 KiB block of data they read.
      expect(cachedDataBlocks(src, data, 2 * MiB), 'data blocks of the source in the page cache').toEqual([]);
    });
  }

  it('a cached source is read the usual way, and reads the same', async () => {
    writeCold(src, data);
    expect(readFileSync(src).equals(data)).toBe(true); // now every page is cached
    expect(cached(src, 0, size)).toBe(1);
    const out = join(dir, 'out-cached');
    await convertImage(src, out, { format: 'ksc_inc', force: true });
    expect((await readAll(out, size)).equals(data)).toBe(true);
  });

  it('a source that shrinks under the reader reads as zeros past its new end', async () => {
    writeCold(src, data);
    const dev = await RawDevice.open(src);
    const before = cachedDataBlocks(src, data);
    const reader = await pieceReader(dev, 2 * MiB, 2);
    try {
      const buf = reader.buffer();
      expect(buf.byteOffset % 4096, 'the buffer is page-aligned').toBe(0);
      await reader.readInto(2 * MiB, buf, 2 * MiB);
      expect(buf.equals(data.subarray(2 * MiB, 4 * MiB))).toBe(true);
      expect(cachedDataBlocks(src, data), 'read directly').toEqual(before);
      const fd = openSync(src, 'r+');
      ftruncateSync(fd, 3 * MiB + 100);
      closeSync(fd);
      buf.fill(0xff);
      await reader.readInto(2 * MiB, buf, 2 * MiB);
      expect(buf.subarray(0, MiB + 100).equals(data.subarray(2 * MiB, 3 * MiB + 100))).toBe(true);
      expect(buf.subarray(MiB + 100).every((b) => b === 0)).toBe(true);
    } finally {
      await reader.close();
      await dev.close();
    }
  });

  it('a source whose first 64 KiB is a hole is still read with O_DIRECT (its first span names no descriptor)', async () => {
    const holed = Buffer.from(data);
    holed.fill(0, 0, 65536);
    const path = join(dir, 'cold-hole0.raw');
    writeCold(path, holed);
    expect(cachedDataBlocks(path, holed), 'precondition: the source is not cached').toEqual([]);
    const dev = await RawDevice.open(path);
    expect(dev.hostSpans(0, 4096)?.[0]?.fd, 'precondition: the first 4 KiB is a hole (no descriptor)').toBe(-1);
    const reader = await pieceReader(dev, 2 * MiB, 2);
    try {
      const buf = reader.buffer();
      expect(buf.byteOffset % 4096, 'the aligned memory of the direct reads').toBe(0);
      await reader.readInto(2 * MiB, buf, 2 * MiB);
      expect(buf.equals(holed.subarray(2 * MiB, 4 * MiB))).toBe(true);
    } finally {
      await reader.close();
      await dev.close();
    }
    const out = join(dir, 'out-hole0');
    await convertImage(path, out, { format: 'ksc_inc', force: true });
    expect((await readAll(out, size)).equals(holed)).toBe(true);
    expect(cachedDataBlocks(path, holed, 2 * MiB), 'data blocks of the source in the page cache').toEqual([]);
  });

  it('a ksc_inc source is read through the image', async () => {
    writeCold(src, data);
    const img = join(dir, 'src.ksc');
    await convertImage(src, img, { format: 'ksc_inc', force: true });
    const dev = await openImage(img);
    const reader = await pieceReader(dev, 2 * MiB, 2);
    try {
      const buf = reader.buffer();
      expect(buf.buffer.byteLength, 'a buffer of its own, not the aligned memory').toBe(2 * MiB);
      await reader.readInto(0, buf, 2 * MiB);
      expect(buf.equals(data.subarray(0, 2 * MiB))).toBe(true);
    } finally {
      await reader.close();
      await dev.close();
    }
  });
});
