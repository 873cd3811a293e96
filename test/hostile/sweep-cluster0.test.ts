/**
 * Hostile: the leak sweep's 4 KiB pieces of cluster 0 (src/image/sweep.ts: past the header slots it holds
 * the directory, the intent words and early metadata pieces) on damaged images whose tables point into it.
 * A crashed image gets a validly sealed directory entry or bitmap table entry pointing into cluster 0: at a
 * header slot, or at a page of other metadata (the directory's own page, the intent words). What such an
 * entry names cannot be trusted, so the sweep must reclaim nothing (not a piece of cluster 0, nor a leaked
 * page planted at the end), whether it runs at open or deferred; and the header slots still open the image.
 * Except a bitmap table entry cross-linked to another structure's page, which passes the table's checks
 * (its page then fails its own, sealed for the bitmap, and is never rewritten): there the sweep may reclaim
 * the bitmap's old, now unreferenced page, and must leave the map and the data intact.
 */
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { TAG_DIR, tagBitmapTable } from '../../src/format/constants.js';
import { seal } from '../../src/format/seal.js';
import { coreOf } from '../../src/image/ksc/image.js';
import { createImage, openKsc } from '../../src/index.js';
import { readAt, writeAt } from '../helpers/corrupt.js';
import { tempDir } from '../helpers/tmp.js';

const PAGE = 4096;

type Table = 'directory' | 'bitmap table';
type Target = 'header slot 2' | 'the directory' | 'the intent words';

describe('tables pointing into cluster 0: the sweep reclaims nothing', () => {
  const cases: [number, Table, Target][] = [];
  for (const B of [64 * 1024, 1024 * 1024]) {
    for (const t of ['header slot 2', 'the directory', 'the intent words'] as const) cases.push([B, 'directory', t]);
    for (const t of ['header slot 2', 'the directory', 'the intent words'] as const) cases.push([B, 'bitmap table', t]);
  }
  for (const [B, table, target] of cases) {
    for (const deferSweep of [false, true]) {
      it(`${B / 1024} KiB blocks: a sealed ${table} entry pointing at ${target}${deferSweep ? ' (deferred sweep)' : ''}`, async () => {
        const img = join(tempDir('kscinc-sweep0-'), 'img.ksc');
        await createImage(img, { size: 64 * 1024 * 1024, blockSize: B });
        const k = await openKsc(img, { write: true });
        await k.addBitmap('b1');
        await k.write(0, Buffer.alloc(B, 7));
        await k.write(5 * B, Buffer.alloc(B, 9));
        await k.close();
        // A writer that crashed with nothing in flight: the free list is void, the sweep runs at the next open.
        const crashed = await openKsc(img, { write: true });
        const c = coreOf(crashed);
        const h = c.header;
        const bitmap = c.bitmapSlots.find((b) => b !== null)!;
        const ranges = await bitmap.hostRanges();
        await c.file.close();
        const at = { 'header slot 2': PAGE, 'the directory': h.directoryOffset - (h.directoryOffset % PAGE), 'the intent words': h.intentOffset - (h.intentOffset % PAGE) }[target];
        expect(at, `${target} is in cluster 0`).toBeLessThan(B);
        let where: number;
        if (table === 'directory') {
          where = h.directoryOffset; // entry 0: map page 0
          const rec = readAt(img, where, 16);
          rec.fill(0, 0, 12);
          rec.writeBigUInt64LE(BigInt(at), 0);
          seal(rec, TAG_DIR, 0);
          writeAt(img, where, rec);
        } else {
          where = ranges[0]!.offset; // the table; entry 0: page 0 of the bitmap
          const rec = readAt(img, where, 16);
          rec.fill(0, 0, 12);
          rec.writeBigUInt64LE(BigInt(at), 0);
          seal(rec, tagBitmapTable(c.bitmapSlots.indexOf(bitmap)), 0);
          writeAt(img, where, rec);
        }
        const end = statSync(img).size;
        const planted = Buffer.alloc(PAGE, 0xa5);
        writeAt(img, end, planted); // a leaked page: the sweep would take it if it swept
        const cluster0 = readAt(img, 2 * PAGE, Math.min(B, end) - 2 * PAGE); // past the header slots
        let sweep: { reclaimed: number; reclaimedPieces?: number; skipped: string | null } | null = null;
        let openError: string | null = null;
        try {
          const k2 = await openKsc(img, { write: true, deferSweep });
          try {
            sweep = await k2.swept();
          } finally {
            await k2.close().catch(() => undefined);
          }
        } catch (e) {
          openError = (e as Error).message; // refusing the damaged image is as good as sweeping nothing
        }
        // A bitmap table entry naming another structure's page passes the table's checks; the page fails its
        // own (its words are sealed for the bitmap): the bitmap reads it as wholly dirty and never rewrites it.
        // The sweep may then reclaim the bitmap's old page, which nothing on disk references any more; it
        // must not touch what is referenced. Every other damaged entry makes it reclaim nothing.
        const crossLink = table === 'bitmap table' && target !== 'header slot 2';
        if (openError === null && !crossLink) {
          expect(sweep?.skipped, `sweep ${JSON.stringify(sweep)}`).toBeTruthy();
          expect(sweep?.reclaimed ?? 0).toBe(0);
          expect(sweep?.reclaimedPieces ?? 0).toBe(0);
        }
        if (!crossLink) {
          expect(readAt(img, end, PAGE).equals(planted), `the leaked page was left alone (${openError ?? JSON.stringify(sweep)})`).toBe(true);
          // Nothing past the header slots in cluster 0 was zeroed: each page that held bytes still does.
          const now = readAt(img, 2 * PAGE, cluster0.length);
          for (let o = 0; o < cluster0.length; o += PAGE) {
            const was = cluster0.subarray(o, o + PAGE);
            const is = now.subarray(o, o + PAGE);
            if (was.some((x) => x !== 0))
              expect(
                is.some((x) => x !== 0),
                `page 0x${(2 * PAGE + o).toString(16)} of cluster 0 was zeroed`,
              ).toBe(true);
          }
        } else {
          expect(openError, 'the cross-linked image opens for writing').toBeNull();
          // The map and the data are intact; check names the bitmap's damage and the overlap, nothing else.
          const chk = await checkImage(img, { verify: true });
          expect(
            chk.errors.filter((e) => !/bitmap "b1"/.test(e)),
            JSON.stringify(chk.errors),
          ).toEqual([]);
          const r = await openKsc(img);
          try {
            expect((await r.read(0, B)).equals(Buffer.alloc(B, 7)), 'block 0').toBe(true);
            expect((await r.read(5 * B, B)).equals(Buffer.alloc(B, 9)), 'block 5').toBe(true);
          } finally {
            await r.close();
          }
        }
        // The image still opens (read-only) from its header slots.
        const r = await openKsc(img);
        await r.close();
      });
    }
  }
});
