/**
 * Hostile: live-restore readahead (src/image/repobacking.ts readAhead, KSCINC_LIVE_READAHEAD) against the
 * guest. Sequential readers make the backing fetch and fill the chunks ahead of them (copy-on-read fills,
 * datapath.ts fillFromBacking) while a writer writes whole blocks, partial blocks, zeroes and trims into
 * those very chunks, with seeded small delays: the guest's change must win over any fill of the same block
 * (the fill leaves a block alone once a change got there first), a read racing a write of its range sees
 * the old or the new bytes per 4 KiB, never anything else, and reads of other chunks are never disturbed.
 * Then the whole disk reads as the model, after a close and reopen too, and `check --verify` is clean.
 * Also: many sequential readers at once, each read answered right, every chunk fetched once at most.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { openKsc } from '../../src/image/open.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { liveFromBytes } from '../live-restore/helpers.js';

const dir = tempDir('kscinc-hostile-ra-');
const seed = seedFor('test/hostile/readahead-races.test.ts');
const rng = new Rng(seed);
const KiB = 1024;
afterAll(() => closePool());

/** A disk of random bytes backed up with 1 MiB chunks, live-restored to a new image. */
async function liveImage(name: string, size: number): Promise<{ target: string; data: Buffer }> {
  return liveFromBytes(dir, name, randomBytes(size));
}

const tick = (): Promise<void> => new Promise((r) => (rng.chance(0.5) ? setImmediate(r) : setTimeout(r, rng.int(0, 4))));

describe('live-restore readahead racing the guest', () => {
  it('guest writes into chunks being filled by readahead win; reads see old or new per 4 KiB; the disk ends as the model', async () => {
    const SIZE = 24 * MiB;
    const { target, data } = await liveImage('race', SIZE);
    const model = Buffer.from(data);
    const img = await openKsc(target, { write: true });
    const B = img.blockSize;
    /** Per 4 KiB piece: every content it has had (old, then each write), for racing reads. */
    const versions = new Map<number, Buffer[]>();
    const note = (off: number, len: number): void => {
      for (let p = Math.floor(off / (4 * KiB)); p < Math.ceil((off + len) / (4 * KiB)); p++) {
        const v = versions.get(p) ?? [Buffer.from(data.subarray(p * 4 * KiB, (p + 1) * 4 * KiB))];
        v.push(Buffer.from(model.subarray(p * 4 * KiB, (p + 1) * 4 * KiB)));
        versions.set(p, v);
      }
    };
    const bad: string[] = [];
    const checkRead = (off: number, got: Buffer, what: string): void => {
      for (let o = 0; o < got.length; o += 4 * KiB) {
        const p = (off + o) / (4 * KiB);
        const piece = got.subarray(o, o + 4 * KiB);
        const ok = versions.has(p) ? versions.get(p)!.some((v) => v.equals(piece)) : piece.equals(data.subarray(p * 4 * KiB, (p + 1) * 4 * KiB));
        if (!ok) bad.push(`${what}: 4 KiB piece ${p} holds bytes it never had`);
      }
    };
    try {
      expect(img.backing).toBeInstanceOf(BackupBacking);
      let readerAt = 0;
      let stop = false;
      // Sequential readers: 256 KiB reads in order (readahead fetches the 4 chunks ahead of them).
      const reader = async (from: number, to: number): Promise<void> => {
        for (let off = from; off < to; off += 256 * KiB) {
          readerAt = Math.max(readerAt, off);
          const got = await img.read(off, 256 * KiB);
          checkRead(off, got, `read ${off}`);
          if (rng.chance(0.3)) await tick();
        }
      };
      // The guest writes a little ahead of the reader: into the chunks readahead is fetching and filling.
      const writer = async (): Promise<void> => {
        while (!stop) {
          const chunk = Math.floor(readerAt / MiB) + rng.int(1, 4);
          if (chunk * MiB >= SIZE) {
            await tick();
            continue;
          }
          const kind = rng.weighted({ whole: 3, partial: 4, zero: 1, trim: 1 });
          const blocksPerChunk = MiB / B;
          const b = chunk * blocksPerChunk + rng.int(0, blocksPerChunk - 1);
          let off = b * B;
          let len = B;
          if (kind === 'partial') {
            off += rng.int(0, B / (4 * KiB) - 1) * 4 * KiB;
            len = Math.min(rng.int(1, 8) * 4 * KiB, (b + 1) * B - off);
          }
          if (kind === 'whole' || kind === 'partial') {
            const d = rng.bytes(len);
            d.copy(model, off);
            note(off, len);
            await img.write(off, d);
          } else {
            model.fill(0, off, off + len);
            note(off, len);
            await (kind === 'zero' ? img.writeZeroes(off, len, { mayTrim: rng.chance(0.5) }) : img.discard(off, len));
          }
          if (rng.chance(0.5)) await tick();
        }
      };
      const w = writer();
      await Promise.all([reader(0, SIZE / 2), reader(SIZE / 2, SIZE)]);
      stop = true;
      await w;
      await (img.backing as BackupBacking).settled();
      expect(bad).toEqual([]);
      expect(versions.size, 'pieces the guest changed').toBeGreaterThan(20);
      const all = await img.read(0, SIZE);
      const wrong = [];
      for (let o = 0; o < SIZE; o += 4 * KiB) if (!all.subarray(o, o + 4 * KiB).equals(model.subarray(o, o + 4 * KiB))) wrong.push(o / (4 * KiB));
      expect(wrong, 'pieces not as the guest left them').toEqual([]);
    } finally {
      await img.close();
    }
    const again = await openKsc(target);
    try {
      expect((await again.read(0, SIZE)).equals(model), 'after reopening').toBe(true);
    } finally {
      await again.close();
    }
    const chk = await checkImage(target, { verify: true });
    expect(chk.errors).toEqual([]);
  }, 180_000);

  it('16 sequential readers at once: every read right, each chunk fetched once at most', async () => {
    const SIZE = 32 * MiB;
    const { target, data } = await liveImage('many', SIZE);
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const mem0 = process.memoryUsage().arrayBuffers;
      let peak = 0;
      const readers = Array.from({ length: 16 }, async (_, i) => {
        const from = i * 2 * MiB;
        for (let off = from; off < Math.min(SIZE, from + 8 * MiB); off += 128 * KiB) {
          const got = await img.read(off, 128 * KiB);
          if (!got.equals(data.subarray(off, off + 128 * KiB))) throw new Error(`reader ${i}: read at ${off} is wrong`);
          peak = Math.max(peak, process.memoryUsage().arrayBuffers - mem0);
          if (rng.chance(0.2)) await tick();
        }
      });
      await Promise.all(readers);
      await b.settled();
      console.log(`[readahead-races] 16 readers: ${b.stats.chunksFetched} chunks fetched of ${SIZE / MiB}, array buffers peak +${(peak / MiB).toFixed(0)} MiB`);
      expect(b.stats.chunksFetched).toBeLessThanOrEqual(SIZE / MiB);
      // Readers overlap (each reads 8 MiB from 2 MiB apart): fetched once and shared, a bounded set in flight.
      expect(peak / MiB, 'array buffers held while 16 readers read (MiB)').toBeLessThan(256);
      expect((await img.read(0, SIZE)).equals(data)).toBe(true);
    } finally {
      await img.close();
    }
  }, 180_000);
});
