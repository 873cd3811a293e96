/**
 * Allocating whole-block writes take the synchronous path of KscImage.write (datapath.ts writeNow, issue 19):
 * blocks that hold no data, their map page and bitmap pages loaded, the block lock free, a run of new
 * clusters from the allocator, and an intent bit only when a bitmap is enabled (already durable). These
 * tests show the path is taken (the data write is issued before write() returns), that a failed write
 * gives its clusters back, and stop the image after every single write and sync of a sequence of such
 * writes and flushes (src/io/fault.ts) with and without a bitmap: every block then reads its old or new
 * content, `check --verify` is clean (no map entry points at a cluster whose data never landed), and the
 * bitmap covers every block that changed. And a flush that starts while such a write is in flight must not
 * make its map entry durable before its data (§9 rule 3): checked on power-cut states (test/helpers/powercut.ts).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { B, type Case, SIZE, block, covers, readAll } from '../helpers/step-cases.js';
import { PowerCut } from '../helpers/powercut.js';
import { Rng } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { HELD0, everyStepTests, expectNoLeaks, runLoaded, setupHeld0, verifyBlocks } from '../helpers/write-path.js';

const BLOCKS = SIZE / B;
/** The sequence the run writes: [first block, count], in order; flushes between some (see run). */
const WRITES: [number, number][] = [
  [1, 1],
  [2, 2],
  [5, 1],
  [9, 2],
  [12, 1],
  [14, 2],
];
const NEW = Array.from({ length: BLOCKS }, (_, i) => block(6, i));

function allocCase(withBitmap: boolean): Case {
  return {
    name: `allocating writes${withBitmap ? ' with a bitmap' : ''}`,
    setup: (dir) => setupHeld0(dir, withBitmap),
    run: (dir) =>
      // The map page loaded: the writes below can take the synchronous path.
      runLoaded(dir, async (k) => {
        const w = (i: number): Promise<void> => {
          const [b, n] = WRITES[i]!;
          return k.write(b * B, Buffer.concat(NEW.slice(b, b + n)));
        };
        await w(0);
        await k.flush();
        await Promise.all([w(1), w(2), w(3)]);
        await k.flush();
        await Promise.all([w(4), w(5)]);
      }),
    verify: async (dir, done, where) => {
      const written = new Set(WRITES.flatMap(([b, n]) => Array.from({ length: n }, (_, k) => b + k)));
      const zero = Buffer.alloc(B);
      await verifyBlocks(
        dir,
        where,
        (i) => (i === 0 ? [HELD0] : !written.has(i) ? [zero] : done ? [NEW[i]!] : [zero, NEW[i]!]),
        withBitmap
          ? async (content, k) => {
              const ext = await k.bitmapExtents('b1');
              for (const i of written) {
                if (content.subarray(i * B, (i + 1) * B).equals(NEW[i]!)) expect(covers(ext, i * B, B), `${where}: bitmap lacks block ${i}`).toBe(true);
              }
            }
          : null,
      );
    },
  };
}

/**
 * An opener whose files count the data writes issued (write and writeWithCrcs of whole blocks; a write
 * that writeWithCrcs makes itself, without the addon, is not counted again) and fail them when told.
 */
function countingOpener(count: { n: number; fail: boolean }): FileOpener {
  return async (p, o) => {
    const f: HostFile = await openHostFile(p, o);
    const write = f.write.bind(f);
    const withCrcs = f.writeWithCrcs?.bind(f);
    let inner = false;
    const eio = (): Promise<never> => Promise.reject(Object.assign(new Error('EIO: injected'), { code: 'EIO' }));
    f.write = (buf, pos) => {
      if (!inner && buf.length % B === 0 && pos % B === 0) count.n++;
      return count.fail && buf.length === B ? eio() : write(buf, pos);
    };
    if (withCrcs) {
      f.writeWithCrcs = (buf, pos, bs) => {
        count.n++;
        if (count.fail) return eio();
        inner = true;
        try {
          return withCrcs(buf, pos, bs);
        } finally {
          inner = false;
        }
      };
    }
    return f;
  };
}

describe('allocating whole-block writes (synchronous path)', () => {
  for (const withBitmap of [false, true]) {
    it(`issue their data write before write() returns${withBitmap ? ' (a bitmap enabled, intent durable)' : ''}`, async () => {
      const dir = tempDir();
      const path = join(dir, 'img.ksc');
      await createImage(path, { size: SIZE, blockSize: B, intentRegion: SIZE });
      const count = { n: 0, fail: false };
      const img = await openKsc(path, { write: true, opener: countingOpener(count) });
      if (withBitmap) await img.addBitmap('b1');
      await img.write(0, NEW[0]!); // general path: loads the map page (and sets the one intent bit)
      const before = count.n;
      const p = img.write(3 * B, Buffer.concat([NEW[3]!, NEW[4]!]));
      expect(count.n, 'the data write was issued synchronously').toBe(before + 1);
      await p;
      await img.close();
      expect((await readAll(path)).subarray(3 * B, 5 * B).equals(Buffer.concat([NEW[3]!, NEW[4]!]))).toBe(true);
      expect((await checkImage(path, { verify: true })).errors).toEqual([]);
    });
  }

  it('a failed allocating write rejects, gives its clusters back and leaves the image usable', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    const count = { n: 0, fail: false };
    const img = await openKsc(path, { write: true, opener: countingOpener(count) });
    await img.write(0, NEW[0]!);
    count.fail = true;
    await expect(img.write(2 * B, NEW[2]!)).rejects.toThrow(/injected/);
    count.fail = false;
    // The lock was released and nothing is counted in flight; the failed write's cluster is reused.
    await img.write(2 * B, NEW[2]!);
    await img.write(3 * B, NEW[3]!);
    await img.quiesce(async () => undefined);
    expect((await img.read(0, 4 * B)).equals(Buffer.concat([NEW[0]!, Buffer.alloc(B), NEW[2]!, NEW[3]!]))).toBe(true);
    await img.close();
    await expectNoLeaks(path);
  });

  everyStepTests(allocCase, 5);

  it('a flush started while the data write is in flight does not reference the new clusters (power cuts after it)', async () => {
    const dir = tempDir();
    const path = join(dir, 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    // Whole-block data writes are held back while `slow` is set, so the flush below starts, syncs and
    // completes while they are in flight.
    let slow = false;
    const held: (() => void)[] = [];
    const slowOpener: FileOpener = async (p, o) => {
      const f: HostFile = await openHostFile(p, o);
      const write = f.write.bind(f);
      f.write = async (buf, pos) => {
        if (slow && buf.length >= B && pos % B === 0) await new Promise<void>((r) => held.push(r));
        return write(buf, pos);
      };
      f.writeWithCrcs = undefined;
      return f;
    };
    const cut = new PowerCut(slowOpener);
    const img = await openKsc(path, { write: true, opener: cut.opener });
    await img.write(0, NEW[0]!); // general path: loads the map page
    await img.flush();
    slow = true;
    const w = img.write(3 * B, Buffer.concat([NEW[3]!, NEW[4]!]));
    await img.flush();
    const afterFlush = cut.tick();
    slow = false;
    for (const r of held.splice(0)) r();
    await w;
    await img.close();
    expect(cut.recorded(path).syncs).toBeGreaterThan(0);
    const rng = new Rng(19);
    for (let i = 0; i < 12; i++) {
      const out = join(dir, `cut-${i}.ksc`);
      await cut.materialise(path, afterFlush, out, rng);
      const r = await checkImage(out, { verify: true });
      expect(r.errors, `cut ${i} after the flush`).toEqual([]);
      const got = (await readAll(out)).subarray(3 * B, 5 * B);
      expect(got.equals(Buffer.alloc(2 * B)) || got.equals(Buffer.concat([NEW[3]!, NEW[4]!])), `cut ${i}: blocks 3-4`).toBe(true);
    }
  });
});
