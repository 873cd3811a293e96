/**
 * In-place overwrites of whole blocks that already hold data take a synchronous path in KscImage.write
 * (no promise hop before the I/O when the block lock is free, the map page and bitmap pages are loaded and
 * the intent bits are durable). These tests aim requests at that path while everything else is in flight:
 * results must still equal applying the requests in issue order, reads must see exactly the requests issued
 * before them, bitmaps must cover every change, checksums must verify, quiesce() must hold and drain them,
 * and a failed write must leave the image usable.
 */
import { join } from 'node:path';
import { describe, it, expect } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, isKscError, openKsc } from '../../src/index.js';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { jitterOpener } from '../helpers/powercut.js';
import { Rng } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;

function fill(rng: Rng, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 512) b.fill(rng.int(1, 255), i, Math.min(length, i + 512));
  return b;
}

describe('whole-block overwrites (synchronous path)', () => {
  for (const [blockSize, jitter] of [
    [4096, false],
    [65536, false],
    [65536, true],
  ] as const) {
    it(`in flight with partial writes, zeroes, discards, reads, flushes and quiesce (block ${blockSize}${jitter ? ', jittered I/O' : ''})`, async () => {
      const seed = Number(process.env.KSC_SEED ?? (Date.now() % 1e9) + blockSize + (jitter ? 1 : 0));
      console.log(`overwrite seed ${seed} (replay with KSC_SEED=${seed})`);
      const rng = new Rng(seed);
      const dir = tempDir();
      const path = join(dir, 'img.ksc');
      const B = blockSize;
      const blocks = 48;
      const size = blocks * B;
      const opener: FileOpener | undefined = jitter ? jitterOpener(new Rng(seed ^ 0x5a5a)) : undefined;
      await createImage(path, { size, blockSize: B, intentRegion: Math.max(B, 64 * KiB) });
      let img = await openKsc(path, { write: true, opener });
      const model = fill(rng, size);
      await img.write(0, model);
      await img.close();
      // A fresh open: intent bits clear and map pages not loaded, so early requests take the general path
      // and later ones (same regions, pages loaded) the synchronous one.
      img = await openKsc(path, { write: true, opener });
      await img.addBitmap('b');
      const touched = new Uint8Array(blocks);
      const pending: Promise<unknown>[] = [];
      const checks: { at: number; len: number; expect: Buffer; got: Promise<Buffer> }[] = [];
      const quiesced: { expect: Buffer; got: Promise<Buffer> }[] = [];
      for (let i = 0; i < 600; i++) {
        const op = rng.int(0, 99);
        if (op < 55) {
          // Whole blocks, 1–3 of them (the synchronous path when they hold data).
          const n = rng.int(1, 3);
          const b0 = rng.int(0, blocks - n);
          const data = fill(rng, n * B);
          pending.push(img.write(b0 * B, data, { fua: rng.int(0, 30) === 0 }));
          data.copy(model, b0 * B);
          touched.fill(1, b0, b0 + n);
        } else if (op < 65) {
          const len = rng.int(1, 2 * B);
          const at = rng.int(0, size - len);
          const data = fill(rng, len);
          pending.push(img.write(at, data));
          data.copy(model, at);
          touched.fill(1, Math.floor(at / B), Math.floor((at + len - 1) / B) + 1);
        } else if (op < 71) {
          const b0 = rng.int(0, blocks - 2);
          const len = rng.int(1, 2) * B;
          pending.push(img.writeZeroes(b0 * B, len, { mayTrim: rng.int(0, 1) === 0 }));
          model.fill(0, b0 * B, b0 * B + len);
          touched.fill(1, b0, b0 + len / B);
        } else if (op < 75) {
          const b0 = rng.int(0, blocks - 1);
          pending.push(img.discard(b0 * B, B));
          model.fill(0, b0 * B, b0 * B + B);
          touched[b0] = 1;
        } else if (op < 80) {
          pending.push(img.flush());
        } else if (op < 82) {
          // Inside quiesce every change issued before it has finished. (Awaited here: reads are not held by
          // quiesce, so a read issued meanwhile could overtake changes held at its gate.)
          const snap = Buffer.from(model);
          let got!: Buffer;
          await img.quiesce(async () => {
            got = await img.read(0, size);
          });
          quiesced.push({ expect: snap, got: Promise.resolve(got) });
        } else {
          const len = rng.int(1, 3 * B);
          const at = rng.int(0, size - len);
          checks.push({ at, len, expect: Buffer.from(model.subarray(at, at + len)), got: img.read(at, len) });
        }
        // Let the queue drain now and then, so that requests find their blocks unlocked (the synchronous path).
        if (rng.int(0, 40) === 0) await new Promise((r) => setImmediate(r));
        else if (rng.int(0, 12) === 0) await Promise.all(pending.slice(-6));
      }
      await Promise.all(pending);
      for (const c of checks) {
        const got = await c.got;
        expect(got.equals(c.expect), `read at ${c.at}+${c.len} (seed ${seed})`).toBe(true);
      }
      for (const [k, q] of quiesced.entries()) expect((await q.got).equals(q.expect), `quiesce ${k} (seed ${seed})`).toBe(true);
      expect((await img.read(0, size)).equals(model), `final content (seed ${seed})`).toBe(true);
      const dirty = await img.bitmapExtents('b');
      for (let b = 0; b < blocks; b++) {
        if (!touched[b]) continue;
        expect(
          dirty.some((e) => e.offset <= b * B && (b + 1) * B <= e.offset + e.length),
          `bitmap covers block ${b} (seed ${seed})`,
        ).toBe(true);
      }
      await img.close();
      const report = await checkImage(path, { verify: true });
      expect(report.errors, `check (seed ${seed})`).toEqual([]);
      expect(report.verify?.mismatches, `checksums (seed ${seed})`).toEqual([]);
      const again = await openKsc(path);
      expect((await again.read(0, size)).equals(model), `after reopen (seed ${seed})`).toBe(true);
      await again.close();
    });
  }

  it('keeps checksums of overwritten blocks valid and verifiable', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    const B = 64 * KiB;
    await createImage(path, { size: 16 * B });
    const rng = new Rng(7);
    let img = await openKsc(path, { write: true });
    const model = fill(rng, 16 * B);
    await img.write(0, model);
    await img.flush();
    for (let round = 0; round < 3; round++) {
      await Promise.all(
        Array.from({ length: 16 }, (_, b) => {
          const data = fill(rng, B);
          data.copy(model, b * B);
          return img.write(b * B, data);
        }),
      );
    }
    for (let b = 0; b < 16; b++) {
      const st = await img.blockState(b);
      expect(st.csumValid, `block ${b} keeps a checksum`).toBe(true);
    }
    await img.close();
    const report = await checkImage(path, { verify: true });
    expect(report.ok).toBe(true);
    expect(report.verify).toMatchObject({ checked: 16, mismatches: [], withoutChecksum: 0 });
    img = await openKsc(path);
    expect((await img.read(0, 16 * B)).equals(model)).toBe(true);
    await img.close();
  });

  it('a failed overwrite rejects, releases its block and leaves the image usable', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    const B = 64 * KiB;
    await createImage(path, { size: 8 * B });
    let failing = false;
    const opener: FileOpener = async (p, o) => {
      const f: HostFile = await openHostFile(p, o);
      const write = f.write.bind(f);
      const withCrcs = f.writeWithCrcs?.bind(f);
      const eio = (): Promise<never> => Promise.reject(Object.assign(new Error('EIO: injected'), { code: 'EIO' }));
      f.write = (buf, pos) => (failing && buf.length === B ? eio() : write(buf, pos));
      if (withCrcs) f.writeWithCrcs = (buf, pos, bs) => (failing ? eio() : withCrcs(buf, pos, bs));
      return f;
    };
    const img = await openKsc(path, { write: true, opener });
    const model = fill(new Rng(3), 8 * B);
    await img.write(0, model);
    await img.write(0, model.subarray(0, B)); // region intent set, pages loaded: the synchronous path from here
    failing = true;
    await expect(img.write(2 * B, Buffer.alloc(B, 9))).rejects.toThrow(/injected/);
    failing = false;
    // The block lock was released and nothing is counted in flight: these complete.
    const data = Buffer.alloc(B, 7);
    await img.write(2 * B, data);
    data.copy(model, 2 * B);
    await img.quiesce(async () => undefined);
    expect((await img.read(0, 8 * B)).equals(model)).toBe(true);
    await img.close();
  });

  it('rejects (never throws) on bad arguments and closed or read-only images', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    await createImage(path, { size: 4 * 64 * KiB });
    const ro = await openKsc(path);
    const p1 = ro.write(0, Buffer.alloc(64 * KiB));
    await expect(p1).rejects.toSatisfy((e: unknown) => isKscError(e, 'KSC_E_READ_ONLY'));
    await ro.close();
    const img = await openKsc(path, { write: true });
    await img.write(0, Buffer.alloc(64 * KiB, 1));
    const p2 = img.write(3 * 64 * KiB, Buffer.alloc(2 * 64 * KiB, 1));
    await expect(p2).rejects.toSatisfy((e: unknown) => isKscError(e, 'KSC_E_RANGE'));
    const p3 = img.write(0, null as unknown as Buffer);
    await expect(p3).rejects.toBeInstanceOf(Error);
    await img.close();
    const p4 = img.write(0, Buffer.alloc(64 * KiB, 1));
    await expect(p4).rejects.toSatisfy((e: unknown) => isKscError(e, 'KSC_E_CLOSED'));
  });
});

describe('intent bits', () => {
  it('a change to a region whose bit is being written waits for that write, not for another sync', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    const B = 64 * KiB;
    await createImage(path, { size: 64 * B });
    let durable = 0;
    const opener: FileOpener = async (p, o) => {
      const f: HostFile = await openHostFile(p, o);
      const inner = f.writeDurable?.bind(f);
      f.writeDurable = async (buf, pos) => {
        durable++;
        await new Promise((r) => setTimeout(r, 20));
        await (inner ? inner(buf, pos) : f.write(buf, pos).then(() => f.sync()));
      };
      return f;
    };
    const img = await openKsc(path, { write: true, opener });
    await img.addBitmap('b'); // every change needs its region's intent bit
    const before = { syncs: img.intentSyncs, durable };
    const first = img.write(0, Buffer.alloc(B, 1));
    await new Promise((r) => setTimeout(r, 5)); // the bit of region 0 is now being written
    const more = [img.write(B, Buffer.alloc(B, 2)), img.write(2 * B, Buffer.alloc(2 * B, 3))];
    await Promise.all([first, ...more]);
    expect(img.intentSyncs - before.syncs).toBe(1);
    expect(durable - before.durable).toBe(1);
    expect((await img.read(0, 4 * B)).equals(Buffer.concat([Buffer.alloc(B, 1), Buffer.alloc(B, 2), Buffer.alloc(2 * B, 3)]))).toBe(true);
    await img.close();
  });
});
