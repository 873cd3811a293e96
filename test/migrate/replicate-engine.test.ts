/**
 * The replication cycle's fence (formats/migrate.md §11.2 step 4, rule 1), in process: a ksc_inc image
 * written all along by a writer (one write at a time, each stamped), replicated to a slow in-memory target
 * (one request in flight, 10 ms per request), so that the fence's last granules are read over a long
 * window. After each cycle the target must be the image after exactly k writes; a fence that did not hold
 * the writes would let later writes into granules read late (this test failed with the hold removed).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/index.js';
import type { BlockDevice } from '../../src/image/types.js';
import type { MigrationTarget } from '../../src/engines/migrate-send.js';
import { Replication } from '../../src/engines/replicate.js';
import { tempDir } from '../helpers/tmp.js';
import { prng } from './helpers.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
/** The writes land in the first HOT bytes: what is dirty stays about the fence goal (1 MiB), sent over ~160 ms. */
const HOT = MiB;
const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`replicate-engine.test seed ${seed}`);

/** An in-memory destination that answers each request after `delayMs`, one at a time. */
class SlowTarget implements MigrationTarget {
  readonly maxPayload = 64 * 1024;
  readonly parallelism = 1;
  readonly incoming = null;
  readonly data = Buffer.alloc(SIZE);
  constructor(private readonly delayMs: number) {}
  get size(): number {
    return SIZE;
  }
  private wait = (): Promise<void> => new Promise((r) => setTimeout(r, this.delayMs));
  async write(offset: number, data: Buffer): Promise<void> {
    await this.wait();
    data.copy(this.data, offset);
  }
  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.wait();
    this.data.fill(0, offset, offset + length);
  }
  flush = (): Promise<void> => this.wait();
  complete = (): Promise<void> => Promise.resolve();
  close = (): Promise<void> => Promise.resolve();
  destroy = (): void => undefined;
}

interface Logged {
  off: number;
  data: Buffer;
}

/** Writes stamped 4–16 KiB pieces through the device (the change gate holds them in a fence), logging each acknowledged one. */
function startWriter(dev: BlockDevice, rnd: () => number): { log: Logged[]; stop: () => Promise<void> } {
  const log: Logged[] = [];
  let stopping = false;
  const done = (async () => {
    for (let seq = 0; !stopping; seq++) {
      const len = 4096 * (1 + Math.floor(rnd() * 4));
      const off = 4096 * Math.floor((rnd() * (HOT - len)) / 4096);
      const data = Buffer.alloc(len, 1 + Math.floor(rnd() * 255));
      data.writeUInt32BE(seq, 0);
      await dev.write(off, data);
      log.push({ off, data });
      await new Promise((r) => setTimeout(r, 1));
    }
  })();
  return {
    log,
    stop: async () => {
      stopping = true;
      await done;
    },
  };
}

/** The k such that `got` is the image after exactly the first k writes (one past the last write fully visible), or -1. */
function prefixOf(log: Logged[], got: Buffer): number {
  let k = 0;
  for (let i = log.length - 1; i >= 0 && k === 0; i--) if (got.subarray(log[i]!.off, log[i]!.off + log[i]!.data.length).equals(log[i]!.data)) k = i + 1;
  const want = Buffer.alloc(SIZE);
  for (let i = 0; i < k; i++) log[i]!.data.copy(want, log[i]!.off);
  return want.equals(got) ? k : -1;
}

describe('replication fence (engine)', () => {
  it('each cycle leaves the target equal to the image after exactly k writes', async () => {
    const dir = tempDir('kscinc-replicate-engine-');
    await createImage(join(dir, 'vm.ksc'), { size: SIZE });
    const dev = await openImage(join(dir, 'vm.ksc'), { write: true });
    const target = new SlowTarget(10);
    const w = startWriter(dev, prng(seed));
    try {
      for (let cycle = 1; cycle <= 3; cycle++) {
        await new Promise((r) => setTimeout(r, 300));
        const before = w.log.length;
        const s = await Replication.once(dev, { to: 'memory', connect: () => Promise.resolve(target) });
        const after = w.log.length;
        const k = prefixOf(w.log, target.data);
        console.log(
          `engine cycle ${cycle}: ${s.lastCycle!.bytesSent} bytes, ${s.lastCycle!.rounds} round(s), fence ${s.lastCycle!.fenceMs} ms; target = image after ${k} writes (${before}..${after})`,
        );
        expect(k, 'the target is the image after no prefix of the writes').toBeGreaterThanOrEqual(0);
        expect(k).toBeGreaterThanOrEqual(before);
        expect(k).toBeLessThanOrEqual(after);
      }
    } finally {
      await w.stop();
      await dev.close();
    }
  });
});
