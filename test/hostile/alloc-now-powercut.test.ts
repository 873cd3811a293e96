/**
 * Hostile: power cuts (test/helpers/powercut.ts) anywhere in seeded storms of whole-block writes issued at
 * once (datapath.ts writeNow: data first, map entry after it) racing trims, write-zeroes, discards, partial
 * writes and flushes on a few hot blocks, so freed clusters are reused by later writes (Allocator.allocRun
 * takes a free cluster for one block). For every cut: `check --verify` clean (no map entry points at a
 * cluster whose data never landed, no cluster both free and mapped), and each block reads a version it
 * had — never another block's bytes or garbage — no older than what the last completed flush covered.
 * Writes into a new cluster and unmaps are all-or-nothing; only a write in place over data may tear (per
 * 512-byte sector, old or new), as on any disk. With and without the addon (KSCINC_NO_NATIVE=1).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { PowerCut } from '../helpers/powercut.js';
import { type BlockVersion, ackedWhen, cutLoop, digest, recordFlush, recordVersion, stormRounds } from '../helpers/powercut-storm.js';
import { restoreEnvAfterEach } from '../helpers/env.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { readImage } from './helpers.js';

const B = 4096;
const BLOCKS = 64;
const HOT = [3, 4, 5, 6, 7, 8, 20, 21];
const SECTOR = 512;

async function runStorm(native: boolean): Promise<void> {
  const seed = seedFor(`test/hostile/alloc-now-powercut.test.ts ${native ? 'addon' : 'no addon'}`);
  const rng = new Rng(seed);
  const dir = tempDir();
  const path = join(dir, 'img.ksc');
  await createImage(path, { size: BLOCKS * B, blockSize: B, intentRegion: 2 * B });
  const cut = new PowerCut();
  const img = await openKsc(path, { write: true, opener: cut.opener });
  await img.read(0, B); // the map page loaded: whole writes can be issued at once
  const model = Buffer.alloc(BLOCKS * B);
  const allocated = new Array<boolean>(BLOCKS).fill(false);
  const history = new Map<number, BlockVersion[]>();
  const flushes: { issued: number; done: number }[] = [];
  /** Records the new version of blocks [b, b+n) (from the model) for a request issued at `issued`. */
  const versions = (b: number, n: number, issued: number, inPlace: (i: number) => boolean): BlockVersion[] =>
    Array.from({ length: n }, (_, k) => recordVersion(history, model, B, b + k, issued, inPlace(b + k)));
  let seq = 0;
  await stormRounds(cut, rng, 25, [4, 16], 0.2, (issued) => {
    const b = rng.pick(HOT);
    const n = rng.int(1, 2);
    const off = b * B;
    const kind = rng.weighted({ whole: 8, partial: 2, trim: 3, zeroKeep: 1, flush: 2 });
    let vs: BlockVersion[] = [];
    let p: Promise<unknown>;
    if (kind === 'whole') {
      const data = rng.bytes(n * B);
      for (let o = 0; o < data.length; o += SECTOR) data.writeUInt32LE(++seq, o);
      data.copy(model, off);
      vs = versions(b, n, issued, (i) => allocated[i]!);
      for (let i = b; i < b + n; i++) allocated[i] = true;
      p = img.write(off, data);
    } else if (kind === 'partial') {
      const at = rng.int(0, B / SECTOR - 1) * SECTOR;
      const data = rng.bytes(rng.int(1, B - at));
      data.copy(model, off + at);
      vs = versions(b, 1, issued, (i) => allocated[i]!);
      allocated[b] = true;
      p = img.write(off + at, data);
    } else if (kind === 'trim' || kind === 'zeroKeep') {
      model.fill(0, off, off + n * B);
      const keep = kind === 'zeroKeep';
      vs = versions(b, n, issued, (i) => keep && allocated[i]!);
      if (!keep) for (let i = b; i < b + n; i++) allocated[i] = false;
      p = rng.chance(0.5) || keep ? img.writeZeroes(off, n * B, { mayTrim: !keep }) : img.discard(off, n * B);
    } else {
      p = recordFlush(cut, flushes, issued, img.flush());
    }
    return ackedWhen(cut, p, vs);
  });
  await img.close();
  const end = cut.tick();

  await cutLoop({
    cut,
    path,
    dir,
    rng,
    cuts: 40,
    end,
    blocks: BLOCKS,
    bs: B,
    history,
    flushes,
    readBack,
    // The durable floor: the newest acknowledged version covered by a flush issued after its ack and done before the cut.
    floor: (hist, coveredUpTo) => hist.reduce((f, v, j) => (v.acked < coveredUpTo ? j : f), 0),
    tag: `seed ${seed}`,
  });
  // The image as the storm left it (clean close) reads as the model.
  expect(digest(await readBack(path)), 'final image').toBe(digest(model));
}

const readBack = (path: string): Promise<Buffer> => readImage(path, BLOCKS * B);

describe('power cuts in a storm of whole writes issued at once', () => {
  restoreEnvAfterEach('KSCINC_NO_NATIVE');
  for (const native of [true, false]) {
    it(`every cut: check clean, each block an allowed version (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, async () => {
      if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
      await runStorm(native);
    }, 120_000);
  }
});
