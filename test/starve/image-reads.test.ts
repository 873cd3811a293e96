/**
 * Reads that settle without any I/O give the event loop turns too (src/util/turns.ts), counted with a chain
 * of setImmediates beside a loop of reads (old code: 0 turns in the whole loop):
 *  - a ksc_inc image's holes (KscImage.read: zeros, no file read at all);
 *  - a live restore's zero chunks (BackupBacking.readInto: zeros from the manifest) and its chunks already
 *    filled locally (the image's own clusters, in the page cache);
 *  - the fingerprint of a sparse raw base (engines/migrate-base.ts: holes are skipped without a read).
 */
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage, openKsc } from '../../src/image/open.js';
import { fingerprintV1 } from '../../src/engines/migrate-base.js';
import { closePool } from '../../src/compress/pool.js';
import { RUN_MAX } from '../../src/util/turns.js';
import { tempDir } from '../helpers/tmp.js';
import { turnsDuring } from '../helpers/turns.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { dataThenZeros, openLiveWritable } from '../helpers/live-open.js';

const dir = tempDir('kscinc-starve-reads-');
afterAll(() => closePool());

/** At least one turn per 2 × RUN_MAX steps (pace() gives one per RUN_MAX at most; slack for the ends). */
const enough = (steps: number): number => Math.floor(steps / RUN_MAX / 2);

describe('reads without I/O give the event loop turns', () => {
  it("a ksc_inc image's holes", async () => {
    const path = join(dir, 'holes.ksc');
    await createImage(path, { size: 256 * MiB, blockSize: 64 * 1024 });
    const img = await openKsc(path, { write: true });
    try {
      const reads = 20_000;
      const turns = await turnsDuring(async () => {
        for (let i = 0; i < reads; i++) await img.read(((i * 7919) % 65536) * 4096, 4096);
      });
      console.log(`[starve] ${turns} turns during ${reads} reads of holes`);
      expect(turns).toBeGreaterThanOrEqual(enough(reads));
    } finally {
      await img.close();
    }
  });

  it("a live restore's zero chunks and its chunks filled already", async () => {
    const data = dataThenZeros(32, 16); // chunks 0–15 data, 16–31 zero chunks of the backup
    const { img } = await openLiveWritable(dir, 'live', data);
    try {
      for (let o = 0; o < 16 * MiB; o += MiB) await img.read(o, MiB); // filled: local from now on
      const reads = 20_000;
      for (const [what, base] of [
        ['zero chunks', 16 * MiB],
        ['local chunks', 0],
      ] as const) {
        const turns = await turnsDuring(async () => {
          for (let i = 0; i < reads; i++) {
            const at = base + ((i * 7919) % 4096) * 4096;
            const got = await img.read(at, 4096);
            if (!got.equals(data.subarray(at, at + 4096))) throw new Error(`read at ${at} is wrong`);
          }
        });
        console.log(`[starve] ${turns} turns during ${reads} reads of a live restore's ${what}`);
        expect(turns, what).toBeGreaterThanOrEqual(enough(reads));
      }
    } finally {
      await img.close();
    }
  });

  it('the fingerprint of a sparse raw base', async () => {
    const path = join(dir, 'sparse.raw');
    const fd = openSync(path, 'w');
    ftruncateSync(fd, 4096 * MiB);
    closeSync(fd);
    const dev = await openImage(path);
    try {
      let fp = '';
      const turns = await turnsDuring(async () => void (fp = await fingerprintV1(dev)));
      console.log(`[starve] ${turns} turns while fingerprinting a 4 GiB hole (4096 steps): ${fp}`);
      expect(turns).toBeGreaterThanOrEqual(enough(4096));
    } finally {
      await dev.close();
    }
  });
});
