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

/** A crashed image with a bitmap and four written blocks (more steps in `more`), abandoned: its core as left. */
async function crashedImage(img: string, more: (k: KscImage) => Promise<void> = async () => {}): Promise<{ pages: number[]; end: number }> {
  await createImage(img, { size: 4 * 1024 * 1024, blockSize: B });
  const k = await openKsc(img, { write: true });
  await k.addBitmap('b1');
  await k.write(0, Buffer.alloc(4 * B, 7));
  await k.flush();
  await more(k);
  const pages = await bitmapPages(k);
  const c = coreOf(k);
  const end = c.header.intentOffset + c.header.intentWords * 16;
  await c.file.close(); // abandoned: a crash
  return { pages, end };
}

/**
 * Plants a page a crashed writer wrote at `planted` (check must see it leaked), then reopens (the sweep
 * runs) and closes cleanly: nothing may stay leaked, and the sweep must say it reclaimed pieces.
 */
async function expectPieceReclaimed(img: string, planted: number): Promise<void> {
  plantPage(img, planted);
  const before = await checkImage(img);
  expect(before.leakedBytes, before.warnings.join('; ')).toBe(PAGE);
  const k = await openKsc(img, { write: true });
  const pieces = k.sweep?.reclaimedPieces ?? 0;
  expect(k.sweep?.skipped ?? null).toBeNull();
  await k.close();
  const r = await checkImage(img, { verify: true });
  expect(r.errors).toEqual([]);
  expect(r.leakedBytes, `planted at 0x${planted.toString(16)}: ${r.warnings.join('; ')}`).toBe(0);
  expect(pieces).toBeGreaterThanOrEqual(1);
}

describe('the leak sweep reclaims 4 KiB metadata pieces', () => {
  it('an unreferenced page inside a cluster that holds a referenced bitmap table', async () => {
    const img = join(tempDir('kscinc-pieces-'), 'img.ksc');
    const { pages } = await crashedImage(img, async (k) => {
      await k.discard(B, B); // frees a cluster: the next bitmap table is carved out of it
      await k.flush();
      await k.clearBitmap('b1');
      await k.flush();
    });
    // A page of a cluster that holds a referenced bitmap piece, itself referenced by nothing.
    const cluster = Math.floor(pages[0]! / B) * B;
    const free = [...Array(B / PAGE).keys()].map((i) => cluster + i * PAGE).filter((o) => !pages.includes(o));
    expect(free.length).toBeGreaterThan(0);
    await expectPieceReclaimed(img, free[free.length - 1]!);
  });

  it("an unreferenced page in the file's last, partial cluster", async () => {
    const img = join(tempDir('kscinc-pieces-'), 'img.ksc');
    await crashedImage(img);
    const size = statSync(img).size;
    // The bitmap's page went to the end of the file (no free cluster to carve): its last cluster is partial.
    expect(size % B).not.toBe(0);
    await expectPieceReclaimed(img, size); // a page appended after it, never referenced
  });

  it('an unreferenced page in the first cluster, past the header, directory and intent words', async () => {
    const img = join(tempDir('kscinc-pieces-'), 'img.ksc');
    const { pages, end } = await crashedImage(img);
    // The last page of cluster 0: the first structures and the bitmap's pieces (appended while the file was
    // shorter than a cluster) end before it, and data clusters start at the next cluster.
    const planted = B - PAGE;
    expect(Math.max(end, ...pages.filter((p) => p < B).map((p) => p + PAGE))).toBeLessThanOrEqual(planted);
    await expectPieceReclaimed(img, planted);
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
