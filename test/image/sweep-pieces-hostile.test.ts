/**
 * Hostile tests of the leak sweep's 4 KiB piece reclaim (formats/ksc_inc.md §8.1, src/image/sweep.ts,
 * src/image/ksc/leak-sweep.ts): a page the sweep zeroes and hands to the metadata pool must be one nothing
 * may still reference.
 */
import { closeSync, openSync, readSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { coreOf, type KscImage } from '../../src/image/ksc/image.js';
import { tempDir } from '../helpers/tmp.js';

const PAGE = 4096;

function readAt(file: string, offset: number, length: number): Buffer {
  const fd = openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    closeSync(fd);
  }
}

function writeAt(file: string, offset: number, data: Buffer): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

async function bitmapRanges(k: KscImage): Promise<{ offset: number; length: number }[][]> {
  const out: { offset: number; length: number }[][] = [];
  for (const b of coreOf(k).bitmapSlots) if (b) out.push(await b.hostRanges());
  return out;
}

describe('the sweep reclaims no page anything may still reference', () => {
  for (const B of [4096, 64 * 1024, 1024 * 1024]) {
    it(`a damaged bitmap table entry (block size ${B / 1024} KiB): nothing is reclaimed, the page is kept`, async () => {
      const img = join(tempDir('kscinc-pieces-h-'), 'img.ksc');
      await createImage(img, { size: 64 * 1024 * 1024, blockSize: B });
      const k = await openKsc(img, { write: true });
      await k.addBitmap('b1');
      await k.write(0, Buffer.alloc(B, 7));
      await k.flush();
      const [ranges] = await bitmapRanges(k);
      await k.close();
      // A writer that crashed with no change in flight: nothing to recover, so nothing reads the table at open.
      const crashed = await openKsc(img, { write: true });
      await coreOf(crashed).file.close();
      const table = ranges![0]!;
      const page = ranges![1]!;
      expect(page.length).toBe(PAGE);
      // The table entry of page 0 fails its seal: what it pointed at is unknown, so may still be referenced.
      const rec = readAt(img, table.offset, 16);
      rec[12] = rec[12]! ^ 0xff;
      writeAt(img, table.offset, rec);
      const before = readAt(img, page.offset, PAGE);
      expect(before.some((x) => x !== 0)).toBe(true);
      const end = statSync(img).size;
      writeAt(img, end, Buffer.alloc(PAGE, 0xa5)); // a leaked page too: the sweep has something to take
      const k2 = await openKsc(img, { write: true });
      const sweep = k2.sweep;
      await k2.close();
      expect(readAt(img, page.offset, PAGE).equals(before), `the page at 0x${page.offset.toString(16)} was zeroed (sweep ${JSON.stringify(sweep)})`).toBe(true);
      expect(sweep?.reclaimedPieces ?? 0, JSON.stringify(sweep)).toBe(0);
      expect(sweep?.reclaimed ?? 0, JSON.stringify(sweep)).toBe(0);
    });
  }
});
