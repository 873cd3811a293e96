/**
 * Hostile: live-restore readahead (src/image/repo-readahead.ts, a window growing to 32 MiB) with 32
 * sequential readers at once, each its own stripe of the disk, their reads interleaved as 32 NBD
 * connections' would be. formats/nbd.md's bounded resources: memory and the fetches from the repository in
 * flight must stay bounded whatever the readers do. Counted: the repository reads in flight at once (chunk
 * by chunk, RepoChunks.fetch, and coalesced, readUnpacked), the array buffers held; each read must be right
 * and each chunk fetched once at most. Printed: how many chunks the readers waited on one by one (32
 * readers taking turns read by read are more than the 8 streams an image follows: each read is a jump).
 */
import { randomBytes } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import { closePool } from '../../src/compress/pool.js';
import { openKsc } from '../../src/image/open.js';
import { AHEAD_READS, type BackupBacking } from '../../src/image/repobacking.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { liveFromBytes } from '../live-restore/helpers.js';

const dir = tempDir('kscinc-hostile-ramany-');
const MiB = 1 << 20;
const KiB = 1024;
afterAll(() => closePool());

describe('live-restore readahead with 32 sequential readers at once', () => {
  it('repository reads in flight and memory stay bounded; every read right, each chunk fetched once at most', async () => {
    const seed = seedFor('test/hostile/readahead-many-readers.test.ts');
    const rng = new Rng(seed);
    const SIZE = 96 * MiB;
    const READERS = 32;
    const { target, data } = await liveFromBytes(dir, 'many', randomBytes(SIZE));
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const src = (b as unknown as { src: Record<string, (...a: unknown[]) => Promise<unknown>> }).src;
      let now = 0;
      let peakFetches = 0;
      let single = 0;
      let bulk = 0;
      for (const name of ['fetch', 'readUnpacked'] as const) {
        const orig = src[name]!.bind(src);
        src[name] = async (...a: unknown[]) => {
          now++;
          if (name === 'fetch') single++;
          else bulk++;
          peakFetches = Math.max(peakFetches, now);
          try {
            return await orig(...a);
          } finally {
            now--;
          }
        };
      }
      const mem0 = process.memoryUsage().arrayBuffers;
      let peakMem = 0;
      const stripe = SIZE / READERS;
      const readers = Array.from({ length: READERS }, async (_, i) => {
        for (let off = i * stripe; off < (i + 1) * stripe; off += 128 * KiB) {
          const got = await img.read(off, 128 * KiB);
          if (!got.equals(data.subarray(off, off + 128 * KiB))) throw new Error(`reader ${i}: read at ${off} is wrong`);
          peakMem = Math.max(peakMem, process.memoryUsage().arrayBuffers - mem0);
          if (rng.chance(0.3)) await new Promise((r) => setImmediate(r));
        }
      });
      await Promise.all(readers);
      await b.settled();
      console.log(
        `[readahead-many-readers] seed ${seed}: ${READERS} readers of ${SIZE / MiB} MiB: ${b.stats.chunksFetched} chunks fetched, repository reads ${single} chunk by chunk + ${bulk} coalesced, at most ${peakFetches} in flight, array buffers peak +${(peakMem / MiB).toFixed(0)} MiB`,
      );
      expect(b.stats.chunksFetched).toBeLessThanOrEqual(SIZE / MiB);
      // One read in flight per reader waiting, plus readahead's (at most AHEAD_READS per image, session 16;
      // before, two per batch: 3 × READERS was the bound): never one per chunk of the disk.
      expect(peakFetches).toBeLessThanOrEqual(READERS + AHEAD_READS);
      expect(peakMem / MiB, 'array buffers held while 32 readers read (MiB)').toBeLessThan(384);
      expect((await img.read(0, SIZE)).equals(data)).toBe(true);
    } finally {
      await img.close();
    }
  }, 180_000);
});
