/**
 * Power-cut tests: an image runs in this process over the PowerCut file layer (test/helpers/powercut.ts),
 * with random I/O delays, doing random concurrent writes, write-zeroes, discards, flushes, bitmap clears
 * and close/reopen cycles, then a clean close.
 * Afterwards, for many random moments T of that run, the file a power cut at T would leave (synced data
 * kept, every unsynced write dropped, applied or torn at 512-byte sectors, in random order) is written to a
 * new path and opened with the normal opener. formats/ksc_inc.md §9 invariants are checked:
 *  - I1: it opens without error, fast, reading only metadata (not the data clusters);
 *  - I2: everything acknowledged before the last flush completed before T reads back intact;
 *  - I3: every other sector holds one of the states its block went through;
 *  - I4: each enabled bitmap has every bit of every change acknowledged since its last clear (and of every
 *    in-flight one that visibly landed); a disabled one none;
 *  - I5 and no damage: `checkImage(…, { verify: true })` finds no error (leaked space is allowed);
 * then the image is opened for writing (recovery), closed, and reopened: same content, bitmaps still supersets.
 *
 * KSC_SEED=<n> replays a run (the seed is printed; I/O timing is not replayed, so a race may need a few
 * tries); KSC_CASE=<i> runs only case i.
 */
import { rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { type DevOp, checkCrashContent, describeOp, firstDifference, markOp, openReadBound, owedBitmapProblems, provablyLanded, randomData } from '../helpers/model.js';
import { PowerCut, type Span, type StampedRun, contentAt, setupChanges, countingOpener, crashCheckProblems, issueOps, jitterOpener, stampedSpan } from '../helpers/powercut.js';
import { Rng, seededCases } from '../helpers/rng.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CASES = 12;
const CUTS_PER_CASE = 10;
// The bytes read on open (openReadBound) are the machine-independent check of I1; the time is measured in
// bench/ and here only catches a hang (500 and 1000 ms failed on a loaded 2-core CI machine).
const OPEN_TIME_LIMIT_MS = 10_000;

/** `initial`: the content when the PowerCut run started (durable: the image had been closed cleanly). */
interface Run extends StampedRun {
  path: string;
  /** Changes made before the run (bits the bitmaps still owe until a clear). */
  setupOps: DevOp[];
  clears: Span[];
  enabled: Map<string, number>; // name -> granularity
  disabled: string[];
}

async function setup(rng: Rng, dir: string): Promise<{ run: Run; summary: string }> {
  const blockSize = rng.pick([4 * KiB, 64 * KiB]);
  const size = rng.pick([2 * MiB, 3 * MiB + 12 * KiB, 4 * MiB]);
  const intentRegion = rng.pick([blockSize, 64 * KiB, 256 * KiB]);
  const baseKind = rng.pick(['none', 'raw', 'raw-short'] as const);
  const path = join(dir, 'top.ksc');
  const initial = Buffer.alloc(size);
  if (baseKind !== 'none') {
    const rawSize = baseKind === 'raw' ? size : size - rng.int(1, 2 * blockSize);
    const raw = Buffer.alloc(rawSize);
    for (let i = rng.int(2, 6); i > 0; i--) {
      const off = rng.int(0, rawSize - 1);
      randomData(rng, Math.min(rng.int(1, 256 * KiB), rawSize - off)).copy(raw, off);
    }
    writeFileSync(join(dir, 'base.raw'), raw);
    raw.copy(initial);
    await createImage(path, { size, blockSize, intentRegion, backing: join(dir, 'base.raw'), backingFormat: 'raw' });
  } else {
    await createImage(path, { size, blockSize, intentRegion });
  }
  const img = await openKsc(path, { write: true });
  // Sometimes no enabled bitmap: changes that only fill unallocated blocks then skip the intent log.
  const noBitmaps = rng.chance(0.3);
  const enabled = new Map<string, number>(
    noBitmaps
      ? []
      : [
          ['blk', blockSize],
          ['fine', 4 * KiB],
        ],
  );
  for (const [name, g] of enabled) await img.addBitmap(name, { granularity: g });
  await img.addBitmap('off', { enabled: false });
  const setupOps = await setupChanges(rng, img, initial, rng.int(3, 12), blockSize);
  await img.close();
  const run: Run = { path, size, blockSize, initial, setupOps, ops: [], flushes: [], clears: [], enabled, disabled: ['off'] };
  return { run, summary: `block ${blockSize}, size ${size}, intent region ${intentRegion}, base ${baseKind}${noBitmaps ? ', no enabled bitmap' : ''}` };
}

/** The workload, over the power-cut layer. Every event is stamped on the PowerCut clock. */
async function workload(rng: Rng, run: Run, pc: PowerCut): Promise<void> {
  let img = await openKsc(run.path, { write: true, opener: pc.opener });
  const batches = rng.int(15, 35);
  for (let b = 0; b < batches; b++) {
    const kind = rng.weighted({ ops: 8, flush: 2, clear: run.enabled.size > 0 ? 0.6 : 0, reopen: 0.6 });
    if (kind === 'reopen') {
      // A clean close (a flush too) and a new open: cuts land inside both.
      await stampedSpan(pc, run.flushes, () => img.close());
      img = await openKsc(run.path, { write: true, opener: pc.opener });
      continue;
    }
    if (kind === 'clear') {
      const name = rng.pick([...run.enabled.keys()]);
      await stampedSpan(pc, run.clears, () => img.clearBitmap(name), name);
      continue;
    }
    const jobs = kind === 'ops' ? issueOps(rng, run, pc, img, rng.int(1, 4)) : [];
    if (kind === 'flush' || rng.chance(0.25)) jobs.push(stampedSpan(pc, run.flushes, () => img.flush()));
    await Promise.all(jobs);
  }
  // A clean close is a flush too (§9 rule 7).
  await stampedSpan(pc, run.flushes, () => img.close());
}

/**
 * What the image must show after a cut at clock value T: the content as of the last flush completed
 * before T, the ops after it that may have landed, and per enabled bitmap the bits it owes: every change
 * acknowledged since its last clear started, plus every change still in flight at T that visibly landed
 * (`actual` decides; an in-flight op whose intent bits were not yet durable cannot have written anything).
 */
function expectations(run: Run, T: number): { base: Buffer; candidates: DevOp[]; lastFlush: number; required(actual: Buffer): Map<string, Uint8Array> } {
  const { base, candidates, lastFlush } = contentAt(run, T);
  const required = (actual: Buffer): Map<string, Uint8Array> => {
    const landed = provablyLanded(actual, base, candidates, run.blockSize);
    const out = new Map<string, Uint8Array>();
    for (const [name, g] of run.enabled) {
      let lastClear = -1;
      for (const c of run.clears) if (c.name === name && c.started < T && c.started > lastClear) lastClear = c.started;
      const bits = new Uint8Array(Math.ceil(run.size / g));
      if (lastClear < 0) for (const op of run.setupOps) markOp(bits, op, g);
      for (const ev of run.ops) {
        if (ev.issued < T && ev.issued > lastClear && (ev.acked < T || landed.has(ev.op))) markOp(bits, ev.op, g);
      }
      out.set(name, bits);
    }
    return out;
  };
  return { base, candidates, required, lastFlush };
}

async function verifyCut(run: Run, file: string, T: number): Promise<string[]> {
  const { base, candidates, required: owed, lastFlush } = expectations(run, T);
  let required = new Map<string, Uint8Array>();
  const problems: string[] = [];
  const counter = countingOpener();
  const t0 = performance.now();
  const ro = await openKsc(file, { opener: counter.opener });
  const openMs = performance.now() - t0;
  let actual: Buffer;
  try {
    const readOnOpen = counter.bytesRead.get(resolve(file)) ?? 0;
    const bound = openReadBound(ro);
    if (readOnOpen > bound) problems.push(`opening read ${readOnOpen} bytes of the image, more than the metadata bound ${bound} (I1)`);
    if (openMs > OPEN_TIME_LIMIT_MS) problems.push(`opening took ${openMs.toFixed(0)} ms (I1)`);
    actual = await ro.read(0, run.size);
    problems.push(...checkCrashContent(actual, base, candidates, run.blockSize));
    required = owed(actual);
    problems.push(...(await owedBitmapProblems(ro, run.enabled, run.disabled, required)));
  } finally {
    await ro.close();
  }
  // The metadata is whole (no record damaged, no cluster shared or overlapping metadata) and every
  // valid data checksum outside the intent regions matches (I5); leaked clusters are allowed.
  // A cut can tear the header write of an open or a close: that slot is damaged, the other one is current.
  // check reports it as corruption (issue 12 §3: the older slot may be stale) and --repair rewrites it,
  // which a cut may leave to do; every other error is a failure.
  problems.push(...(await crashCheckProblems(file)));
  if (problems.length)
    return problems
      .map((p) => `[read-only open] ${p}`)
      .concat(`(last completed flush started at ${lastFlush}; ${candidates.length} unflushed ops: ${candidates.slice(-6).map(describeOp).join(', ')})`);

  // Recovery by a writer, then a clean close: nothing may change, bitmaps stay supersets.
  for (const phase of ['read-write open (recovery)', 'reopen after clean close'] as const) {
    const img = await openKsc(file, { write: phase === 'read-write open (recovery)' });
    try {
      if (phase === 'reopen after clean close' && img.wasDirty) problems.push(`[${phase}] image still DIRTY`);
      const d = firstDifference(await img.read(0, run.size), actual);
      if (d) problems.push(`[${phase}] content changed: ${d}`);
      problems.push(...(await owedBitmapProblems(img, run.enabled, run.disabled, required)).map((p) => `[${phase}] ${p}`));
    } finally {
      await img.close();
    }
  }
  return problems;
}

describe('power cut: unsynced writes dropped, applied or torn', () => {
  seededCases('test/image/powercut.test.ts', CASES, 'kscinc-powercut-', async ({ rng, dir, index: i }) => {
    const { run: r, summary } = await setup(rng, dir);
    const pc = new PowerCut(jitterOpener(rng.fork()));
    await workload(rng, r, pc);
    const end = pc.clock + 1;
    // Spread the cuts over the run, plus one after the end (everything durable after the clean close).
    const cuts = [...Array.from({ length: CUTS_PER_CASE - 1 }, (_, k) => rng.int(1 + Math.floor((k * end) / (CUTS_PER_CASE - 1)), Math.floor(((k + 1) * end) / (CUTS_PER_CASE - 1)))), end];
    const stats = { durable: 0, dropped: 0, applied: 0, torn: 0 };
    for (const [k, T] of cuts.entries()) {
      const out = join(dir, `cut${k}.ksc`);
      const s = await pc.materialise(r.path, T, out, rng);
      for (const key of Object.keys(stats) as (keyof typeof stats)[]) stats[key] += s[key];
      const problems = await verifyCut(r, out, T);
      if (problems.length) throw new Error(`cut at clock ${T} of ${end} (${JSON.stringify(s)}):\n  ${problems.join('\n  ')}`);
      rmSync(out);
    }
    const rec = pc.recorded(r.path);
    console.log(
      `[powercut] case ${i}: ${summary}; ${r.ops.length} ops, ${r.flushes.length} flushes, ${r.clears.length} clears; ${rec.changes} host writes, ${rec.syncs} syncs; cuts at ${cuts.join(',')}; unsynced writes dropped ${stats.dropped}, applied ${stats.applied}, torn ${stats.torn}`,
    );
    expect(stats.dropped + stats.applied + stats.torn).toBeGreaterThan(0);
  });
});
