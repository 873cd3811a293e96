/**
 * Readahead does not hold up a reader's own fetch (src/image/repo-chunks.ts): no readahead decode is
 * handed to the worker pool while a reader's chunk is decoding or waiting for a worker. Watched at the
 * pool's door (unpackInto): each call is a reader's (RepoChunks.decode) or readahead's
 * (RepoChunks.readUnpacked); a readahead call made while a reader's is in flight is counted. Readers: 4
 * interleaved sequential ones (readahead busy) and a random one among 14 chunks of its own.
 */
import { randomFillSync } from 'node:crypto';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { closePool, poolReady } from '../../src/compress/pool.js';
import { openKsc } from '../../src/image/open.js';
import type { BackupBacking } from '../../src/image/repobacking.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { liveFromBytes } from './helpers.js';

const watch = vi.hoisted(() => ({ on: false, demand: 0, demandCalls: 0, aheadCalls: 0, aheadWhileDemand: 0 }));

vi.mock('../../src/compress/pool.js', async (importOriginal) => {
  const m = await importOriginal<typeof import('../../src/compress/pool.js')>();
  return {
    ...m,
    unpackInto: async (...a: Parameters<typeof m.unpackInto>) => {
      if (!watch.on) return m.unpackInto(...a);
      const stack = new Error().stack ?? '';
      if (/\bdecode\b/.test(stack) && !/readUnpacked/.test(stack)) {
        watch.demandCalls++;
        watch.demand++;
        try {
          return await m.unpackInto(...a);
        } finally {
          watch.demand--;
        }
      }
      watch.aheadCalls++;
      if (watch.demand > 0) watch.aheadWhileDemand++;
      return m.unpackInto(...a);
    },
  };
});

const dir = tempDir('kscinc-ra-priority-');
afterAll(() => closePool());

describe('readahead behind the readers', () => {
  it("no readahead decode goes to the pool while a reader's chunk decodes", async () => {
    const seed = seedFor('test/live-restore/readahead-priority.test.ts');
    const rng = new Rng(seed);
    const data = Buffer.alloc(80 * MiB);
    for (let o = 0; o < data.length; o += 65536) if ((o / 65536) % 2 === 0) randomFillSync(data.subarray(o, o + 65536));
    const { target } = await liveFromBytes(dir, 'prio', data);
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      // The first chunk: the pool is up before the watch starts (a chunk read before is decoded on this thread).
      await img.read(79 * MiB, MiB);
      await vi.waitFor(() => expect(poolReady()).toBe(true), { timeout: 60_000, interval: 50 });
      watch.on = true;
      let stop = false;
      const random = (async () => {
        while (!stop) {
          // A turn of the event loop per read: reads of chunks already local may complete without one, and
          // this loop would then keep the sequential readers (and the test's timeout) from ever running.
          await new Promise((resolve) => setImmediate(resolve));
          const k = 64 + rng.int(0, 13);
          const got = await img.read(k * MiB, MiB);
          if (!got.equals(data.subarray(k * MiB, (k + 1) * MiB))) throw new Error(`chunk ${k} read wrong`);
        }
      })();
      for (let r = 0; r < 16; r++) {
        await Promise.all(
          [0, 1, 2, 3].map(async (i) => {
            const k = 16 * i + r;
            const got = await img.read(k * MiB, MiB);
            if (!got.equals(data.subarray(k * MiB, (k + 1) * MiB))) throw new Error(`chunk ${k} read wrong`);
          }),
        );
      }
      stop = true;
      await random;
      await b.settled();
      watch.on = false;
      console.log(
        `[readahead-priority] seed ${seed}: ${watch.demandCalls} readers' decodes, ${watch.aheadCalls} readahead decodes, ${watch.aheadWhileDemand} of them handed over while a reader's was in flight`,
      );
      expect(watch.demandCalls).toBeGreaterThan(4);
      expect(watch.aheadCalls).toBeGreaterThan(4);
      expect(watch.aheadWhileDemand).toBe(0);
    } finally {
      watch.on = false;
      await img.close();
    }
  }, 180_000);
});
