/**
 * Every bitmap operation is atomic with respect to concurrent changes (formats/ksc_inc.md §9 rule 6): a
 * change either lands before the operation and is in its result, or after it and is marked in the live
 * bitmap. Writers hammer the image (writes, partial writes, zeroes, discards, flushes) while the operations
 * run one after another; afterwards every block changed since the first clear is dirty in the live bitmap
 * (or in the frozen one while a handover is open), in memory and after a reopen. Many seeds, each printed.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import type { KscImage } from '../../src/image/ksc.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-bitmap-atomic-');
const seed = seedFor('test/image/bitmap-atomic.test.ts');
const root = new Rng(seed);
const B = 64 * 1024;
const SIZE = 32 * 1024 * 1024;

type Range = [offset: number, length: number];

async function dirtyBlocks(img: KscImage, names: string[]): Promise<Set<number>> {
  const s = new Set<number>();
  for (const n of names) {
    if (!img.hasBitmap(n)) continue;
    for (const e of await img.bitmapExtents(n)) for (let b = Math.floor(e.offset / B); b * B < e.offset + e.length; b++) s.add(b);
  }
  return s;
}

function blocksOf(ranges: Range[]): Set<number> {
  const s = new Set<number>();
  for (const [o, l] of ranges) for (let b = Math.floor(o / B); b <= Math.floor((o + l - 1) / B); b++) s.add(b);
  return s;
}

function missing(want: Set<number>, have: Set<number>): number[] {
  return [...want].filter((b) => !have.has(b)).sort((a, b) => a - b);
}

/** One writer: changes at random places until stopped; records each completed change with tag() as of its issue. */
async function writer<T>(img: KscImage, rng: Rng, stop: { now: boolean }, tag: () => T, out: { range: Range; tag: T }[]): Promise<void> {
  for (let i = 0; i < 100_000 && !stop.now; i++) {
    const issued = tag();
    const len = rng.int(1, 3 * B);
    const at = rng.int(0, SIZE - len);
    const op = rng.weighted({ write: 6, zero: 1, discard: 1, flush: 1 });
    if (op === 'write') await img.write(at, Buffer.alloc(len, 1 + (i % 255)), { fua: rng.chance(0.05) });
    else if (op === 'zero') await img.writeZeroes(at, len, { mayTrim: rng.chance(0.5) });
    else if (op === 'discard') await img.discard(at, len);
    else await img.flush();
    if (op !== 'flush') out.push({ range: [at, len], tag: issued });
  }
}

describe('bitmap operations under concurrent writers', () => {
  for (let round = 0; round < 6; round++) {
    const rng = root.fork();
    it(`every block changed since the clear stays dirty (round ${round}, seed ${rng.seed})`, async () => {
      const path = join(dir, `r${round}.ksc`);
      await createImage(path, { size: SIZE, blockSize: B, intentRegion: B * 16 });
      let img = await openKsc(path, { write: true });
      try {
        await img.addBitmap('live');
        await img.addBitmap('other');
        await img.write(0, Buffer.alloc(4 * B, 7)); // bits for "other" to merge
        await img.clearBitmap('live');
        const written: { range: Range; tag: number }[] = [];
        const phase = { n: 0 };
        const stop = { now: false };
        const writers = Array.from({ length: 6 }, () => writer(img, rng.fork(), stop, () => phase.n, written));
        const stopWriters = async (): Promise<void> => {
          stop.now = true;
          await Promise.allSettled(writers);
        };
        const tick = (): Promise<void> => new Promise((r) => setTimeout(r, rng.int(0, 3)));
        const ops: [string, () => Promise<void>][] = [
          ['merge', () => img.mergeBitmap('other', 'live')],
          ['clear other', () => img.clearBitmap('other')],
          ['freeze', () => img.freezeBitmap('live', 'live.frozen')],
          ['recover (merge the frozen bitmap back)', () => img.mergeBitmap('live.frozen', 'live')],
          ['remove frozen', () => img.removeBitmap('live.frozen')],
          ['add', () => img.addBitmap('added')],
          ['updateBitmaps', () => img.updateBitmaps(['tok'], ['other'])],
          [
            'enable and disable',
            async () => {
              await img.setBitmapEnabled('tok', true);
              await img.setBitmapEnabled('tok', false);
            },
          ],
          ['freeze again', () => img.freezeBitmap('live', 'live.frozen')],
          ['merge another bitmap into the frozen one', () => img.mergeBitmap('added', 'live.frozen')],
          ['recover again', () => img.mergeBitmap('live.frozen', 'live')],
          ['remove the frozen bitmap', () => img.removeBitmap('live.frozen')],
        ];
        const addPhase = ops.findIndex(([n]) => n === 'add') + 1;
        try {
          for (const [name, op] of ops) {
            await tick();
            await op();
            phase.n++;
            const lost = missing(blocksOf(written.map((w) => w.range)), await dirtyBlocks(img, ['live', 'live.frozen']));
            expect(lost, `after ${name}: blocks written since the clear but not dirty (seed ${rng.seed})`).toEqual([]);
          }
        } finally {
          await stopWriters();
        }
        await Promise.all(writers);
        // Changes issued after addBitmap resolved are in the new bitmap.
        const lostAdded = missing(blocksOf(written.filter((w) => w.tag >= addPhase).map((w) => w.range)), await dirtyBlocks(img, ['added']));
        expect(lostAdded, `blocks written after "added" was added but not dirty in it (seed ${rng.seed})`).toEqual([]);
        const want = blocksOf(written.map((w) => w.range));
        expect(missing(want, await dirtyBlocks(img, ['live'])), `blocks not dirty in "live" (seed ${rng.seed})`).toEqual([]);
        await img.close();
        img = await openKsc(path, { write: true });
        expect(missing(want, await dirtyBlocks(img, ['live'])), `after reopening: blocks not dirty in "live" (seed ${rng.seed})`).toEqual([]);
      } finally {
        await img.close();
      }
    });
  }

  for (let round = 0; round < 3; round++) {
    const rng = root.fork();
    it(`copyBitmapsTo keeps the target's changes made while it copies (round ${round}, seed ${rng.seed})`, async () => {
      const names = ['x', 'y', 'z'];
      const src = join(dir, `c${round}-src.ksc`);
      const dst = join(dir, `c${round}-dst.ksc`);
      await createImage(src, { size: SIZE, blockSize: B });
      await createImage(dst, { size: SIZE, blockSize: B });
      const a = await openKsc(src, { write: true });
      const b = await openKsc(dst, { write: true });
      try {
        for (const n of names) await a.addBitmap(n);
        await a.write(0, Buffer.alloc(8 * B, 3));
        const srcBits = await dirtyBlocks(a, ['x']);
        // Each change records which of dst's bitmaps existed when it was issued: it must be in all of them.
        const written: { range: Range; tag: string[] }[] = [];
        const stop = { now: false };
        const writers = Array.from({ length: 6 }, () => writer(b, rng.fork(), stop, () => names.filter((n) => b.hasBitmap(n)), written));
        try {
          await new Promise((r) => setTimeout(r, rng.int(0, 3)));
          await a.copyBitmapsTo(b);
          await new Promise((r) => setTimeout(r, rng.int(0, 3)));
        } finally {
          stop.now = true;
          await Promise.allSettled(writers);
        }
        await Promise.all(writers);
        for (const n of names) {
          const want = new Set([...srcBits, ...blocksOf(written.filter((w) => w.tag.includes(n)).map((w) => w.range))]);
          expect(missing(want, await dirtyBlocks(b, [n])), `bitmap "${n}" of the copy (seed ${rng.seed})`).toEqual([]);
        }
      } finally {
        await b.close();
        await a.close();
      }
    });
  }
});
