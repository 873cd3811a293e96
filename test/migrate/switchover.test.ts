/**
 * The switch-over's invariants (formats/migrate.md §1, §4) on the engine, with a real source image and a
 * real destination image; the target is a MigrationTarget over the destination device with fault injection
 * (the wrapper style of the project): writes made while `complete` holds them are held, not failed; when the
 * switch-over fails they proceed on the source (nothing lost, the source serves as before); when it succeeds
 * every write acknowledged before it is on the destination, and the held ones fail with KSC_E_READ_ONLY.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/index.js';
import { MIGRATE_BITMAP, MIGRATE_FROZEN, Migration } from '../../src/engines/migrate.js';
import type { MigrationTarget } from '../../src/engines/migrate-send.js';
import type { BlockDevice } from '../../src/image/types.js';
import { tempDir } from '../helpers/tmp.js';
import { prng } from './helpers.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`switchover.test seed ${seed}`);

/**
 * A destination device as a MigrationTarget. complete() flushes twice: once still serving, once inside the
 * pause (formats/migrate.md §4 steps 1 and 4); at the flush numbered `pauseFlush` it calls `inPause`, waits
 * `flushDelayMs`, and fails when `flushFails`.
 */
class DeviceTarget implements MigrationTarget {
  readonly maxPayload = 32 * MiB;
  readonly parallelism = 8;
  flushFails = false;
  flushDelayMs = 50;
  flushes = 0;
  pauseFlush = Infinity;
  inPause: (() => void) | null = null;
  /** Called after the delay inside the pause, before the flush answers. */
  endOfPause: (() => void) | null = null;
  completed = false;
  constructor(private readonly dev: BlockDevice) {}
  get size(): number {
    return this.dev.size;
  }
  write(o: number, d: Buffer): Promise<void> {
    return this.dev.write(o, d);
  }
  writeZeroes(o: number, n: number): Promise<void> {
    return this.dev.writeZeroes(o, n);
  }
  async flush(): Promise<void> {
    if (++this.flushes === this.pauseFlush) {
      this.inPause?.();
      await new Promise((r) => setTimeout(r, this.flushDelayMs));
      this.endOfPause?.();
      if (this.flushFails) throw new Error('injected: destination flush failed');
    }
    await this.dev.flush();
  }
  async complete(): Promise<void> {
    this.completed = true;
  }
  async close(): Promise<void> {}
  destroy(): void {}
}

async function setup(): Promise<{ src: BlockDevice; dst: BlockDevice; target: DeviceTarget }> {
  const dir = tempDir();
  await createImage(join(dir, 'base.ksc'), { size: SIZE });
  const base = await openImage(join(dir, 'base.ksc'), { write: true });
  await base.write(0, Buffer.alloc(8 * MiB, 0x11));
  await base.close();
  await createImage(join(dir, 'vm.ksc'), { size: SIZE, backing: join(dir, 'base.ksc') });
  await createImage(join(dir, 'dst.ksc'), { size: SIZE, backing: join(dir, 'base.ksc') });
  const src = await openImage(join(dir, 'vm.ksc'), { write: true });
  const dst = await openImage(join(dir, 'dst.ksc'), { write: true });
  await src.write(MiB, Buffer.alloc(2 * MiB, 0x22));
  return { src, dst, target: new DeviceTarget(dst) };
}

/** Writes issued while complete() runs: each resolves (acknowledged) or rejects; the model holds the acknowledged ones. */
function heldWrites(src: BlockDevice, rnd: () => number, n: number, model: Buffer, settled: { count: number }): Promise<PromiseSettledResult<void>[]> {
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < n; i++) {
    const off = 4096 * Math.floor(rnd() * (SIZE / 4096 - 1));
    const data = Buffer.alloc(4096, 0x40 + i);
    jobs.push(
      src.write(off, data).then(
        () => void (data.copy(model, off), settled.count++),
        (e: unknown) => {
          settled.count++;
          throw e;
        },
      ),
    );
  }
  return Promise.allSettled(jobs);
}

/** The image's MIGRATED_AWAY flag (formats/ksc_inc.md §4.1), as its header says now. */
const migratedAway = (dev: BlockDevice): boolean => (dev as unknown as { migratedAway: boolean }).migratedAway;

/**
 * Waits until the copy loop is idle (first pass and at least one round done, nothing dirty): from then on
 * no flush happens until complete(), whose flushes are counted from here (a round that sends blocks
 * flushes the destination, §10 rule 2).
 */
async function quiet(m: Migration): Promise<void> {
  for (let t = 0; t < 800; t++) {
    const s = m.status();
    if (s.rounds >= 1 && s.bytesLeft === 0) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`the migration did not go quiet: ${JSON.stringify(m.status())}`);
}

async function whole(dev: BlockDevice): Promise<Buffer> {
  return dev.read(0, dev.size);
}

describe('migration switch-over', () => {
  it('a failed switch-over: held writes proceed on the source, the source takes writes as before, bitmaps removed', async () => {
    const rnd = prng(seed);
    const { src, dst, target } = await setup();
    try {
      const m = await Migration.start(src, target, { to: 'test' });
      await src.write(5 * MiB, Buffer.alloc(64 * 1024, 0x33));
      await quiet(m);
      target.flushFails = true;
      target.pauseFlush = target.flushes + 2; // the first flush is complete()'s, while still serving
      const model = await whole(src);
      const settled = { count: 0 };
      let held: Promise<PromiseSettledResult<void>[]> | null = null;
      let settledInPause = -1;
      target.inPause = () => (held = heldWrites(src, rnd, 20, model, settled));
      target.endOfPause = () => (settledInPause = settled.count);
      await expect(m.complete()).rejects.toThrow(/injected/);
      expect(settledInPause).toBe(0); // held, not answered, while the switch-over ran
      const results = await held!;
      expect(results.length).toBe(20);
      expect(results.filter((x) => x.status === 'rejected')).toEqual([]);
      expect(m.status().phase).toBe('failed');
      await src.write(0, Buffer.alloc(4096, 0x77)); // serving as before
      Buffer.alloc(4096, 0x77).copy(model, 0);
      expect((await whole(src)).equals(model)).toBe(true);
      expect(src.dirtyBitmaps!.hasBitmap(MIGRATE_BITMAP) || src.dirtyBitmaps!.hasBitmap(MIGRATE_FROZEN)).toBe(false);
      expect(migratedAway(src), 'a failed switch-over does not mark the source migrated away').toBe(false);
    } finally {
      await src.close();
      await dst.close();
    }
  });

  it('a successful switch-over: every write acknowledged before it is on the destination; held ones fail READ_ONLY', async () => {
    const rnd = prng(seed + 1);
    const { src, dst, target } = await setup();
    try {
      const m = await Migration.start(src, target, { to: 'test' });
      const before: Promise<void>[] = [];
      for (let i = 0; i < 50; i++) before.push(src.write(4096 * Math.floor(rnd() * 4000), Buffer.alloc(8192, i + 1)));
      await Promise.all(before);
      const model = await whole(src);
      await quiet(m);
      const flushesBefore = target.flushes;
      target.pauseFlush = flushesBefore + 2;
      const settled = { count: 0 };
      let heldP: Promise<PromiseSettledResult<void>[]> | null = null;
      let settledInPause = -1;
      target.inPause = () => (heldP = heldWrites(src, rnd, 10, Buffer.alloc(SIZE), settled));
      target.endOfPause = () => (settledInPause = settled.count);
      const completing = m.complete();
      await expect(m.cancel()).rejects.toMatchObject({ code: 'KSC_E_LOCKED' }); // one stop at a time
      await expect(m.complete()).rejects.toMatchObject({ code: 'KSC_E_LOCKED' });
      const s = await completing;
      expect(settledInPause).toBe(0);
      expect(target.flushes - flushesBefore).toBe(2);
      const held = await heldP!;
      expect(held.length).toBe(10);
      expect(s.phase).toBe('completed');
      expect(s.pauseMs).toBeGreaterThanOrEqual(50);
      expect(target.completed).toBe(true);
      for (const h of held) expect(h).toMatchObject({ status: 'rejected', reason: { code: 'KSC_E_READ_ONLY' } });
      await expect(src.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'KSC_E_READ_ONLY' });
      expect((await whole(dst)).equals(model)).toBe(true);
      expect((await whole(src)).equals(model)).toBe(true);
      expect(migratedAway(src), 'the source is marked migrated away (ksc_inc.md §4.1)').toBe(true);
    } finally {
      await src.close();
      await dst.close();
    }
  });
});

describe('migration rounds', () => {
  it("a round's frozen bits are dropped only after a destination FLUSH made its blocks durable (formats/migrate.md §10 rule 2)", async () => {
    const { src, dst, target } = await setup();
    // The destination's writes are volatile until its next FLUSH (a host that loses power loses them): count them.
    let unflushed = 0;
    const write = target.write.bind(target);
    const flush = target.flush.bind(target);
    target.write = async (o, d) => void (await write(o, d), unflushed++);
    target.flush = async () => {
      const before = unflushed;
      await flush();
      unflushed -= before;
    };
    const violations: number[] = [];
    const bitmaps = src.dirtyBitmaps!;
    const remove = bitmaps.removeBitmap.bind(bitmaps);
    bitmaps.removeBitmap = async (name: string) => {
      if (name === MIGRATE_FROZEN && unflushed > 0) violations.push(unflushed);
      return remove(name);
    };
    try {
      const m = await Migration.start(src, target, { to: 'test' });
      for (let i = 0; i < 6; i++) {
        await src.write((4 + i) * MiB, Buffer.alloc(64 * 1024, 0x50 + i));
        const rounds = m.status().rounds;
        for (let t = 0; t < 200 && m.status().rounds === rounds; t++) await new Promise((r) => setTimeout(r, 25));
      }
      expect(m.status().rounds).toBeGreaterThanOrEqual(3);
      await m.cancel();
      expect(violations, 'unflushed destination writes when the frozen bits were dropped').toEqual([]);
    } finally {
      await src.close();
      await dst.close();
    }
  }, 60_000);
});
