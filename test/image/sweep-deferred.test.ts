/**
 * The deferred leak sweep (formats/ksc_inc.md §8.1, "Deferred sweep"): a writer opened after a crash serves
 * and changes the image while the sweep scans it in the background. The sweep is paused before each of its
 * steps (the bitmap scan, each map page, the hand-over of its result) and, there, writers allocate, overwrite,
 * discard (freeing clusters referenced at the open, which flushes then reuse), and clear and merge bitmaps
 * (releasing their old tables). Then: no two DATA blocks share a cluster, no free cluster is referenced or
 * listed twice, the data is the model's, `check --verify` finds nothing and no leak is left after a clean
 * close. The same run is also stopped after every write, punch and sync of the process (src/io/fault.ts,
 * "throw": the files are as a SIGKILL there leaves them) and reopened: every flushed write reads back, every
 * block reads a content it was given, and `check --verify` is clean.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { faultFired, setFaultPlan } from '../../src/io/fault.js';
import { coreOf, type KscImage } from '../../src/image/ksc/image.js';
import { setSweepStepHook } from '../../src/image/sweep.js';
import { tempDir } from '../helpers/tmp.js';

const B = 4096;
const PAGE_BLOCKS = 4096; // map entries per map page
const PAGES = 3;
const SIZE = PAGES * PAGE_BLOCKS * B;
/** Blocks written before the crash: a few in each map page. */
const AT_OPEN = [0, 1, 2, 3, 5, 8, 4096, 4097, 4100, 8192, 8193, 8200, 12000];

function content(tag: number, block: number): Buffer {
  const buf = Buffer.alloc(B);
  for (let o = 0; o < B; o += 4) buf.writeUInt32LE((tag * 0x1000193 + block * 0x9e3779b1 + o) >>> 0, o);
  return buf;
}

/**
 * Per block: the contents it may read after a crash. A flush makes durable what was acknowledged before it
 * started (§9 rule 8): only those states are dropped by it, whatever writers race it.
 */
class Model {
  readonly states = new Map<number, { data: Buffer; acked: number }[]>();
  private clock = 0;
  /** A change issued: its content becomes possible. Call the returned function when it is acknowledged. */
  set(block: number, data: Buffer): () => void {
    const s = this.states.get(block) ?? [{ data: Buffer.alloc(B), acked: 0 }];
    const st = { data, acked: Infinity };
    s.push(st);
    this.states.set(block, s);
    return () => (st.acked = ++this.clock);
  }
  /** Runs a flush: the last state of each block acknowledged before it started is the oldest possible one. */
  async flush(k: KscImage): Promise<void> {
    const started = this.clock;
    await k.flush();
    for (const [b, s] of this.states) {
      let i = s.length - 1;
      while (i > 0 && !(s[i]!.acked <= started)) i--;
      this.states.set(b, s.slice(i));
    }
  }
  possible(block: number): Buffer[] {
    return (this.states.get(block) ?? [{ data: Buffer.alloc(B), acked: 0 }]).map((x) => x.data);
  }
}

/** An image that crashed with leaked clusters: freed by a flushed discard, and written but never flushed. */
async function setupCrashed(dir: string, model: Model): Promise<string> {
  const img = join(dir, 'img.ksc');
  await createImage(img, { size: SIZE, blockSize: B, intentRegion: 16 * B });
  const k = await openKsc(img, { write: true });
  await k.addBitmap('b1');
  await k.addBitmap('b2');
  for (const b of AT_OPEN) {
    const ack = model.set(b, content(1, b));
    await k.write(b * B, content(1, b));
    ack();
  }
  await k.write(20 * B, Buffer.concat([content(1, 20), content(1, 21)]));
  await k.flush();
  await k.discard(20 * B, 2 * B); // freed: leaked by the crash
  await model.flush(k);
  await k.write(9000 * B, content(9, 9000)); // allocated, never referenced durably: leaked (reads as zeros)
  await coreOf(k).file.close(); // the crash: no close, the lock goes with the handle
  return img;
}

/** What writers do while the sweep is paused: each kind of allocation and release, with flushes. */
async function writers(k: KscImage, model: Model, tag: number): Promise<void> {
  const change = async (b: number, data: Buffer[], op: () => Promise<void>): Promise<void> => {
    const acks = data.map((d, i) => model.set(b + i, d));
    await op();
    for (const a of acks) a();
  };
  const w = (b: number, n = 1): Promise<void> => {
    const bufs = Array.from({ length: n }, (_, i) => content(tag, b + i));
    return change(b, bufs, () => k.write(b * B, Buffer.concat(bufs)));
  };
  const zeros = (n: number): Buffer[] => Array.from({ length: n }, () => Buffer.alloc(B));
  await w(1); // overwrite in place
  await change(2, zeros(2), () => k.discard(2 * B, 2 * B)); // unlinks clusters referenced at the open
  await change(4096, zeros(1), () => k.discard(4096 * B, B));
  await model.flush(k); // their clusters become free: reused below
  await w(4200 + tag * 4, 4); // new blocks: the freed clusters, then the end of the file
  await k.clearBitmap('b2'); // releases b2's old table and pages
  await k.mergeBitmap('b1', 'b2');
  await w(8300 + tag * 4, 2);
  await model.flush(k);
}

/** No cluster is both free and referenced, none is listed free twice, no two blocks share one. */
async function expectOwnership(k: KscImage, where: string): Promise<void> {
  const owner = new Map<number, number>();
  for await (const b of k.allocatedBlocks()) {
    if (b.state !== 2) continue;
    expect(owner.has(b.host), `${where}: blocks ${owner.get(b.host)} and ${b.block} share cluster 0x${b.host.toString(16)}`).toBe(false);
    owner.set(b.host, b.block);
  }
  const free = new Set<number>();
  for (const r of coreOf(k).alloc.freeRuns()) {
    for (let i = 0; i < r.count; i++) {
      const o = r.offset + i * B;
      expect(free.has(o), `${where}: cluster 0x${o.toString(16)} free twice`).toBe(false);
      expect(owner.has(o), `${where}: free cluster 0x${o.toString(16)} is block ${owner.get(o)}'s`).toBe(false);
      free.add(o);
    }
  }
}

async function expectContent(img: string, model: Model, where: string, exact: boolean): Promise<void> {
  const k = await openKsc(img);
  try {
    for (const b of [...model.states.keys(), 9000]) {
      const states = model.possible(b);
      const got = await k.read(b * B, B);
      const ok = exact ? got.equals(states[states.length - 1]!) : states.some((s) => s.equals(got));
      expect(ok, `${where}: block ${b} reads none of its ${exact ? 'final' : 'allowed'} contents`).toBe(true);
    }
  } finally {
    await k.close();
  }
  const r = await checkImage(img, { verify: true });
  expect(r.errors, `${where}: check --verify`).toEqual([]);
}

/** Pauses the sweep before its step number `at` and runs `during` there; returns the number of steps. */
function pauseAt(at: number, during: () => Promise<void>): { steps: () => number; reached: () => boolean } {
  let n = 0;
  let reached = false;
  setSweepStepHook(async () => {
    if (n++ === at) {
      reached = true;
      await during();
    }
  });
  return { steps: () => n, reached: () => reached };
}

/** One run: open deferred, writers at sweep step `at` (awaited there, or racing the rest of the sweep). */
async function run(img: string, model: Model, at: number, racing: boolean, held: { k: KscImage | null }): Promise<{ steps: number; reached: boolean; k: KscImage }> {
  let racers: Promise<void> | null = null;
  const p = pauseAt(at, async () => {
    if (racing) {
      racers = writers(held.k!, model, 2);
      racers.catch(() => undefined); // awaited below; a fault must not be an unhandled rejection meanwhile
    } else await writers(held.k!, model, 2);
  });
  try {
    const k = (held.k = await openKsc(img, { write: true, deferSweep: true }));
    expect(k.sweep, 'the sweep has not run when open returns').toBeNull();
    await writers(k, model, 3); // before the sweep has read anything, as a guest right after a restart
    await k.swept();
    if (racers) await racers;
    await expectOwnership(k, `step ${at}, after the sweep`);
    await writers(k, model, 4); // the swept clusters are reused now
    return { steps: p.steps(), reached: p.reached(), k };
  } finally {
    setSweepStepHook(null);
  }
}

describe('deferred leak sweep (§8.1)', () => {
  it('writers paused or racing at every step of the sweep: no shared cluster, the data is the model', async () => {
    const probe = await run(await setupCrashed(tempDir('kscinc-sweep-'), new Model()), new Model(), -1, false, { k: null });
    await probe.k.close();
    const steps = probe.steps;
    expect(steps).toBe(PAGES + 2); // bitmaps, each map page, the hand-over
    for (let at = 0; at < steps; at++) {
      for (const racing of [false, true]) {
        const where = `paused before step ${at}${racing ? ', writers racing' : ''}`;
        const model = new Model();
        const img = await setupCrashed(tempDir('kscinc-sweep-'), model);
        const r = await run(img, model, at, racing, { k: null });
        expect(r.reached, where).toBe(true);
        const sweep = r.k.sweep!;
        expect(sweep.skipped, where).toBeNull();
        // Leaked: the two discarded clusters (the unflushed write took one of them) and the unflushed one.
        expect(sweep.reclaimed, where).toBeGreaterThanOrEqual(2);
        await expectOwnership(r.k, where);
        await r.k.close();
        await expectContent(img, model, where, true);
        expect((await checkImage(img)).leakedBytes, `${where}: leaks after a clean close`).toBe(0);
      }
    }
  }, 120_000);

  it('stopped after every write, punch and sync of the writers and the sweep: flushed writes intact, check clean', async () => {
    let completedAt = -1;
    for (let n = 0; n < 600 && completedAt < 0; n++) {
      const model = new Model();
      const img = await setupCrashed(tempDir('kscinc-sweep-kill-'), model);
      const where = `stopped after step ${n}`;
      setFaultPlan({ after: n, action: 'throw' });
      const held: { k: KscImage | null } = { k: null };
      try {
        await (await run(img, model, n % (PAGES + 2), n % 2 === 1, held)).k.close();
        if (!faultFired()) completedAt = n;
      } catch (e) {
        if (!faultFired()) throw e;
      } finally {
        setFaultPlan(null);
        setSweepStepHook(null);
      }
      if (completedAt < 0) {
        if (held.k) {
          await held.k.swept(); // the sweep ends (failed steps) before the handle goes
          await coreOf(held.k)
            .file.close()
            .catch(() => undefined);
        }
        // Whatever the run's objects hold, the file holds steps 1 … n: reopen (the sweep at open) and check.
        await expectContent(img, model, where, false);
        const w = await openKsc(img, { write: true });
        await expectOwnership(w, `${where}, reopened`);
        await w.close();
      } else await expectContent(img, model, where, true);
    }
    expect(completedAt, 'the run completed within the bound').toBeGreaterThan(20);
  }, 300_000);
  it('a handover while the sweep runs hands nothing of it over; the next writer continues, check stays clean', async () => {
    const model = new Model();
    const img = await setupCrashed(tempDir('kscinc-sweep-handover-'), model);
    let release!: () => void;
    const paused = new Promise<void>((r) => (release = r));
    let reached!: () => void;
    const atStep = new Promise<void>((r) => (reached = r));
    let n = 0;
    setSweepStepHook(async () => {
      if (n++ === 1) {
        reached();
        await paused;
      }
    });
    try {
      const a = await openKsc(img, { write: true, deferSweep: true });
      await writers(a, model, 2);
      await atStep; // the sweep has scanned the bitmaps and waits before the first map page
      const rec = await a.handOver();
      release();
      const sweep = await a.swept();
      expect(sweep?.reclaimed ?? 0, JSON.stringify(sweep)).toBe(0);
      expect(rec).not.toBeNull();
      const b = await openKsc(img, { write: true, handover: rec!, deferSweep: true });
      expect(b.sweep, 'the next writer continues the session: no sweep').toBeNull();
      await writers(b, model, 3);
      await expectOwnership(b, 'after the handover');
      await b.close();
    } finally {
      setSweepStepHook(null);
    }
    await expectContent(img, model, 'after the handover', true);
    // The crashed session's leaks are still there (a later crash's sweep or check --repair reclaims them).
    expect((await checkImage(img)).leakedBytes).toBeGreaterThan(0);
  });
});
