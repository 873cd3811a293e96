/**
 * Hostile: partial-block write groups (src/image/ksc/partial.ts) and the addon's writeCrc batching (one pool
 * job per event-loop turn) under power cuts (test/helpers/powercut.ts). Seeded bursts issued in one turn on
 * a few hot 64 KiB blocks: overlapping 4 KiB and odd-sized pieces of new and written blocks, whole-block
 * writes, trims, discards and write-zeroes (whole and part of a block) of the same blocks, FUA pieces and
 * flushes in the same turn. The recording file here also offers writeWithCrcs (the real file's: the addon's
 * batched pwrite when it is loaded), so the group paths run as they do in a server.
 *  - The image as the bursts left it reads as the model applied in request order (the last writer wins).
 *  - At every cut: `check --verify` clean; each block reads a version it had (a write in place may tear per
 *    512-byte sector), no older than what a completed flush, or a FUA acknowledged before the cut, covered.
 * With and without the addon (KSCINC_NO_NATIVE=1), and with a bitmap enabled (intent bits for new blocks).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { PowerCut } from '../helpers/powercut.js';
import { type BlockVersion, ackedWhen, cutLoop, digest, recordFlush, recordVersion, stormRounds } from '../helpers/powercut-storm.js';
import { restoreEnvAfterEach } from '../helpers/env.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { type Case, everyStep } from '../helpers/step-cases.js';
import { tempDir } from '../helpers/tmp.js';
import { readImage } from './helpers.js';

const KiB = 1024;
const B = 64 * KiB;
const BLOCKS = 16;
const HOT = [1, 2, 3, 5, 6, 9];
const SECTOR = 512;

type Recorder = { record(buf: Buffer, position: number, durable: boolean, io: () => Promise<void>): Promise<void> };

/**
 * The power-cut opener, its files also offering writeWithCrcs: recorded as one write (it lands, is lost or
 * tears like one), done by the real file's writeWithCrcs (the addon's batched job, or write then CRC).
 */
function cutWithCrcs(): { cut: PowerCut; opener: FileOpener } {
  let real: HostFile | null = null;
  const cut = new PowerCut(async (p, o) => (real = await openHostFile(p, o)));
  const opener: FileOpener = async (p, o) => {
    const f = await cut.opener(p, o);
    const inner = real!;
    if (inner.writeWithCrcs) {
      const rec = (f as unknown as Recorder).record.bind(f);
      f.writeWithCrcs = async (buf, pos, bs) => {
        let crcs: number[] = [];
        await rec(buf, pos, false, async () => {
          crcs = await inner.writeWithCrcs!(buf, pos, bs);
        });
        return crcs;
      };
    }
    return f;
  };
  return { cut, opener };
}

async function runBursts(label: string, bitmap: boolean): Promise<void> {
  const seed = seedFor(`test/hostile/partial-groups.test.ts ${label}`);
  const rng = new Rng(seed);
  const dir = tempDir();
  const path = join(dir, 'img.ksc');
  await createImage(path, { size: BLOCKS * B, blockSize: B, intentRegion: 4 * B });
  const { cut, opener } = cutWithCrcs();
  const img = await openKsc(path, { write: true, opener });
  if (bitmap) await img.addBitmap('b1');
  await img.read(0, B); // the map page loaded: the synchronous paths can take the first burst
  const model = Buffer.alloc(BLOCKS * B);
  const allocated = new Array<boolean>(BLOCKS).fill(false);
  const history = new Map<number, BlockVersion[]>();
  const flushes: { issued: number; done: number }[] = [];
  const version = (i: number, issued: number, inPlace: boolean, fua: boolean): BlockVersion => recordVersion(history, model, B, i, issued, inPlace, fua);
  let seq = 0;
  let kinds = '';
  await stormRounds(cut, rng, 40, [6, 24], 0.08, (issued) => {
    const b = rng.pick(HOT);
    const off = b * B;
    const kind = rng.weighted({ piece: 12, odd: 3, fua: 2, whole: 2, trim: 2, zeroPart: 2, zeroKeep: 1, flush: 2 });
    kinds += kind[0];
    let vs: BlockVersion[] = [];
    let p: Promise<unknown>;
    if (kind === 'piece' || kind === 'odd' || kind === 'fua') {
      const at = kind === 'odd' ? rng.int(0, B - 2) : rng.int(0, B / (4 * KiB) - 1) * 4 * KiB;
      const len = kind === 'odd' ? rng.int(1, Math.min(B - at, 3 * 4 * KiB) - (at === 0 ? 1 : 0)) : 4 * KiB;
      const data = rng.bytes(len);
      if (len >= 4) data.writeUInt32LE(++seq, 0);
      data.copy(model, off + at);
      vs = [version(b, issued, allocated[b]!, kind === 'fua')];
      allocated[b] = true;
      p = img.write(off + at, data, { fua: kind === 'fua' });
    } else if (kind === 'whole') {
      const data = rng.bytes(B);
      for (let o = 0; o < B; o += SECTOR) data.writeUInt32LE(++seq, o);
      data.copy(model, off);
      vs = [version(b, issued, allocated[b]!, false)];
      allocated[b] = true;
      p = img.write(off, data);
    } else if (kind === 'trim') {
      model.fill(0, off, off + B);
      vs = [version(b, issued, false, false)];
      allocated[b] = false;
      p = rng.chance(0.5) ? img.writeZeroes(off, B, { mayTrim: true }) : img.discard(off, B);
    } else if (kind === 'zeroKeep') {
      model.fill(0, off, off + B);
      vs = [version(b, issued, allocated[b]!, false)];
      p = img.writeZeroes(off, B, { mayTrim: false });
    } else if (kind === 'zeroPart') {
      const at = rng.int(0, B / SECTOR - 2) * SECTOR;
      const len = rng.int(1, Math.min(B - at - 1, 16 * KiB));
      model.fill(0, off + at, off + at + len);
      // Zeroes of part of an unallocated block change nothing there (it reads zeros).
      vs = [version(b, issued, allocated[b]!, false)];
      p = img.writeZeroes(off + at, len, { mayTrim: true });
    } else {
      p = recordFlush(cut, flushes, issued, img.flush());
    }
    return ackedWhen(cut, p, vs);
  });
  await img.close();
  const end = cut.tick();
  const tag = `seed ${seed}, ops ${kinds.length}`;
  expect(digest(await readBack(path)), `${tag}: the image after the bursts reads as the model in request order`).toBe(digest(model));

  await cutLoop({
    cut,
    path,
    dir,
    rng,
    cuts: 60,
    end,
    blocks: BLOCKS,
    bs: B,
    history,
    flushes,
    readBack,
    // The floor: the newest version that it and every older one are durable by now: acknowledged before a
    // flush that completed before the cut started, or acknowledged FUA writes (pieces of one group are
    // acknowledged in any order, and each version holds the pieces issued before it).
    floor: (hist, coveredUpTo, at) => {
      let floor = 0;
      for (let j = 1; j < hist.length; j++) {
        const v = hist[j]!;
        if (v.acked < coveredUpTo || (v.fua && v.acked < at)) floor = j;
        else break;
      }
      return floor;
    },
    tag,
  });
}

const readBack = (path: string): Promise<Buffer> => readImage(path, BLOCKS * B);

describe('partial-block groups and batched writes: bursts in one turn under power cuts', () => {
  restoreEnvAfterEach('KSCINC_NO_NATIVE');
  for (const [label, native, bitmap] of [
    ['addon', true, false],
    ['addon, a bitmap', true, true],
    ['KSCINC_NO_NATIVE=1', false, false],
  ] as const) {
    it(`request order wins; every cut: check clean, each block an allowed version (${label})`, async () => {
      if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
      await runBursts(label, bitmap);
    }, 120_000);
  }
});

// ---------------------------------------------------------------- stopped at every step

/** One op of the stepped turn: its blocks' versions come from applying it to the model in order. */
interface StepOp {
  what: string;
  block: number;
  inPlace: boolean;
  fua?: boolean;
  apply: (m: Buffer) => void;
  issue: (k: Awaited<ReturnType<typeof openKsc>>) => Promise<unknown>;
}

const stepPiece = (tag: number, n = 4 * KiB): Buffer => {
  const b = Buffer.alloc(n);
  for (let o = 0; o + 4 <= n; o += 4) b.writeUInt32LE((tag * 0x9e3779b1 + o) >>> 0, o);
  return b;
};
const HELD = stepPiece(900, B);
const OLD4 = stepPiece(901, B);

function stepOps(): StepOp[] {
  const w = (what: string, block: number, inPlace: boolean, at: number, data: Buffer, fua = false): StepOp => ({
    what,
    block,
    inPlace,
    fua,
    apply: (m) => data.copy(m, at),
    issue: (k) => k.write(at, data, { fua }),
  });
  return [
    w('piece of new block 2 at 0', 2, false, 2 * B, stepPiece(1)),
    w('piece of new block 2 at 4 KiB', 2, false, 2 * B + 4 * KiB, stepPiece(2)),
    { what: 'discard block 2', block: 2, inPlace: false, apply: (m) => m.fill(0, 2 * B, 3 * B), issue: (k) => k.discard(2 * B, B) },
    w('piece of block 2 at 8 KiB after the discard', 2, false, 2 * B + 8 * KiB, stepPiece(3)),
    w('piece of block 0 at 8 KiB in place', 0, true, 8 * KiB, stepPiece(4)),
    w('piece of block 0 at 16 KiB in place', 0, true, 16 * KiB, stepPiece(5)),
    { what: 'zeroes over the 16 KiB piece', block: 0, inPlace: true, apply: (m) => m.fill(0, 16 * KiB + 2048, 16 * KiB + 3048), issue: (k) => k.writeZeroes(16 * KiB + 2048, 1000) },
    w('whole block 4 over its data', 4, true, 4 * B, stepPiece(6, B)),
    w('piece of block 4 after it', 4, true, 4 * B + 4 * KiB, stepPiece(7)),
    w('odd FUA piece of new block 3', 3, false, 3 * B + 100, stepPiece(8, 3000), true),
  ];
}

/** Shared by run and verify: when each op of the turn was acknowledged, and the flushes that completed. */
const stepState = { clock: 0, acked: [] as number[], flushes: [] as { issued: number; done: number }[] };

const stepCase: Case = {
  name: 'a turn of partial groups racing a discard, zeroes, a whole write, a FUA piece and a flush',
  setup: async (dir) => {
    stepState.clock = 0;
    stepState.acked = [];
    stepState.flushes = [];
    const img = join(dir, 'img.ksc');
    await createImage(img, { size: BLOCKS * B, blockSize: B, intentRegion: 4 * B });
    const k = await openKsc(img, { write: true });
    await k.write(0, HELD);
    await k.write(4 * B, OLD4);
    await k.write(8 * KiB, stepPiece(4)); // the intent bits of blocks 0 and 4 durable: in-place pieces go at once
    await k.write(4 * B + 4 * KiB, stepPiece(7));
    await k.close();
  },
  run: async (dir) => {
    const k = await openKsc(join(dir, 'img.ksc'), { write: true });
    try {
      await k.read(0, B); // the map page loaded
      const ops = stepOps();
      const ps: Promise<unknown>[] = ops.map((op, i) => op.issue(k).then(() => (stepState.acked[i] = ++stepState.clock)));
      const f = { issued: ++stepState.clock, done: Infinity };
      stepState.flushes.push(f);
      ps.push(k.flush().then(() => (f.done = ++stepState.clock)));
      await Promise.all(ps);
      const g = { issued: ++stepState.clock, done: Infinity };
      stepState.flushes.push(g);
      await k.flush();
      g.done = ++stepState.clock;
    } finally {
      await k.close();
    }
  },
  verify: async (dir, done, where) => {
    const img = join(dir, 'img.ksc');
    const base = Buffer.alloc(BLOCKS * B);
    HELD.copy(base, 0);
    stepPiece(4).copy(base, 8 * KiB);
    OLD4.copy(base, 4 * B);
    stepPiece(7).copy(base, 4 * B + 4 * KiB);
    const ops = stepOps();
    const versions = new Map<number, { data: Buffer; op: number; inPlace: boolean }[]>();
    const m = Buffer.from(base);
    ops.forEach((op, i) => {
      op.apply(m);
      const h = versions.get(op.block) ?? [{ data: Buffer.from(base.subarray(op.block * B, (op.block + 1) * B)), op: -1, inPlace: false }];
      h.push({ data: Buffer.from(m.subarray(op.block * B, (op.block + 1) * B)), op: i, inPlace: op.inPlace });
      versions.set(op.block, h);
    });
    const content = await readImage(img, BLOCKS * B);
    // A completed flush covers what was acknowledged before it was issued; an acknowledged FUA write is durable.
    const covered = Math.max(0, ...stepState.flushes.filter((f) => f.done !== Infinity).map((f) => f.issued));
    const durable = (i: number): boolean => stepState.acked[i] !== undefined && (stepState.acked[i]! < covered || ops[i]!.fua === true);
    for (let b = 0; b < BLOCKS; b++) {
      const got = content.subarray(b * B, (b + 1) * B);
      const h = versions.get(b);
      if (!h) {
        expect(got.equals(base.subarray(b * B, (b + 1) * B)), `${where}: untouched block ${b}`).toBe(true);
        continue;
      }
      let floor = 0;
      for (let j = 1; j < h.length && durable(h[j]!.op); j++) floor = j;
      const allowed = done ? [h[h.length - 1]!] : h.slice(floor);
      if (allowed.some((v) => v.data.equals(got))) continue;
      const tearable = !done && allowed.some((v, j) => j > 0 && v.inPlace);
      const bad = Array.from({ length: B / SECTOR }, (_, s) => s * SECTOR).find((o) => !allowed.some((v) => v.data.subarray(o, o + SECTOR).equals(got.subarray(o, o + SECTOR))));
      expect(tearable && bad === undefined, `${where}: block ${b} is none of its versions from ${floor} (first sector none explains: ${bad})`).toBe(true);
    }
    expect((await checkImage(img, { verify: true })).errors, `${where}: check --verify`).toEqual([]);
  },
};

describe('partial-block groups: one racing turn stopped after every write and sync', () => {
  restoreEnvAfterEach('KSCINC_NO_NATIVE');
  for (const native of [true, false]) {
    it(`every stop: each block a version no older than what a flush or FUA made durable, check clean (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, async () => {
      if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
      expect(await everyStep(stepCase)).toBeGreaterThan(4);
    }, 120_000);
  }
});
