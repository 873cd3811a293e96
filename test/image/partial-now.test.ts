/**
 * Writes of part of a block take the synchronous path of KscImage.write in groups per block (datapath.ts
 * → partial.ts, issue 19): the pieces written to a new block in one turn of the event loop become one write
 * of the whole block, in issue order; pieces written in place to one block go out side by side when they
 * do not overlap (an overlapping one waits for the lock, and wins). These tests show both (each fails on
 * the general path, where every piece waits for the block lock of the one before), that a failed block
 * write rejects every piece and gives its cluster back, and stop the image after every single write and
 * sync of such a sequence (src/io/fault.ts), with and without a bitmap: every piece then reads old or new,
 * `check --verify` is clean, and the bitmap covers what changed.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { coreOf } from '../../src/image/ksc/image.js';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { B, type Case, KiB, SIZE, block, covers, everyStep, expectBlocks, readAll } from '../helpers/step-cases.js';
import { tempDir } from '../helpers/tmp.js';

const P = 4 * KiB;
const HELD0 = block(5, 0);
/** 4 KiB pieces: a piece of `tag`. */
const piece = (tag: number): Buffer => block(7, tag).subarray(0, P);

/**
 * An opener whose files count the data writes (pieces and blocks; not the metadata at offsets below the
 * data area's first cluster, nor the inner write of writeWithCrcs without the addon), can hold them back,
 * and fail them when told.
 */
function countingOpener(s: { n: number; fail: boolean; hold: boolean; held: (() => void)[] }, dataFrom: () => number): FileOpener {
  return async (p, o) => {
    const f: HostFile = await openHostFile(p, o);
    const write = f.write.bind(f);
    const withCrcs = f.writeWithCrcs?.bind(f);
    let inner = false;
    const eio = (): Promise<never> => Promise.reject(Object.assign(new Error('EIO: injected'), { code: 'EIO' }));
    const gate = async (): Promise<void> => {
      if (s.hold) await new Promise<void>((r) => s.held.push(r));
    };
    f.write = async (buf, pos) => {
      if (inner || pos < dataFrom()) return write(buf, pos);
      s.n++;
      await gate();
      return s.fail ? eio() : write(buf, pos);
    };
    if (withCrcs) {
      f.writeWithCrcs = async (buf, pos, bs) => {
        if (pos < dataFrom()) return withCrcs(buf, pos, bs);
        s.n++;
        await gate();
        if (s.fail) return eio();
        inner = true;
        try {
          return await withCrcs(buf, pos, bs);
        } finally {
          inner = false;
        }
      };
    }
    return f;
  };
}

describe('writes of parts of a block (synchronous path, groups per block)', () => {
  for (const withBitmap of [false, true]) {
    it(`pieces of a new block written in one turn are one write of the block, in issue order${withBitmap ? ' (a bitmap enabled)' : ''}`, async () => {
      const dir = tempDir();
      const path = join(dir, 'img.ksc');
      await createImage(path, { size: SIZE, blockSize: B, intentRegion: SIZE });
      const s = { n: 0, fail: false, hold: false, held: [] as (() => void)[] };
      const img = await openKsc(path, { write: true, opener: countingOpener(s, () => 0) });
      if (withBitmap) await img.addBitmap('b1');
      await img.write(0, HELD0); // general path: loads the map page (and sets the intent bits)
      const before = s.n;
      const ps = [img.write(3 * B, piece(1)), img.write(3 * B + P, piece(2)), img.write(3 * B, piece(3)), img.write(4 * B - P, piece(4))];
      await Promise.all(ps);
      expect(s.n - before, 'one data write for the four pieces').toBe(1);
      const want = Buffer.alloc(B);
      piece(3).copy(want, 0);
      piece(2).copy(want, P);
      piece(4).copy(want, B - P);
      expect((await img.read(3 * B, B)).equals(want)).toBe(true);
      if (withBitmap) expect(covers(await img.bitmapExtents('b1'), 3 * B, B)).toBe(true);
      await img.close();
      expect((await readAll(path)).subarray(3 * B, 4 * B).equals(want)).toBe(true);
      const r = await checkImage(path, { verify: true });
      expect(r.errors).toEqual([]);
      expect(r.leakedBytes).toBe(0);
    });
  }

  it('pieces written in place go out side by side; an overlapping one waits for them and wins', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B, intentRegion: SIZE });
    const s = { n: 0, fail: false, hold: false, held: [] as (() => void)[] };
    const img = await openKsc(path, { write: true, opener: countingOpener(s, () => 0) });
    await img.write(0, HELD0);
    await img.write(8 * KiB, piece(9)); // the intent bit is durable now
    s.hold = true;
    const before = s.n;
    const a = img.write(8 * KiB, piece(1));
    const b = img.write(16 * KiB, piece(2));
    const c = img.write(32 * KiB + 100, piece(3).subarray(0, 1000));
    const over = img.write(16 * KiB + 2048, piece(4));
    await new Promise((r) => setImmediate(r));
    expect(s.n - before, 'the three disjoint pieces issued at once, the overlapping one not yet').toBe(3);
    s.hold = false;
    for (const r of s.held.splice(0)) r();
    await Promise.all([a, b, c, over]);
    const want = Buffer.from(HELD0);
    piece(1).copy(want, 8 * KiB);
    piece(2).copy(want, 16 * KiB);
    piece(3)
      .subarray(0, 1000)
      .copy(want, 32 * KiB + 100);
    piece(4).copy(want, 16 * KiB + 2048);
    expect((await img.read(0, B)).equals(want)).toBe(true);
    await img.close();
    expect((await readAll(path)).subarray(0, B).equals(want)).toBe(true);
    expect((await checkImage(path, { verify: true })).errors).toEqual([]);
  });

  it('a failed block write rejects every piece, gives its cluster back and leaves the image usable', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    const s = { n: 0, fail: false, hold: false, held: [] as (() => void)[] };
    const img = await openKsc(path, { write: true, opener: countingOpener(s, () => 0) });
    await img.write(0, HELD0);
    s.fail = true;
    const ps = [img.write(2 * B, piece(1)), img.write(2 * B + P, piece(2))];
    for (const p of ps) await expect(p).rejects.toThrow(/injected/);
    s.fail = false;
    expect((await img.read(2 * B, B)).equals(Buffer.alloc(B))).toBe(true);
    await img.write(2 * B + P, piece(2));
    await img.write(3 * B, block(6, 3));
    await img.quiesce(async () => undefined);
    const want2 = Buffer.alloc(B);
    piece(2).copy(want2, P);
    expect((await img.read(0, 4 * B)).equals(Buffer.concat([HELD0, Buffer.alloc(B), want2, block(6, 3)]))).toBe(true);
    await img.close();
    const r = await checkImage(path, { verify: true });
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes).toBe(0);
  });

  for (const withBitmap of [false, true]) {
    it(`pieces of a new block that arrive while its write is in flight are the next wave: one more write of the whole block, checksum valid${withBitmap ? ' (a bitmap enabled)' : ''}`, async () => {
      const dir = tempDir();
      const path = join(dir, 'img.ksc');
      await createImage(path, { size: SIZE, blockSize: B, intentRegion: SIZE });
      const s = { n: 0, fail: false, hold: false, held: [] as (() => void)[] };
      const img = await openKsc(path, { write: true, opener: countingOpener(s, () => 0) });
      if (withBitmap) await img.addBitmap('b1');
      await img.write(0, HELD0); // general path: loads the map page (and sets the intent bits)
      s.hold = true;
      const before = s.n;
      const wave1 = [img.write(3 * B, piece(1)), img.write(3 * B + P, piece(2))];
      await new Promise((r) => setImmediate(r));
      expect(s.n - before, 'the first wave is being written').toBe(1);
      const wave2 = [img.write(3 * B + 8 * P, piece(3)), img.write(3 * B, piece(4)), img.write(3 * B + 8 * P + 100, piece(5).subarray(0, 200))];
      await new Promise((r) => setImmediate(r));
      expect(s.n - before, 'the later pieces wait for the first wave, none took a write of its own').toBe(1);
      s.hold = false;
      for (const r of s.held.splice(0)) r();
      await Promise.all([...wave1, ...wave2]);
      expect(s.n - before, 'one more write: the whole block').toBe(2);
      const want = Buffer.alloc(B);
      piece(4).copy(want, 0);
      piece(2).copy(want, P);
      piece(3).copy(want, 8 * P);
      piece(5)
        .subarray(0, 200)
        .copy(want, 8 * P + 100);
      expect((await img.read(3 * B, B)).equals(want)).toBe(true);
      expect(coreOf(img).map.page(0)!.csumValid[3], 'the rewritten block keeps a valid checksum').toBe(1);
      if (withBitmap) expect(covers(await img.bitmapExtents('b1'), 3 * B, B)).toBe(true);
      await img.close();
      expect((await readAll(path)).subarray(3 * B, 4 * B).equals(want)).toBe(true);
      const r = await checkImage(path, { verify: true });
      expect(r.errors).toEqual([]);
      expect(r.leakedBytes).toBe(0);
    });
  }

  it('a later wave whose pieces lie close together writes only their span (the checksum then not valid)', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B, intentRegion: SIZE });
    const s = { n: 0, fail: false, hold: false, held: [] as (() => void)[] };
    const img = await openKsc(path, { write: true, opener: countingOpener(s, () => 0) });
    await img.write(0, HELD0);
    s.hold = true;
    const before = s.n;
    const wave1 = img.write(3 * B, piece(1));
    await new Promise((r) => setImmediate(r));
    const wave2 = [img.write(3 * B + 5 * P, piece(2)), img.write(3 * B + 6 * P + 10, piece(3).subarray(0, 10))];
    s.hold = false;
    for (const r of s.held.splice(0)) r();
    await Promise.all([wave1, ...wave2]);
    expect(s.n - before, 'the block, then the span of the second wave').toBe(2);
    const want = Buffer.alloc(B);
    piece(1).copy(want, 0);
    piece(2).copy(want, 5 * P);
    piece(3)
      .subarray(0, 10)
      .copy(want, 6 * P + 10);
    expect((await img.read(3 * B, B)).equals(want)).toBe(true);
    expect(coreOf(img).map.page(0)!.csumValid[3]).toBe(0);
    await img.close();
    expect((await readAll(path)).subarray(3 * B, 4 * B).equals(want)).toBe(true);
    const r = await checkImage(path, { verify: true });
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes).toBe(0);
  });

  it('a failed later wave rejects its pieces and the queued ones, and leaves the block reading its earlier waves', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B, intentRegion: SIZE });
    const s = { n: 0, fail: false, hold: false, held: [] as (() => void)[] };
    const img = await openKsc(path, { write: true, opener: countingOpener(s, () => 0) });
    await img.write(0, HELD0);
    s.hold = true;
    const wave1 = img.write(3 * B, piece(1));
    await new Promise((r) => setImmediate(r));
    const wave2 = img.write(3 * B + P, piece(2));
    for (const r of s.held.splice(0)) r();
    await wave1;
    await new Promise((r) => setImmediate(r));
    expect(s.held.length, 'the second wave is being written').toBe(1);
    const queued = img.write(3 * B + 2 * P, piece(3));
    s.fail = true;
    for (const r of s.held.splice(0)) r();
    s.hold = false;
    await expect(wave2).rejects.toThrow(/injected/);
    await expect(queued).rejects.toThrow(/injected/);
    s.fail = false;
    const want = Buffer.alloc(B);
    piece(1).copy(want, 0);
    expect((await img.read(3 * B, B)).equals(want)).toBe(true);
    await img.write(3 * B + P, piece(2));
    piece(2).copy(want, P);
    expect((await img.read(3 * B, B)).equals(want)).toBe(true);
    await img.close();
    const r = await checkImage(path, { verify: true });
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes).toBe(0);
  });

  for (const withBitmap of [false, true]) {
    const c = chainCase(withBitmap);
    it(`${c.name}: stopped after every write and sync (fault injection)`, async () => {
      expect(await everyStep(c)).toBeGreaterThan(4);
    }, 300_000);
  }

  for (const withBitmap of [false, true]) {
    const c = partialCase(withBitmap);
    it(`${c.name}: stopped after every write and sync (fault injection)`, async () => {
      expect(await everyStep(c)).toBeGreaterThan(4);
    }, 300_000);
  }
});

/** Block 0 holds HELD0; the run writes pieces of new block 2, flushes, writes pieces of block 0 in place. */
function partialCase(withBitmap: boolean): Case {
  const new2 = Buffer.alloc(B);
  piece(3).copy(new2, 0);
  piece(2).copy(new2, P);
  piece(4).copy(new2, B - P);
  const variants0: Buffer[] = [];
  for (const at8 of [null, piece(5), piece(7)]) {
    for (const at16 of [null, piece(6)]) {
      const v = Buffer.from(HELD0);
      if (at8) at8.copy(v, 8 * KiB);
      if (at16) at16.copy(v, 16 * KiB);
      variants0.push(v);
    }
  }
  const final0 = variants0[5]!; // piece 7 at 8 KiB, piece 6 at 16 KiB
  return {
    name: `pieces of a new block, then in place${withBitmap ? ' with a bitmap' : ''}`,
    setup: async (dir) => {
      const img = join(dir, 'img.ksc');
      await createImage(img, { size: SIZE, blockSize: B, intentRegion: 4 * B });
      const k = await openKsc(img, { write: true });
      if (withBitmap) await k.addBitmap('b1');
      await k.write(0, HELD0);
      await k.close();
    },
    run: async (dir) => {
      const k = await openKsc(join(dir, 'img.ksc'), { write: true });
      try {
        await k.read(0, B); // the map page loaded
        await Promise.all([k.write(2 * B, piece(1)), k.write(2 * B + P, piece(2)), k.write(2 * B, piece(3)), k.write(3 * B - P, piece(4))]);
        await k.flush();
        await k.write(8 * KiB, piece(5)); // the intent bit (general path), then side by side:
        await Promise.all([k.write(8 * KiB, piece(7)), k.write(16 * KiB, piece(6))]);
        await k.flush();
      } finally {
        await k.close();
      }
    },
    verify: async (dir, done, where) => {
      const img = join(dir, 'img.ksc');
      const content = await readAll(img);
      const zero = Buffer.alloc(B);
      expectBlocks(
        content,
        Array.from({ length: SIZE / B }, (_, i) => (i === 0 ? (done ? [final0] : variants0) : i === 2 ? (done ? [new2] : [zero, new2]) : [zero])),
        where,
      );
      const r = await checkImage(img, { verify: true });
      expect(r.errors, `${where}: check --verify`).toEqual([]);
      if (!withBitmap) return;
      const k = await openKsc(img);
      try {
        const ext = await k.bitmapExtents('b1');
        if (!content.subarray(2 * B, 3 * B).equals(zero)) expect(covers(ext, 2 * B, B), `${where}: bitmap lacks block 2`).toBe(true);
        if (!content.subarray(0, B).equals(HELD0)) expect(covers(ext, 8 * KiB, P) && covers(ext, 16 * KiB, P), `${where}: bitmap lacks block 0`).toBe(true);
      } finally {
        await k.close();
      }
    },
  };
}

/**
 * Waves of new block 2 (partial.ts chains): the first two pieces in one turn; two more while that write is
 * in flight (the second wave); a flush while the second wave is in flight (it snapshots the entry, not
 * valid); a fifth piece then (a third wave, which needs the intent bit: a flush has been taken since the
 * entry was valid); then a flush. Whatever step the image stops after, block 2 reads as zeros or as the
 * end of a wave; once the first flush has returned, at least the first wave; `check --verify` is clean (a
 * checksum recorded for data a later wave changed would fail it).
 */
function chainCase(withBitmap: boolean): Case {
  const waves: Buffer[] = [Buffer.alloc(B)];
  const w = Buffer.alloc(B);
  piece(1).copy(w, 0);
  piece(2).copy(w, P);
  waves.push(Buffer.from(w));
  piece(3).copy(w, 0);
  piece(4).copy(w, 5 * P);
  waves.push(Buffer.from(w));
  piece(5).copy(w, B - P);
  waves.push(Buffer.from(w));
  let flushed = 0; // waves the run knows durable (set as its flushes return)
  return {
    name: `waves of a new block around a flush${withBitmap ? ' with a bitmap' : ''}`,
    setup: async (dir) => {
      flushed = 0;
      const img = join(dir, 'img.ksc');
      await createImage(img, { size: SIZE, blockSize: B, intentRegion: 4 * B });
      const k = await openKsc(img, { write: true });
      if (withBitmap) await k.addBitmap('b1');
      await k.write(0, HELD0);
      await k.close();
    },
    run: async (dir) => {
      const k = await openKsc(join(dir, 'img.ksc'), { write: true });
      try {
        await k.read(0, B); // the map page loaded
        const handled = <T>(p: Promise<T>): Promise<T> => (p.catch(() => undefined), p); // a stop rejects them all
        const wave1 = [handled(k.write(2 * B, piece(1))), handled(k.write(2 * B + P, piece(2)))];
        await new Promise((r) => setImmediate(r));
        const wave2 = [handled(k.write(2 * B, piece(3))), handled(k.write(2 * B + 5 * P, piece(4)))];
        await Promise.all(wave1);
        const f1 = handled(k.flush());
        const wave3 = handled(k.write(3 * B - P, piece(5)));
        await f1;
        flushed = Math.max(flushed, 1);
        await Promise.all([...wave2, wave3]);
        await k.flush();
        flushed = 3;
      } finally {
        await k.close();
      }
    },
    verify: async (dir, done, where) => {
      const img = join(dir, 'img.ksc');
      const content = await readAll(img);
      const b2 = done ? [waves[3]!] : waves.slice(flushed);
      expectBlocks(
        content,
        Array.from({ length: SIZE / B }, (_, i) => (i === 0 ? [HELD0] : i === 2 ? b2 : [Buffer.alloc(B)])),
        where,
      );
      const r = await checkImage(img, { verify: true });
      expect(r.errors, `${where}: check --verify`).toEqual([]);
      if (!withBitmap) return;
      const k = await openKsc(img);
      try {
        if (!content.subarray(2 * B, 3 * B).equals(waves[0]!)) expect(covers(await k.bitmapExtents('b1'), 2 * B, B), `${where}: bitmap lacks block 2`).toBe(true);
      } finally {
        await k.close();
      }
    },
  };
}
