/**
 * Hostile (session 22): the process-wide block assembly (block-buffers.ts, ASSEMBLY_BYTES = 32 MiB) must serve
 * a waiting writer while others keep writing. 16 writers each keep two 4 KiB writes in flight into their own
 * new 2 MiB block (partial.ts: a new block's chain of waves holds its 2 MiB reservation while pieces keep
 * coming): the assembly is full. Then one write of 4 KiB into another new block needs 2 MiB of it (it waits,
 * FIFO, in writeLocked, and from then on every other new block's first write waits behind it). It must be
 * done while the 16 go on (within a few seconds), not only once they stop; every reservation is given back
 * and the image reads as the writes' model.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ASSEMBLY_BYTES, assemblyReserved } from '../../src/image/ksc/block-buffers.js';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const B = 2 * MiB;
const LANES = ASSEMBLY_BYTES / B; // 16: the assembly full of new blocks' chains
const SIZE = (LANES + 8) * B;
const PIECE = 4 * KiB;
const SLOTS = B / PIECE;
const HAMMER_MS = 6000;
const dir = tempDir('kscinc-hostile-s22-starve-');
let dev: BlockDevice | null = null;

afterAll(async () => {
  await dev?.close();
});

describe('block assembly: a waiting writer while new blocks’ chains go on', () => {
  for (const native of [true, false]) {
    it(`a 4 KiB write into a new block is done while 16 chains fill the assembly (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, async () => {
      const prev = process.env['KSCINC_NO_NATIVE'];
      if (native) delete process.env['KSCINC_NO_NATIVE'];
      else process.env['KSCINC_NO_NATIVE'] = '1';
      const path = join(dir, `s-${native}.ksc`);
      const model = Buffer.alloc(SIZE);
      try {
        await createImage(path, { size: SIZE, blockSize: B });
        dev = await openImage(path, { write: true });
        await dev.read(0, PIECE); // loads the map page (partial.ts takes pieces only then)
        let stop = false;
        let written = 0;
        const lane = async (l: number): Promise<void> => {
          let seq = 0;
          const one = async (): Promise<void> => {
            const s = seq++;
            const off = l * B + (s % SLOTS) * PIECE;
            const data = Buffer.alloc(PIECE, (l * 7 + s) % 251);
            await dev!.write(off, data);
            data.copy(model, off);
            written++;
          };
          // Two in flight at a time, on neighbouring slots (never overlapping); the second starts a turn later, so
          // that it queues for the chain's next wave, and from then on one is always queued behind the other.
          const go = async (): Promise<void> => {
            while (!stop) await one();
          };
          const first = go();
          await new Promise((r) => setImmediate(r));
          await Promise.all([first, go()]);
        };
        const started = Date.now();
        const lanes = Promise.all(Array.from({ length: LANES }, (_, l) => lane(l)));
        const until = Date.now() + 5000;
        while (assemblyReserved() < ASSEMBLY_BYTES && Date.now() < until) await new Promise((r) => setTimeout(r, 5));
        expect(assemblyReserved(), 'the chains fill the assembly').toBe(ASSEMBLY_BYTES);
        const victimOff = (LANES + 2) * B + 12 * KiB;
        const t0 = Date.now();
        let victimMs = -1;
        const victim = dev.write(victimOff, Buffer.alloc(PIECE, 0xee)).then(() => {
          victimMs = Date.now() - t0;
          Buffer.alloc(PIECE, 0xee).copy(model, victimOff);
        });
        while (victimMs < 0 && Date.now() - started < HAMMER_MS) await new Promise((r) => setTimeout(r, 10));
        const doneWhileHammered = victimMs >= 0;
        stop = true;
        await lanes;
        await victim;
        expect({ doneWhileHammered }, `the waiting write took ${victimMs} ms; the 16 chains wrote ${written} pieces meanwhile and stopped after ${HAMMER_MS} ms`).toEqual({ doneWhileHammered: true });
        expect(assemblyReserved(), 'every reservation given back').toBe(0);
        const got = Buffer.alloc(SIZE);
        await dev.readInto(0, got);
        expect(got.equals(model), 'the image reads as the model').toBe(true);
      } finally {
        await dev?.close();
        dev = null;
        if (prev === undefined) delete process.env['KSCINC_NO_NATIVE'];
        else process.env['KSCINC_NO_NATIVE'] = prev;
      }
    }, 60_000);
  }
});
