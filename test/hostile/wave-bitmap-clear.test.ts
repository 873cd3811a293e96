/**
 * Hostile: a dirty bitmap cleared (and frozen, as a backup's handover does) while new blocks' waves are in
 * flight (src/image/ksc/partial.ts marks a wave's pieces once it is written; src/image/ksc/bitmaps.ts
 * records marks made while a management step rewrites the table). Rule: a write acknowledged after a clear
 * resolved holds bytes the backup taken at the clear did not see, so its block must be dirty in the bitmap,
 * or (for a freeze) in the bitmap or the frozen copy made then. (A write acknowledged while the clear runs
 * may be cleared: the clear's point in time lies somewhere inside the call.) Checked before each next clear
 * and at the end. A seeded storm of 4 KiB pieces
 * leaning to blocks just discarded (they chain waves), with clears and freezes issued among them; then the
 * image is closed, reopened, and the bitmaps read from disk. With the addon and with KSCINC_NO_NATIVE=1.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { bitmapsOf } from '../../src/image/capabilities.js';
import { createImage, openImage } from '../../src/image/open.js';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-hostile-wavebm-');
const B = 64 * 1024;
const BLOCKS = 32;
const P = 4096;
const OPS = 4000;

async function dirtyBlocks(bm: NonNullable<ReturnType<typeof bitmapsOf>>, names: string[]): Promise<Set<number>> {
  const dirty = new Set<number>();
  for (const n of names) for (const e of await bm.bitmapExtents(n)) for (let k = Math.floor(e.offset / B); k * B < e.offset + e.length; k++) dirty.add(k);
  return dirty;
}

for (const native of [true, false]) {
  describe(`bitmap clears and freezes racing new blocks' waves (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, () => {
    it('every block written after a clear resolved is dirty (in the bitmap or the frozen copy), after reopening too', async () => {
      const saved = process.env['KSCINC_NO_NATIVE'];
      if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
      const seed = seedFor(`test/hostile/wave-bitmap-clear.test.ts ${native}`);
      const rng = new Rng(seed);
      const img = join(dir, `bm-${native}.ksc`);
      try {
        await createImage(img, { size: BLOCKS * B, blockSize: B });
        let dev = await openImage(img, { write: true });
        await bitmapsOf(dev)!.addBitmap('b');
        let seq = 0;
        /** Per block: the seq at which its last write was acknowledged (-1: none). */
        const ackedAt = new Array<number>(BLOCKS).fill(-1);
        /** The seq at which the last clear (or freeze) resolved, and the frozen copy's name if a freeze. */
        let lastClear = -1;
        let lastFrozen: string | null = null;
        let mgmtBusy = false;
        let checked = 0;
        let freezes = 0;
        const recent = [0, 1, 2];
        const failures: string[] = [];
        let inflight = 0;
        let issued = 0;
        let done!: () => void;
        const finished = new Promise<void>((r) => (done = r));
        const settle = (err?: string): void => {
          inflight--;
          if (err && failures.length < 10) failures.push(err);
          if (rng.chance(0.5)) issue();
          else setImmediate(issue);
        };
        const issue = (): void => {
          while (inflight < 40 && issued < OPS) {
            issued++;
            const kind = rng.int(0, 99);
            if (kind < 3) {
              // A clear or a freeze, one at a time (as a backup does), none in the last quarter (so writes race the last).
              if (mgmtBusy || issued > OPS * 0.75) continue;
              mgmtBusy = true;
              const freeze = rng.chance(0.3);
              const name = `f${freezes++}`;
              inflight++;
              void (async () => {
                const bm = bitmapsOf(dev)!;
                try {
                  // Before it: every block acknowledged since the previous one resolved (and before this look) is dirty.
                  const lookAt = seq;
                  const dirty = await dirtyBlocks(bm, ['b', ...(lastFrozen ? [lastFrozen] : [])]);
                  ackedAt.forEach((s, k) => {
                    if (s > lastClear && s <= lookAt && !dirty.has(k) && failures.length < 10)
                      failures.push(`block ${k} acknowledged at ${s}, after a clear or freeze resolved at ${lastClear}, not dirty`);
                  });
                  // Only the last frozen copy matters: the earlier one goes (directory slots are few).
                  if (lastFrozen) await bm.removeBitmap(lastFrozen);
                  lastFrozen = null;
                  if (freeze) await bm.freezeBitmap('b', name);
                  else await bm.clearBitmap('b');
                  lastClear = ++seq;
                  lastFrozen = freeze ? name : null;
                  checked++;
                  settle();
                } catch (e) {
                  settle(`${freeze ? 'freeze' : 'clear'}: ${(e as Error).message}`);
                } finally {
                  mgmtBusy = false;
                }
              })();
              continue;
            }
            const block = kind >= 12 && rng.chance(0.6) ? rng.pick(recent) : rng.int(0, BLOCKS - 1);
            inflight++;
            if (kind < 12) {
              void dev.discard(block * B, B).then(
                () => {
                  recent.push(block);
                  if (recent.length > 3) recent.shift();
                  settle();
                },
                (e: Error) => settle(`discard: ${e.message}`),
              );
              continue;
            }
            const at = block * B + rng.int(0, B / P - 1) * P;
            void dev.write(at, rng.bytes(P)).then(
              () => {
                ackedAt[block] = ++seq;
                settle();
              },
              (e: Error) => settle(`write at ${at}: ${e.message}`),
            );
          }
          if (inflight === 0 && issued >= OPS) done();
        };
        issue();
        await finished;
        expect(failures).toEqual([]);
        // After the last clear: pieces into blocks just discarded and others, many in one turn (waves chain).
        for (let round = 0; round < 8; round++) {
          await Promise.all(
            Array.from({ length: 16 }, async () => {
              const block = rng.chance(0.6) ? rng.pick(recent) : rng.int(0, BLOCKS - 1);
              await dev.write(block * B + rng.int(0, B / P - 1) * P, rng.bytes(P));
              ackedAt[block] = ++seq;
            }),
          );
        }
        await dev.close();
        dev = await openImage(img, { write: true });
        const bm = bitmapsOf(dev)!;
        const dirty = await dirtyBlocks(bm, ['b', ...(lastFrozen ? [lastFrozen] : [])]);
        const missing = ackedAt.map((s, k) => (s > lastClear && !dirty.has(k) ? k : -1)).filter((k) => k >= 0);
        console.log(
          `seed ${seed}: ${freezes} clears/freezes, last at seq ${lastClear} (${lastFrozen ?? 'a clear'}), ${ackedAt.filter((s) => s > lastClear).length} blocks written after it, ${dirty.size} dirty`,
        );
        expect(missing, 'blocks written after the last clear resolved and not dirty').toEqual([]);
        await dev.close();
        const chk = kscinc(['check', img]);
        expect(chk.code, chk.stdout + chk.stderr).toBe(0);
      } finally {
        if (saved === undefined) delete process.env['KSCINC_NO_NATIVE'];
        else process.env['KSCINC_NO_NATIVE'] = saved;
      }
    }, 120_000);
  });
}
