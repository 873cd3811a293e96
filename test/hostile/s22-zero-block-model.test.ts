/**
 * Hostile (session 22): WRITE_ZEROES of part of a block, and of whole allocated blocks without trimming, write
 * from one zeroed block shared by the process (datapath.ts zeroBlock, 9a3c758): nothing may ever write into
 * it. Seeded batches of writes, write-zeroes (trimming or not), discards and reads, disjoint within a batch and
 * run concurrently, over blocks of 64 KiB and 2 MiB, with the addon and with KSCINC_NO_NATIVE=1, a backing
 * for half the runs (partial zeroes of a block the overlay does not hold copy the backing's block first): the
 * image reads as a model after every batch and after a reopen, and a fresh zero write still writes zeros.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = tempDir('kscinc-hostile-s22-zeroblk-');

interface Op {
  kind: 'write' | 'zero' | 'zero-notrim' | 'discard' | 'read';
  off: number;
  len: number;
  data?: Buffer;
}

/** Up to `n` ops over disjoint ranges of a `size`-byte disk of `bs`-byte blocks, ranges around block edges. */
function batchOf(rng: Rng, size: number, bs: number, n: number): Op[] {
  const ops: Op[] = [];
  const taken: [number, number][] = [];
  for (let tries = 0; ops.length < n && tries < n * 10; tries++) {
    const block = rng.int(0, size / bs - 1);
    const off = Math.min(size - 512, block * bs + rng.int(-2, Math.min(8, bs / 512 - 1)) * 512 + (rng.int(0, 3) === 0 ? 0 : rng.int(0, bs / 512 - 1) * 512));
    if (off < 0) continue;
    const len = Math.min(size - off, [512, 4 * KiB, bs / 2, bs, bs + 4 * KiB, 2 * bs][rng.int(0, 5)]!);
    if (taken.some(([a, b]) => off < b && a < off + len)) continue;
    taken.push([off, off + len]);
    const kinds: Op['kind'][] = ['write', 'write', 'zero', 'zero-notrim', 'discard', 'read'];
    const kind = kinds[rng.int(0, kinds.length - 1)]!;
    ops.push({ kind, off, len, data: kind === 'write' ? rng.bytes(len) : undefined });
  }
  return ops;
}

function apply(model: Buffer, op: Op, bs: number): void {
  if (op.kind === 'write') op.data!.copy(model, op.off);
  else if (op.kind === 'zero' || op.kind === 'zero-notrim') model.fill(0, op.off, op.off + op.len);
  else if (op.kind === 'discard') {
    // Whole blocks read as zero afterwards; partial ones are unchanged.
    const first = Math.ceil(op.off / bs) * bs;
    const last = Math.floor((op.off + op.len) / bs) * bs;
    if (last > first) model.fill(0, first, last);
  }
}

async function run(dev: BlockDevice, op: Op, model: Buffer): Promise<string | null> {
  switch (op.kind) {
    case 'write':
      await dev.write(op.off, op.data!);
      return null;
    case 'zero':
      await dev.writeZeroes(op.off, op.len, { mayTrim: true });
      return null;
    case 'zero-notrim':
      await dev.writeZeroes(op.off, op.len, { mayTrim: false });
      return null;
    case 'discard':
      await dev.discard(op.off, op.len);
      return null;
    case 'read': {
      const got = await dev.read(op.off, op.len);
      return got.equals(model.subarray(op.off, op.off + op.len)) ? null : `READ(${op.off}+${op.len}) differs from the model`;
    }
  }
}

function firstDiff(a: Buffer, b: Buffer): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

describe('the shared zero block is never written into', () => {
  for (const bs of [64 * KiB, 2 * MiB]) {
    for (const native of [true, false]) {
      for (const backed of [false, true]) {
        it(`${bs / KiB} KiB blocks, ${native ? 'addon' : 'KSCINC_NO_NATIVE=1'}${backed ? ', over a backing' : ''}: reads equal the model`, async () => {
          const label = 'test/hostile/s22-zero-block-model.test.ts'; // one KSC_SEED replays every case with it
          const seed = seedFor(label);
          const rng = new Rng(seed);
          const prev = process.env['KSCINC_NO_NATIVE'];
          if (native) delete process.env['KSCINC_NO_NATIVE'];
          else process.env['KSCINC_NO_NATIVE'] = '1';
          const size = (bs > 64 * KiB ? 8 : 12) * bs;
          const path = join(dir, `z-${bs}-${native}-${backed}.ksc`);
          const model = Buffer.alloc(size);
          let dev: BlockDevice | null = null;
          try {
            if (backed) {
              const base = join(dir, `base-${bs}-${native}.ksc`);
              await createImage(base, { size, blockSize: bs });
              const b = await openImage(base, { write: true });
              const content = rng.bytes(size);
              await b.write(0, content);
              await b.close();
              content.copy(model);
              await createImage(path, { size, blockSize: bs, backing: base });
            } else await createImage(path, { size, blockSize: bs });
            dev = await openImage(path, { write: true });
            for (let round = 0; round < (bs > 64 * KiB ? 16 : 40); round++) {
              const ops = batchOf(rng, size, bs, rng.int(1, 8));
              const before = Buffer.from(model);
              for (const op of ops) if (op.kind !== 'read') apply(model, op, bs);
              // Reads see the state before the batch (their ranges are disjoint from the batch's changes).
              const errs = await Promise.all(ops.map((op) => run(dev!, op, before)));
              expect(
                errs.filter((e) => e !== null),
                `round ${round}, seed ${seed}`,
              ).toEqual([]);
              const got = await dev.read(0, size);
              const d = firstDiff(got, model);
              expect(d, `round ${round}: the image differs from the model at byte ${d} (ops ${JSON.stringify(ops.map((o) => [o.kind, o.off, o.len]))}), seed ${seed}`).toBe(-1);
            }
            // A fresh partial zero write over data still writes zeros (the shared block is still zero).
            const probe = rng.bytes(bs);
            await dev.write(bs, probe);
            await dev.writeZeroes(bs + 512, bs - 1024, { mayTrim: false });
            probe.copy(model, bs);
            model.fill(0, bs + 512, 2 * bs - 512);
            await dev.close();
            dev = await openImage(path);
            const got = await dev.read(0, size);
            const d = firstDiff(got, model);
            expect(d, `after reopening: the image differs from the model at byte ${d}, seed ${seed}`).toBe(-1);
          } finally {
            await dev?.close();
            if (prev === undefined) delete process.env['KSCINC_NO_NATIVE'];
            else process.env['KSCINC_NO_NATIVE'] = prev;
          }
        }, 60_000);
      }
    }
  }
});
