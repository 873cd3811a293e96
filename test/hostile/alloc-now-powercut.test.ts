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
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { PowerCut, crashCheckErrors } from '../helpers/powercut.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { readImage } from './helpers.js';

const B = 4096;
const BLOCKS = 64;
const HOT = [3, 4, 5, 6, 7, 8, 20, 21];
const SECTOR = 512;

const digest = (b: Buffer): string => createHash('sha1').update(b).digest('hex').slice(0, 16);

/** One version of a block: its bytes, when the request that made it was issued and acknowledged, how it landed. */
interface Version {
  data: Buffer;
  issued: number;
  acked: number;
  /** A write in place over the block's cluster (may tear); else a new cluster or an unmap (atomic). */
  inPlace: boolean;
}

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
  const history = new Map<number, Version[]>();
  const flushes: { issued: number; done: number }[] = [];
  /** Records the new version of blocks [b, b+n) (from the model) for a request issued at `issued`. */
  const versions = (b: number, n: number, issued: number, inPlace: (i: number) => boolean): Version[] =>
    Array.from({ length: n }, (_, k) => {
      const i = b + k;
      const v: Version = { data: Buffer.from(model.subarray(i * B, (i + 1) * B)), issued, acked: Infinity, inPlace: inPlace(i) };
      let h = history.get(i);
      if (!h) history.set(i, (h = [{ data: Buffer.alloc(B), issued: 0, acked: 0, inPlace: false }]));
      h.push(v);
      return v;
    });
  let seq = 0;
  for (let r = 0; r < 25; r++) {
    const ops: Promise<unknown>[] = [];
    for (let k = rng.int(4, 16); k > 0; k--) {
      if (rng.chance(0.2)) await new Promise((res) => setImmediate(res));
      const b = rng.pick(HOT);
      const n = rng.int(1, 2);
      const off = b * B;
      const kind = rng.weighted({ whole: 8, partial: 2, trim: 3, zeroKeep: 1, flush: 2 });
      const issued = cut.tick();
      let vs: Version[] = [];
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
        const f = { issued, done: Infinity };
        flushes.push(f);
        p = img.flush().then(() => (f.done = cut.tick()));
      }
      ops.push(
        p.then(() => {
          const t = cut.tick();
          for (const v of vs) v.acked = t;
        }),
      );
    }
    await Promise.all(ops);
  }
  await img.close();
  const end = cut.tick();

  for (let c = 0; c < 40; c++) {
    const at = c === 0 ? end : rng.int(1, end);
    const out = join(dir, `cut-${c}.ksc`);
    await cut.materialise(path, at, out, rng);
    const where = `cut ${c} at ${at} of ${end} (seed ${seed})`;
    const chk = await checkImage(out, { verify: true });
    expect(crashCheckErrors(chk.errors), `${where}: check --verify`).toEqual([]);
    const content = await readBack(out);
    // The durable floor: the newest acknowledged version covered by a flush issued after its ack and done before the cut.
    const coveredUpTo = Math.max(0, ...flushes.filter((f) => f.done < at).map((f) => f.issued));
    for (let i = 0; i < BLOCKS; i++) {
      const got = content.subarray(i * B, (i + 1) * B);
      const hist = history.get(i);
      if (!hist) {
        expect(got.equals(Buffer.alloc(B)), `${where}: cold block ${i} holds bytes`).toBe(true);
        continue;
      }
      let floor = 0;
      hist.forEach((v, j) => {
        if (v.acked < coveredUpTo) floor = j;
      });
      const allowed = hist.slice(floor).filter((v) => v.issued < at);
      if (allowed.some((v) => v.data.equals(got))) continue;
      // A write in place may tear: each sector from one of the versions around it.
      const tearable = allowed.some((v, j) => j > 0 && v.inPlace);
      const sectorsOk = tearable && Array.from({ length: B / SECTOR }, (_, s) => s * SECTOR).every((o) => allowed.some((v) => v.data.subarray(o, o + SECTOR).equals(got.subarray(o, o + SECTOR))));
      expect(sectorsOk, `${where}: block ${i} reads ${digest(got)}, none of its ${allowed.length} allowed versions (floor ${floor} of ${hist.length})`).toBe(true);
    }
  }
  // The image as the storm left it (clean close) reads as the model.
  expect(digest(await readBack(path)), 'final image').toBe(digest(model));
}

const readBack = (path: string): Promise<Buffer> => readImage(path, BLOCKS * B);

describe('power cuts in a storm of whole writes issued at once', () => {
  const saved = process.env['KSCINC_NO_NATIVE'];
  afterEach(() => {
    if (saved === undefined) delete process.env['KSCINC_NO_NATIVE'];
    else process.env['KSCINC_NO_NATIVE'] = saved;
  });
  for (const native of [true, false]) {
    it(`every cut: check clean, each block an allowed version (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, async () => {
      if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
      await runStorm(native);
    }, 120_000);
  }
});
