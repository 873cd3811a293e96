/**
 * Hostile: whole-block writes into empty blocks start their data write at once (datapath.ts writeNow,
 * Allocator.allocRun), beside the general change path. Seeded storms of requests issued without waiting,
 * aimed at a few hot blocks on both sides of a map-page boundary (block 4096): whole writes of 1–3 blocks,
 * partial writes, write-zeroes with and without trim, discards (whole and partial), reads, flushes, and —
 * with a bitmap — clear and merge of it. Requests to one block keep their issue order (core.ts: every
 * change and read queues for its block locks in the caller's synchronous step), so a read sees exactly
 * what the model held when it was issued and the image ends as the model does. After each round:
 * the image reads as the model; every few rounds a clean close with `check --verify` clean and nothing
 * leaked (no cluster both free and mapped, none lost); the bitmap covers every block written since its
 * last clear. Run with the addon and without (KSCINC_NO_NATIVE=1: the write and its CRCs in JS).
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import type { KscImage } from '../../src/image/ksc/image.js';
import { type FileOpener, openHostFile } from '../../src/io/file.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const B = 4096;
const BLOCKS = 4104;
/** Hot blocks: the start of the disk and both sides of the first map page boundary (4096 blocks a page). */
const HOT = [0, 1, 2, 3, 4, 5, 6, 7, 4090, 4091, 4092, 4093, 4094, 4095, 4096, 4097, 4098, 4099, 4100, 4101, 4102, 4103];

const digest = (b: Buffer): string => createHash('sha1').update(b).digest('hex').slice(0, 16);

/** Counts the data writes the image's file was asked for (to see which whole writes were issued at once). */
function countingOpener(count: { n: number }): FileOpener {
  return async (p, o) => {
    const f = await openHostFile(p, o);
    const write = f.write.bind(f);
    const writev = f.writev.bind(f);
    const withCrcs = f.writeWithCrcs?.bind(f);
    f.write = (buf, pos) => (count.n++, write(buf, pos));
    f.writev = (bufs, pos) => (count.n++, writev(bufs, pos));
    if (withCrcs) f.writeWithCrcs = (buf, pos, bs) => (count.n++, withCrcs(buf, pos, bs));
    return f;
  };
}

interface Storm {
  img: KscImage;
  /** File writes issued so far, and the whole writes whose data write was issued before write() returned. */
  writes: { n: number };
  atOnce: number;
  model: Buffer;
  /** Blocks changed by requests issued since the bitmap's last clear completed. */
  dirtySinceClear: Set<number>;
}

function pickRun(rng: Rng): [number, number] {
  const b = rng.pick(HOT);
  const n = Math.min(rng.int(1, 3), BLOCKS - b);
  return [b, n];
}

function pattern(rng: Rng, n: number, seq: number): Buffer {
  const buf = rng.bytes(n);
  // Each 512-byte sector starts with the sequence number: a misplaced sector is easy to see in a diff.
  for (let o = 0; o + 4 <= n; o += 512) buf.writeUInt32LE(seq, o);
  return buf;
}

async function round(s: Storm, rng: Rng, r: number, withBitmap: boolean, seq: { n: number }): Promise<void> {
  const ops: Promise<unknown>[] = [];
  const what: string[] = [];
  const count = rng.int(6, 30);
  for (let k = 0; k < count; k++) {
    if (rng.chance(0.2)) await (rng.chance(0.5) ? Promise.resolve() : new Promise((res) => setImmediate(res)));
    const kind = rng.weighted({ whole: 8, partial: 3, zero: 2, zeroKeep: 1, discard: 2, discardPart: 1, read: 3, flush: 1, clear: withBitmap ? 0.5 : 0, merge: withBitmap ? 0.5 : 0 });
    const [b, n] = pickRun(rng);
    const off = b * B;
    const len = n * B;
    const mark = (): void => {
      for (let i = b; i < b + n; i++) s.dirtySinceClear.add(i);
    };
    switch (kind) {
      case 'whole': {
        const data = pattern(rng, len, ++seq.n);
        data.copy(s.model, off);
        mark();
        const before = s.writes.n;
        ops.push(s.img.write(off, data, { fua: rng.chance(0.1) }));
        if (s.writes.n > before) s.atOnce++;
        what.push(`write ${b}+${n}`);
        break;
      }
      case 'partial': {
        const inBlock = rng.chance(0.5) ? rng.int(0, B / 512 - 1) * 512 : rng.int(0, B - 1);
        const l = rng.int(1, Math.min(len - inBlock, B + 1000));
        const data = pattern(rng, l, ++seq.n);
        data.copy(s.model, off + inBlock);
        for (let i = Math.floor((off + inBlock) / B); i <= Math.floor((off + inBlock + l - 1) / B); i++) s.dirtySinceClear.add(i);
        ops.push(s.img.write(off + inBlock, data));
        what.push(`write ${off + inBlock}+${l}`);
        break;
      }
      case 'zero':
      case 'zeroKeep':
        s.model.fill(0, off, off + len);
        mark();
        ops.push(s.img.writeZeroes(off, len, { mayTrim: kind === 'zero' }));
        what.push(`${kind} ${b}+${n}`);
        break;
      case 'discard':
        s.model.fill(0, off, off + len);
        mark();
        ops.push(s.img.discard(off, len));
        what.push(`discard ${b}+${n}`);
        break;
      case 'discardPart': {
        // A discard of part of a block leaves it as it is (no backing: whole blocks read zeros).
        const inBlock = rng.int(1, B - 1);
        ops.push(s.img.discard(off + inBlock, B - inBlock));
        what.push(`discard ${off + inBlock}+${B - inBlock}`);
        break;
      }
      case 'read': {
        const expected = Buffer.from(s.model.subarray(off, off + len));
        const label = `read ${b}+${n} (op ${k})`;
        ops.push(
          s.img.read(off, len).then((got) => {
            if (!got.equals(expected)) throw new Error(`round ${r}: ${label} read ${digest(got)}, the model held ${digest(expected)} when it was issued`);
          }),
        );
        what.push(label);
        break;
      }
      case 'flush':
        ops.push(s.img.flush());
        what.push('flush');
        break;
      case 'clear':
        // Changes racing the clear may land on either side of it: only those issued after it resolved count.
        ops.push(s.img.clearBitmap('b1').then(() => (s.dirtySinceClear = new Set())));
        what.push('clear');
        break;
      case 'merge':
        ops.push(s.img.mergeBitmap('b1', 'b2'));
        what.push('merge');
        break;
    }
  }
  const results = await Promise.allSettled(ops);
  const failed = results.flatMap((x, i) => (x.status === 'rejected' ? [`${what[i]}: ${(x.reason as Error).message}`] : []));
  expect(failed, `round ${r}: ${what.join(', ')}`).toEqual([]);
  for (const b of HOT) {
    const got = await s.img.read(b * B, B);
    expect(digest(got), `round ${r}: block ${b} after ${what.join(', ')}`).toBe(digest(s.model.subarray(b * B, (b + 1) * B)));
  }
}

async function storm(withBitmap: boolean, label: string): Promise<void> {
  const seed = seedFor(`test/hostile/alloc-now-storm.test.ts ${label}`);
  const rng = new Rng(seed);
  const dir = tempDir();
  const path = join(dir, 'img.ksc');
  // Small intent regions (4 blocks): writes meet regions whose bit is not durable yet, and cleared ones.
  await createImage(path, { size: BLOCKS * B, blockSize: B, intentRegion: 4 * B });
  const writes = { n: 0 };
  const opener = countingOpener(writes);
  let img = await openKsc(path, { write: true, opener });
  if (withBitmap) {
    await img.addBitmap('b1');
    await img.addBitmap('b2', { granularity: 64 * 1024 });
  }
  const s: Storm = { img, writes, atOnce: 0, model: Buffer.alloc(BLOCKS * B), dirtySinceClear: new Set() };
  const seq = { n: 0 };
  const rounds = 60;
  for (let r = 0; r < rounds; r++) {
    // Load the map pages (a read) in most rounds, so the synchronous path is open; some rounds start cold.
    if (r % 7 !== 3) await img.read(4090 * B, 12 * B);
    await round(s, rng, r, withBitmap, seq);
    if (withBitmap) {
      const ext = await img.bitmapExtents('b1');
      for (const b of s.dirtySinceClear) {
        expect(
          ext.some((e) => e.offset <= b * B && b * B + B <= e.offset + e.length),
          `round ${r}: bitmap b1 lacks block ${b}`,
        ).toBe(true);
      }
    }
    if (r % 10 === 9 || r === rounds - 1) {
      await img.close();
      const c = await checkImage(path, { verify: true });
      expect(c.errors, `round ${r}: check --verify`).toEqual([]);
      expect(c.leakedBytes, `round ${r}: leaked`).toBe(0);
      img = await openKsc(path, { write: true, opener });
      s.img = img;
      const all = await img.read(0, BLOCKS * B);
      expect(digest(all), `round ${r}: reopened image`).toBe(digest(s.model));
    }
  }
  await img.close();
  expect(s.atOnce, 'whole writes issued at once (the path under test)').toBeGreaterThan(20);
}

describe('whole-block writes at once under a storm of racing changes', () => {
  const saved = process.env['KSCINC_NO_NATIVE'];
  afterEach(() => {
    if (saved === undefined) delete process.env['KSCINC_NO_NATIVE'];
    else process.env['KSCINC_NO_NATIVE'] = saved;
  });
  for (const native of [true, false]) {
    for (const withBitmap of [false, true]) {
      const label = `${native ? 'addon' : 'KSCINC_NO_NATIVE=1'}${withBitmap ? ', two bitmaps' : ''}`;
      it(`each request to a block in issue order, image clean (${label})`, async () => {
        if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
        await storm(withBitmap, label);
      }, 120_000);
    }
  }
});
