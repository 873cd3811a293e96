/**
 * Cases for the step tests (test/image/steps.test.ts, test/image/crash-steps.test.ts): every path that frees or reuses a cluster (formats/ksc_inc.md §9 rule 4), stopped at EVERY step: the
 * fault layer (src/io/fault.ts) lets steps 1 … N (writes, punches, syncs, truncates) run and fails every
 * later one, for N = 0, 1, … until the operation completes; the process abandons its objects, which leaves
 * the files as a SIGKILL at that point would (the page cache holds steps 1 … N, nothing else). Then:
 *  - every block reads a state the operation allows (commit: the overlay reads exactly what it read before,
 *    and the base holds, block by block, its old content or the overlay's; never zeros the overlay did not
 *    hold);
 *  - `check --verify` finds no error: in particular no map entry points at a hole;
 *  - running the operation again completes and gives the final content.
 * test/image/crash-steps.test.ts does the commit case with a real SIGKILL of a child process at every step.
 */
import { expect } from 'vitest';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { checkImage } from '../../src/engines/check.js';
import { commitImage, rebaseImage } from '../../src/engines/ops.js';
import { createImage, openKsc } from '../../src/index.js';
import { faultFired, setFaultPlan } from '../../src/io/fault.js';
import { tempDir } from './tmp.js';
import { readAll } from './read-all.js';
import { coreOf } from '../../src/image/ksc/image.js';

export const KiB = 1024;
export const B = 64 * KiB;
export const SIZE = 16 * B;
const MAX_STEPS = 400;

/** Block `i` of a content `tag`: distinct, non-zero bytes. */
export function block(tag: number, i: number): Buffer {
  const buf = Buffer.alloc(B);
  for (let o = 0; o < B; o += 4) buf.writeUInt32LE((tag * 0x1000193 + i * 0x9e3779b1 + o) >>> 0, o);
  return buf;
}

export { readAll };

export async function expectClean(path: string, where: string): Promise<void> {
  const r = await checkImage(path, { verify: true });
  expect(r.errors, `${where}: check --verify of ${path}`).toEqual([]);
}

/** Which allowed state each block of `actual` is in; throws naming the first block in none. */
export function expectBlocks(actual: Buffer, allowed: Buffer[][], where: string): void {
  for (let i = 0; i < allowed.length; i++) {
    const got = actual.subarray(i * B, (i + 1) * B);
    const ok = allowed[i]!.some((a) => a.equals(got));
    const zeros = got.every((x) => x === 0);
    expect(ok, `${where}: block ${i} reads ${zeros ? 'zeros' : 'something else'}, none of its ${allowed[i]!.length} allowed states`).toBe(true);
  }
}

export function covers(extents: { offset: number; length: number }[], offset: number, length: number): boolean {
  return extents.some((e) => e.offset <= offset && e.offset + e.length >= offset + length);
}

export interface Case {
  name: string;
  /** Builds the files in `dir`; returns what `run` and `verify` need. */
  setup(dir: string): Promise<void>;
  run(dir: string): Promise<void>;
  /** After a stop (done = false) or after the re-run (done = true). */
  verify(dir: string, done: boolean, where: string): Promise<void>;
}

/** Runs `c` stopped after every step N = 0, 1, …; returns the number of steps of a full run. */
export async function everyStep(c: Case): Promise<number> {
  for (let n = 0; n < MAX_STEPS; n++) {
    const dir = tempDir('kscinc-steps-');
    await c.setup(dir);
    setFaultPlan({ after: n, action: 'throw' });
    let completed = false;
    try {
      await c.run(dir);
      completed = !faultFired();
    } catch (e) {
      if (!faultFired()) throw e;
    } finally {
      setFaultPlan(null);
    }
    const where = `${c.name}, stopped after step ${n}`;
    await c.verify(dir, completed, where);
    if (completed) return n;
    await c.run(dir);
    await c.verify(dir, true, `${where}, then run again`);
  }
  throw new Error(`${c.name}: more than ${MAX_STEPS} steps`);
}

// ---------------------------------------------------------------- commit

const BASE_OLD = Array.from({ length: 16 }, (_, i) => block(1, i));
/** Blocks 0–7 DATA in the overlay, 8–9 ZERO, 10–15 unallocated. */
const OVERLAY = Array.from({ length: 16 }, (_, i) => (i < 8 ? block(2, i) : i < 10 ? Buffer.alloc(B) : BASE_OLD[i]!));

export async function setupCommit(dir: string): Promise<void> {
  const base = join(dir, 'base.ksc');
  await createImage(base, { size: SIZE, blockSize: B });
  const b = await openKsc(base, { write: true });
  await b.write(0, Buffer.concat(BASE_OLD));
  await b.close();
  const top = join(dir, 'top.ksc');
  await createImage(top, { backing: base, blockSize: B, intentRegion: 4 * B });
  const t = await openKsc(top, { write: true });
  await t.addBitmap('b1');
  await t.write(0, Buffer.concat(OVERLAY.slice(0, 8)));
  await t.writeZeroes(8 * B, 2 * B);
  await t.close();
}

export const commitCase: Case = {
  name: 'commit',
  setup: setupCommit,
  run: async (dir) => {
    await commitImage(join(dir, 'top.ksc'));
  },
  verify: async (dir, done, where) => {
    const top = join(dir, 'top.ksc');
    const base = join(dir, 'base.ksc');
    // The overlay reads its content whatever happened; the base gets the overlay's blocks or keeps its own.
    expectBlocks(
      await readAll(top),
      OVERLAY.map((o) => [o]),
      `${where}: overlay`,
    );
    expectBlocks(
      await readAll(base),
      OVERLAY.map((o, i) => (done ? [o] : [o, BASE_OLD[i]!])),
      `${where}: base`,
    );
    await expectClean(top, where);
    await expectClean(base, where);
    if (done) {
      const t = await openKsc(top);
      try {
        for await (const b of t.allocatedBlocks()) expect.fail(`${where}: block ${b.block} still in the overlay after commit`);
      } finally {
        await t.close();
      }
    }
  },
};

// ---------------------------------------------------------------- discard and write-zeroes

export const HELD = Array.from({ length: 16 }, (_, i) => block(3, i));

export function zeroCase(name: string, op: 'discard' | 'zero' | 'zero-notrim', backing: boolean): Case {
  // Blocks 2–9 whole, and half of block 10.
  const zeroed = (i: number): boolean => i >= 2 && i <= 9;
  const after = HELD.map((h, i) => {
    if (zeroed(i)) return Buffer.alloc(B);
    if (i === 10 && op !== 'discard') return Buffer.concat([Buffer.alloc(B / 2), h.subarray(B / 2)]);
    return h;
  });
  return {
    name,
    setup: async (dir) => {
      const img = join(dir, 'img.ksc');
      if (backing) {
        writeFileSync(join(dir, 'base.raw'), Buffer.concat(Array.from({ length: 16 }, (_, i) => block(9, i))));
        await createImage(img, { backing: join(dir, 'base.raw'), backingFormat: 'raw', blockSize: B, intentRegion: 4 * B });
      } else await createImage(img, { size: SIZE, blockSize: B, intentRegion: 4 * B });
      const k = await openKsc(img, { write: true });
      await k.addBitmap('b1');
      await k.write(0, Buffer.concat(HELD));
      await k.close();
    },
    run: async (dir) => {
      const k = await openKsc(join(dir, 'img.ksc'), { write: true });
      try {
        if (op === 'discard') await k.discard(2 * B, 8.5 * B);
        else await k.writeZeroes(2 * B, 8.5 * B, { mayTrim: op === 'zero' });
        await k.flush();
        // Reuse: new writes take the freed clusters (allowed once the unlinking flush completed).
        await k.write(12 * B, Buffer.concat([HELD[12]!, HELD[13]!]));
      } finally {
        await k.close();
      }
    },
    verify: async (dir, done, where) => {
      const img = join(dir, 'img.ksc');
      expectBlocks(
        await readAll(img),
        HELD.map((h, i) => (done ? [after[i]!] : [h, after[i]!])),
        where,
      );
      await expectClean(img, where);
      const k = await openKsc(img);
      try {
        const bits = await k.bitmapExtents('b1');
        if (done) expect(bits, `${where}: bitmap b1`).toEqual([{ offset: 0, length: SIZE }]);
      } finally {
        await k.close();
      }
    },
  };
}

// ---------------------------------------------------------------- rebase

const REBASE_OLD = Array.from({ length: 16 }, (_, i) => block(4, i));
const REBASE_NEW = Array.from({ length: 16 }, (_, i) => (i % 3 === 0 ? REBASE_OLD[i]! : block(5, i)));
const REBASE_VISIBLE = REBASE_OLD.map((o, i) => (i < 4 ? block(6, i) : o));

export const rebaseCase: Case = {
  name: 'rebase',
  setup: async (dir) => {
    writeFileSync(join(dir, 'old.raw'), Buffer.concat(REBASE_OLD));
    writeFileSync(join(dir, 'new.raw'), Buffer.concat(REBASE_NEW));
    const img = join(dir, 'img.ksc');
    await createImage(img, { backing: join(dir, 'old.raw'), backingFormat: 'raw', blockSize: B, intentRegion: 4 * B });
    const k = await openKsc(img, { write: true });
    await k.write(0, Buffer.concat(REBASE_VISIBLE.slice(0, 4)));
    await k.close();
  },
  run: async (dir) => {
    await rebaseImage(join(dir, 'img.ksc'), join(dir, 'new.raw'), { format: 'raw' });
  },
  verify: async (dir, done, where) => {
    const img = join(dir, 'img.ksc');
    expectBlocks(
      await readAll(img),
      REBASE_VISIBLE.map((v) => [v]),
      where,
    );
    await expectClean(img, where);
    const k = await openKsc(img);
    try {
      if (done) expect(k.backingName, where).toBe('new.raw');
    } finally {
      await k.close();
    }
  },
};

// ---------------------------------------------------------------- bitmap remove

export const bitmapRemoveCase: Case = {
  name: 'bitmap remove',
  setup: async (dir) => {
    const img = join(dir, 'img.ksc');
    await createImage(img, { size: SIZE, blockSize: B, intentRegion: 4 * B });
    const k = await openKsc(img, { write: true });
    await k.addBitmap('gone', { granularity: 4 * KiB });
    await k.addBitmap('kept');
    await k.write(3 * B, Buffer.concat([HELD[3]!, HELD[4]!]));
    await k.close();
  },
  run: async (dir) => {
    const k = await openKsc(join(dir, 'img.ksc'), { write: true });
    try {
      if (k.hasBitmap('gone')) await k.removeBitmap('gone');
      // Reuse the space: a new bitmap and new data after the removal.
      if (!k.hasBitmap('new')) await k.addBitmap('new');
      await k.write(8 * B, HELD[8]!);
    } finally {
      await k.close();
    }
  },
  verify: async (dir, done, where) => {
    const img = join(dir, 'img.ksc');
    const content = await readAll(img);
    expect(content.subarray(3 * B, 5 * B).equals(Buffer.concat([HELD[3]!, HELD[4]!])), `${where}: data`).toBe(true);
    await expectClean(img, where);
    const k = await openKsc(img);
    try {
      expect(covers(await k.bitmapExtents('kept'), 3 * B, 2 * B), `${where}: bitmap kept lost bits`).toBe(true);
      if (k.hasBitmap('gone')) expect(covers(await k.bitmapExtents('gone'), 3 * B, 2 * B), `${where}: bitmap gone lost bits`).toBe(true);
      if (done) expect(k.hasBitmap('gone'), where).toBe(false);
    } finally {
      await k.close();
    }
  },
};

// ---------------------------------------------------------------- reclaim (check --repair) and the open sweep

/** An image that crashed (abandoned without close) after freeing clusters and writing unreferenced ones. */
export async function setupLeaky(dir: string): Promise<void> {
  const img = join(dir, 'img.ksc');
  await createImage(img, { size: SIZE, blockSize: B, intentRegion: 4 * B });
  const k = await openKsc(img, { write: true });
  await k.addBitmap('b1');
  await k.write(0, Buffer.concat(HELD));
  await k.flush();
  await k.discard(4 * B, 4 * B);
  await k.flush();
  // Abandon: the freed clusters leak; the lock goes with the file handle.
  await coreOf(k).file.close();
}
export const LEAKY_CONTENT = HELD.map((h, i) => (i >= 4 && i < 8 ? Buffer.alloc(B) : h));

export function reclaimCase(name: string, run: (img: string) => Promise<void>): Case {
  return {
    name,
    setup: setupLeaky,
    run: (dir) => run(join(dir, 'img.ksc')),
    verify: async (dir, done, where) => {
      const img = join(dir, 'img.ksc');
      expectBlocks(
        await readAll(img),
        LEAKY_CONTENT.map((c) => [c]),
        where,
      );
      await expectClean(img, where);
    },
  };
}
