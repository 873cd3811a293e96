/**
 * The leak sweep (formats/ksc_inc.md §8.1) also reclaims leaked 4 KiB metadata pieces: a page a crashed
 * writer wrote (a bitmap page or table, carved out of a free cluster or appended at the end of the file)
 * before anything referenced it durably. Such a page sits in a cluster that also holds referenced metadata,
 * or in the file's last, partial cluster, so a sweep of whole clusters never saw it: after the sweep and a
 * clean close `check` still found it leaked (test/image/leak-bound.test.ts failed that way now and then).
 * Here the crashed writer's page is made by hand: non-zero bytes written into an unreferenced page.
 */
import { closeSync, openSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { coreOf, type KscImage } from '../../src/image/ksc/image.js';
import { tempDir } from '../helpers/tmp.js';

const B = 64 * 1024;
const PAGE = 4096;

async function bitmapPages(k: KscImage): Promise<number[]> {
  const out: number[] = [];
  for (const b of coreOf(k).bitmapSlots) if (b) for (const r of await b.hostRanges()) for (let o = r.offset; o < r.offset + r.length; o += PAGE) out.push(o);
  return out;
}

/** Writes a page of non-zero bytes at `offset` of the file, as a writer that died before referencing it. */
function plantPage(file: string, offset: number): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, Buffer.alloc(PAGE, 0xa5), 0, PAGE, offset);
  } finally {
    closeSync(fd);
  }
}

/** Reopens (the sweep runs), closes cleanly, and returns check's report. */
async function sweepAndClose(img: string): Promise<{ leakedBytes: number; warnings: string[]; errors: string[]; pieces: number }> {
  const k = await openKsc(img, { write: true });
  const pieces = k.sweep?.reclaimedPieces ?? 0;
  expect(k.sweep?.skipped ?? null).toBeNull();
  await k.close();
  const r = await checkImage(img, { verify: true });
  return { leakedBytes: r.leakedBytes, warnings: r.warnings, errors: r.errors, pieces };
}

describe('the leak sweep reclaims 4 KiB metadata pieces', () => {
  it('an unreferenced page inside a cluster that holds a referenced bitmap table', async () => {
    const img = join(tempDir('kscinc-pieces-'), 'img.ksc');
    await createImage(img, { size: 4 * 1024 * 1024, blockSize: B });
    const k = await openKsc(img, { write: true });
    await k.addBitmap('b1');
    await k.write(0, Buffer.alloc(4 * B, 7));
    await k.flush();
    await k.discard(B, B); // frees a cluster: the next bitmap table is carved out of it
    await k.flush();
    await k.clearBitmap('b1');
    await k.flush();
    const pages = await bitmapPages(k);
    await coreOf(k).file.close(); // abandoned: a crash
    // A page of a cluster that holds a referenced bitmap piece, itself referenced by nothing.
    const cluster = Math.floor(pages[0]! / B) * B;
    const free = [...Array(B / PAGE).keys()].map((i) => cluster + i * PAGE).filter((o) => !pages.includes(o));
    expect(free.length).toBeGreaterThan(0);
    const planted = free[free.length - 1]!;
    plantPage(img, planted);
    const before = await checkImage(img);
    expect(before.leakedBytes, before.warnings.join('; ')).toBe(PAGE);
    const r = await sweepAndClose(img);
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes, `planted at 0x${planted.toString(16)}: ${r.warnings.join('; ')}`).toBe(0);
    expect(r.pieces).toBeGreaterThanOrEqual(1);
  });

  it("an unreferenced page in the file's last, partial cluster", async () => {
    const img = join(tempDir('kscinc-pieces-'), 'img.ksc');
    await createImage(img, { size: 4 * 1024 * 1024, blockSize: B });
    const k = await openKsc(img, { write: true });
    await k.addBitmap('b1');
    await k.write(0, Buffer.alloc(4 * B, 7));
    await k.flush();
    await coreOf(k).file.close();
    const size = statSync(img).size;
    // The bitmap's page went to the end of the file (no free cluster to carve): its last cluster is partial.
    expect(size % B).not.toBe(0);
    plantPage(img, size); // a page appended after it, never referenced
    const before = await checkImage(img);
    expect(before.leakedBytes, before.warnings.join('; ')).toBe(PAGE);
    const r = await sweepAndClose(img);
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes, `planted at 0x${size.toString(16)}: ${r.warnings.join('; ')}`).toBe(0);
    expect(r.pieces).toBeGreaterThanOrEqual(1);
  });

  it('an unreferenced page in the first cluster, past the header, directory and intent words', async () => {
    const img = join(tempDir('kscinc-pieces-'), 'img.ksc');
    await createImage(img, { size: 4 * 1024 * 1024, blockSize: B });
    const k = await openKsc(img, { write: true });
    await k.addBitmap('b1');
    await k.write(0, Buffer.alloc(4 * B, 7));
    await k.flush();
    const pages = await bitmapPages(k);
    const c = coreOf(k);
    const h = c.header;
    await c.file.close();
    // The last page of cluster 0: the first structures and the bitmap's pieces (appended while the file was
    // shorter than a cluster) end before it, and data clusters start at the next cluster.
    const planted = B - PAGE;
    const ends = [h.directoryOffset + h.directoryEntries * 16, h.intentOffset + h.intentWords * 16, ...pages.map((p) => p + PAGE)];
    expect(Math.max(...ends.filter((e) => e <= B))).toBeLessThanOrEqual(planted);
    expect(pages).not.toContain(planted);
    plantPage(img, planted);
    const before = await checkImage(img);
    expect(before.leakedBytes, before.warnings.join('; ')).toBe(PAGE);
    const r = await sweepAndClose(img);
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes, `planted at 0x${planted.toString(16)}: ${r.warnings.join('; ')}`).toBe(0);
    expect(r.pieces).toBeGreaterThanOrEqual(1);
  });

  it('pieces the sweep reclaimed serve later metadata, and no referenced page is reclaimed', async () => {
    const img = join(tempDir('kscinc-pieces-'), 'img.ksc');
    await createImage(img, { size: 4 * 1024 * 1024, blockSize: B });
    const k = await openKsc(img, { write: true });
    await k.addBitmap('b1');
    await k.addBitmap('b2');
    await k.write(0, Buffer.alloc(8 * B, 3));
    await k.flush();
    await coreOf(k).file.close();
    const size = statSync(img).size;
    plantPage(img, size);
    const k2 = await openKsc(img, { write: true });
    expect(k2.sweep?.reclaimedPieces ?? 0).toBeGreaterThanOrEqual(1);
    // Bitmap management after the sweep allocates metadata: it must not land on a referenced page.
    for (let i = 0; i < 6; i++) {
      await k2.write((8 + i) * B, Buffer.alloc(B, 10 + i));
      await k2.clearBitmap(i % 2 ? 'b1' : 'b2');
      await k2.flush();
    }
    await k2.close();
    const r = await checkImage(img, { verify: true });
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes, r.warnings.join('; ')).toBe(0);
    const k3 = await openKsc(img);
    const got = await k3.read(0, 14 * B);
    await k3.close();
    expect(got.subarray(0, 8 * B).equals(Buffer.alloc(8 * B, 3))).toBe(true);
    for (let i = 0; i < 6; i++) expect(got.subarray((8 + i) * B, (9 + i) * B).equals(Buffer.alloc(B, 10 + i))).toBe(true);
  });
});
