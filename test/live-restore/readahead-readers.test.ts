/**
 * Readahead of a live-restored image with several readers at once (src/image/repo-readahead.ts
 * ReadaheadStreams, src/image/repobacking.ts): interleaved sequential readers each get their own window
 * (coalesced reads of the packs, counted at the repository), a random reader gets nothing fetched ahead,
 * and readahead in flight stays within the image's bound (AHEAD_BYTES of chunks, AHEAD_READS pack reads)
 * with 32 readers whose readahead would go well past both without it (checked by breaking each bound once:
 * 116 MiB in flight without the byte bound, 15 pack reads without the read bound). Before, one window per image saw interleaved readers as jumps: every chunk was fetched
 * alone, on its reader's demand.
 */
import { randomFillSync } from 'node:crypto';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { closePool } from '../../src/compress/pool.js';
import { openKsc } from '../../src/image/open.js';
import { AHEAD_BYTES, AHEAD_READS, BackupBacking } from '../../src/image/repobacking.js';
import type { KscImage } from '../../src/image/ksc/image.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { liveFromBytes } from './helpers.js';

const dir = tempDir('kscinc-ra-readers-');
afterAll(() => closePool());

type Fn = (...a: unknown[]) => Promise<unknown>;

/** Counts the backing's repository reads: chunk by chunk (a reader's demand) and coalesced (readahead). */
function countReads(b: BackupBacking, delayMs = 0): { single: number; bulk: number; bulkNow: number; bulkPeak: number; aheadPeak: number } {
  const c = { single: 0, bulk: 0, bulkNow: 0, bulkPeak: 0, aheadPeak: 0 };
  const src = (b as unknown as { src: Record<string, Fn> }).src;
  const fetch = src.fetch!.bind(src);
  src.fetch = (...a: unknown[]) => {
    c.single++;
    return fetch(...a);
  };
  const unpacked = src.readUnpacked!.bind(src);
  src.readUnpacked = async (...a: unknown[]) => {
    c.bulk++;
    c.bulkPeak = Math.max(c.bulkPeak, ++c.bulkNow);
    c.aheadPeak = Math.max(c.aheadPeak, b.readaheadInFlight.bytes);
    try {
      // A slow repository (the bound test): readahead piles up in flight.
      if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs));
      return await unpacked(...a);
    } finally {
      c.bulkNow--;
    }
  };
  return c;
}

/**
 * A live restore of a `mib` MiB disk behind a slow repository (countReads with 20 ms per coalesced read), split
 * in `readers` stripes; `read(k)` reads chunk k, checks it and notes the readahead in flight after it.
 */
async function slowRestore(name: string, mib: number, readers: number) {
  const { target, data } = await liveFromBytes(dir, name, disk(mib));
  const img = await openKsc(target, { write: true });
  const b = img.backing as BackupBacking;
  const c = countReads(b, 20);
  const peak = { bytes: 0, reads: 0 };
  const read = async (k: number): Promise<void> => {
    await readChunk(img, data, k);
    peak.bytes = Math.max(peak.bytes, b.readaheadInFlight.bytes);
    peak.reads = Math.max(peak.reads, b.readaheadInFlight.reads);
  };
  return { img, data, b, c, stripe: mib / readers, peak, read };
}

/** A disk of `mib` MiB: 64 KiB runs, half random and half one repeated byte (stored ≈ 2:1, no chunk repeated). */
function disk(mib: number): Buffer {
  const b = Buffer.alloc(mib * MiB);
  for (let o = 0; o < b.length; o += 65536) {
    const run = b.subarray(o, o + 65536);
    if ((o / 65536) % 2 === 0) randomFillSync(run);
    else run.fill(1 + ((o / 65536) % 255));
  }
  return b;
}

/** Waits until readahead has nothing in flight (its last reads end just after their fills). */
async function idle(b: BackupBacking): Promise<void> {
  await b.settled();
  await vi.waitFor(() => expect(b.readaheadInFlight).toEqual({ bytes: 0, reads: 0 }), { timeout: 30_000, interval: 50 });
}

/** Reads chunk k whole and checks it. */
async function readChunk(img: KscImage, data: Buffer, k: number): Promise<void> {
  const got = await img.read(k * MiB, MiB);
  if (!got.equals(data.subarray(k * MiB, (k + 1) * MiB))) throw new Error(`chunk ${k} read wrong`);
}

describe('live restore readahead, several readers', () => {
  it('4 interleaved sequential readers each get coalesced readahead (repository reads counted)', async () => {
    const { target, data } = await liveFromBytes(dir, 'four', disk(64));
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const c = countReads(b);
      // Reader i reads chunks 16i … 16i+15 in order, the four taking turns read by read.
      for (let r = 0; r < 16; r++) for (let i = 0; i < 4; i++) await readChunk(img, data, 16 * i + r);
      await b.settled();
      console.log(`[readahead-readers] 4 readers of 16 MiB: ${b.stats.chunksFetched} chunks fetched, ${c.single} chunk by chunk + ${c.bulk} coalesced reads (${b.stats.reads} ranged reads in all)`);
      expect(b.stats.chunksFetched).toBe(64); // each chunk once
      // One window per image: 64 reads, every chunk alone on its reader's demand. Now the first reads of
      // each reader (and a few a batch did not reach in time), the rest in coalesced runs.
      expect(c.single).toBeLessThanOrEqual(4 * 4);
      expect(c.bulk).toBeGreaterThan(0);
      expect(b.stats.reads).toBeLessThanOrEqual(56); // one reader alone: about 32 (4 MiB reads, 60 chunks ahead)
      expect((await img.read(0, 64 * MiB)).equals(data)).toBe(true);
    } finally {
      await img.close();
    }
  }, 180_000);

  it('a random reader gets nothing fetched ahead; the sequential readers beside it keep theirs', async () => {
    const seed = seedFor('test/live-restore/readahead-readers.test.ts');
    const rng = new Rng(seed);
    const { target, data } = await liveFromBytes(dir, 'random', disk(96));
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const c = countReads(b);
      // The random reader: chunks 64, 67, …, 94 (never within a chunk of another) in a seeded order, far past
      // where the sequential readers' windows reach (chunk 48).
      const jumps = Array.from({ length: 11 }, (_, j) => 64 + 3 * j);
      for (let i = jumps.length - 1; i > 0; i--) {
        const j = rng.int(0, i);
        [jumps[i], jumps[j]] = [jumps[j]!, jumps[i]!];
      }
      for (let r = 0; r < 11; r++) {
        await readChunk(img, data, r);
        await readChunk(img, data, jumps[r]!);
        await readChunk(img, data, 16 + r);
      }
      await b.settled();
      const held = (await img.extents(64 * MiB, 32 * MiB)).filter((e) => e.depth === 0 && e.state === 'data').reduce((s, e) => s + e.length, 0);
      console.log(`[readahead-readers] seed ${seed}: random reader order ${jumps.join(' ')}; ${c.single} chunk by chunk + ${c.bulk} coalesced reads; ${held / MiB} MiB local past chunk 64`);
      expect(held).toBe(11 * MiB); // only the chunks it read
      expect(c.bulk).toBeGreaterThan(0); // the sequential readers' readahead
      expect(c.single).toBeLessThanOrEqual(11 + 2 * 3);
    } finally {
      await img.close();
    }
  }, 180_000);

  it('32 readers, a slow repository: readahead in flight stays within the bound; every read right, each chunk fetched once', async () => {
    const seed = seedFor('test/live-restore/readahead-readers.test.ts');
    const rng = new Rng(seed);
    const READERS = 32;
    const SIZE = 128 * MiB;
    const { img, data, b, c, stripe, peak, read } = await slowRestore('bound', SIZE / MiB, READERS);
    try {
      // Each reader issues a few sequential reads at once (a guest's queue), then waits for them; the 32
      // readers do so at the same time. Each group starts a stream (32 readers, STREAMS of them kept) whose
      // readahead waits behind the slow repository beside the others': 32 such batches would be well past
      // AHEAD_BYTES and their pack reads past AHEAD_READS without the bound (a reader that waited for each
      // read before the next, or readers taking turns, left it at about half of AHEAD_BYTES, bound or not).
      const readers = Array.from({ length: READERS }, async (_, i) => {
        for (let k = i * stripe; k < (i + 1) * stripe;) {
          const group: Promise<void>[] = [];
          for (const end = Math.min(k + rng.int(2, 4), (i + 1) * stripe); k < end; k++) group.push(read(k));
          await Promise.all(group);
        }
      });
      await Promise.all(readers);
      await idle(b);
      const peakBytes = Math.max(peak.bytes, c.aheadPeak);
      console.log(
        `[readahead-readers] seed ${seed}: ${READERS} readers of ${SIZE / MiB} MiB: ${b.stats.chunksFetched} chunks fetched, ${c.single} chunk by chunk + ${c.bulk} coalesced reads, readahead in flight at most ${peakBytes / MiB} MiB and ${Math.max(peak.reads, c.bulkPeak)} reads`,
      );
      expect(b.stats.chunksFetched).toBe(SIZE / MiB);
      // Readahead piled up to more than half the bound: without the bound it would have gone past it.
      expect(peakBytes).toBeGreaterThan(AHEAD_BYTES / 2);
      expect(peakBytes).toBeLessThanOrEqual(AHEAD_BYTES);
      expect(peak.reads).toBeLessThanOrEqual(AHEAD_READS);
      expect(c.bulkPeak).toBeLessThanOrEqual(AHEAD_READS);
      expect((await img.read(0, SIZE)).equals(data)).toBe(true);
    } finally {
      await img.close();
    }
  }, 300_000);

  it('8 interleaved sequential readers (a stream each), a slow repository: readahead reaches the bound and stays within it', async () => {
    const READERS = 8;
    const SIZE = 128 * MiB;
    const { img, b, c, stripe, peak, read } = await slowRestore('eight', SIZE / MiB, READERS);
    try {
      for (let r = 0; r < stripe; r++) for (let i = 0; i < READERS; i++) await read(i * stripe + r);
      await idle(b);
      const peakBytes = Math.max(peak.bytes, c.aheadPeak);
      console.log(
        `[readahead-readers] ${READERS} readers of ${SIZE / MiB} MiB: ${c.single} chunk by chunk + ${c.bulk} coalesced reads, readahead in flight at most ${peakBytes / MiB} MiB and ${Math.max(peak.reads, c.bulkPeak)} reads`,
      );
      expect(b.stats.chunksFetched).toBe(SIZE / MiB);
      // More than one stream's largest window (32 MiB) at once: the bound is what holds it.
      expect(peakBytes).toBeGreaterThan(32 * MiB);
      expect(peakBytes).toBeLessThanOrEqual(AHEAD_BYTES);
      expect(Math.max(peak.reads, c.bulkPeak)).toBeLessThanOrEqual(AHEAD_READS);
    } finally {
      await img.close();
    }
  }, 300_000);
});
