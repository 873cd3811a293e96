/**
 * The backup's bitmap handover on a ksc_inc image (formats/repository.md §10; formats/ksc_inc.md §9 rule 6)
 * cut at EVERY moment: the freeze (the bits move to `NAME~frozen`, NAME starts empty) and the commit (the
 * new token record added, the old one and the frozen bitmap dropped), run by the engine's own Handover over
 * the PowerCut file layer (test/helpers/powercut.ts) while writes go on, before, during and after each.
 *
 * For every clock value T from just before the freeze to just after the commit, and some before and after,
 * the file a cut at T leaves is built twice at random (each unsynced write dropped, applied or torn at
 * 512-byte sectors) and once as a kill would leave it (every write issued so far applied: the page cache
 * survives), and:
 *  - the content is what the writes allow (every write acknowledged before the last completed flush intact,
 *    every other sector in one of the states its block went through), and `check --verify` finds no error;
 *  - what the next backup makes of the image (Handover.plan, which merges a frozen bitmap back first) is
 *    safe: incremental from the OLD token only with NAME holding every change since that backup (the bits
 *    set before the run and every write of the run that was acknowledged or visibly landed), from the NEW
 *    token only with NAME holding every such write issued after the freeze began, and a full backup
 *    (several tokens) only for a cut inside the commit; never the frozen bitmap left over, never no token;
 *  - after that plan and a clean close, `check --verify` is clean and the image reopens with the same bits.
 *
 * KSC_SEED=<n> replays a run (the seed is printed; I/O timing is not replayed); KSC_CASE=<i> runs case i.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { Handover } from '../../src/engines/backup/handover.js';
import { frozenBitmapName, tokenBitmapsOf } from '../../src/engines/backup/bitmap-names.js';
import { createImage, openKsc } from '../../src/index.js';
import type { KscImage } from '../../src/image/ksc.js';
import { type DevOp, bitsMissing, checkCrashContent, extentsToBits, markOp, provablyLanded } from '../helpers/model.js';
import { PowerCut, type Span, type StampedRun, contentAt, setupChanges, crashCheckProblems, issueOps, jitterOpener, stampedSpan } from '../helpers/powercut.js';
import { Rng, seededCases } from '../helpers/rng.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CASES = 4;
const NAME = 'backup';
/** Random cuts per clock value inside the handover's steps (plus one as a kill leaves the file). */
const RANDOM_CUTS = 2;

interface Run extends StampedRun {
  path: string;
  /** Changes after the OLD backup and before the run: NAME owes them until a backup counts from NEW. */
  setupOps: DevOp[];
  oldToken: string;
  newToken: string;
  freeze: Span;
  commit: Span;
}

/** Every change is applied (none dropped, none torn), in issue order: what a kill leaves on the disk. */
const KILL = { shuffle: <T>(x: T[]): T[] => x, int: (): number => 1, chance: (): boolean => true } as unknown as Rng;

async function setup(rng: Rng, dir: string): Promise<{ run: Run; summary: string }> {
  const blockSize = rng.pick([4 * KiB, 64 * KiB]);
  const size = rng.pick([2 * MiB, 3 * MiB + 12 * KiB]);
  const path = join(dir, 'img.ksc');
  await createImage(path, { size, blockSize, intentRegion: rng.pick([blockSize, 64 * KiB]) });
  const img = await openKsc(path, { write: true });
  // An earlier backup through NAME: its token record, NAME emptied by its handover.
  const first = new Handover(img, false, NAME);
  expect((await first.plan(blockSize, false)).fullReason).not.toBeNull();
  await img.quiesce(() => first.freeze());
  await first.commit();
  // Another enabled bitmap must not be disturbed by the handover's slot changes.
  const other = rng.chance(0.5);
  if (other) await img.addBitmap('other', { granularity: 4 * KiB });
  const initial = Buffer.alloc(size);
  const setupOps = await setupChanges(rng, img, initial, rng.int(2, 8), blockSize);
  await img.close();
  const run: Run = {
    path,
    size,
    blockSize,
    initial,
    setupOps,
    ops: [],
    flushes: [],
    oldToken: first.newToken!,
    newToken: '',
    freeze: { started: Infinity, done: Infinity },
    commit: { started: Infinity, done: Infinity },
  };
  return { run, summary: `block ${blockSize}, size ${size}${other ? ', another bitmap' : ''}, ${setupOps.length} changes since the last backup` };
}

/** A batch of 0–3 concurrent changes on distinct blocks (not in `taken`), stamped. */
function batch(rng: Rng, run: Run, pc: PowerCut, img: KscImage, taken: Set<number>): Promise<void>[] {
  return issueOps(rng, run, pc, img, rng.int(0, 3), taken);
}

async function changes(rng: Rng, run: Run, pc: PowerCut, img: KscImage, rounds: number): Promise<void> {
  for (let r = 0; r < rounds; r++) {
    const jobs = batch(rng, run, pc, img, new Set());
    if (rng.chance(0.3)) jobs.push(stampedSpan(pc, run.flushes, () => img.flush()));
    await Promise.all(jobs);
  }
}

/** The backup's handover as backupDevice runs it (the repository side left out), with writes going on. */
async function workload(rng: Rng, run: Run, pc: PowerCut): Promise<void> {
  const img = await openKsc(run.path, { write: true, opener: pc.opener });
  const h = new Handover(img, false, NAME);
  run.newToken = h.newToken!;
  const plan = await h.plan(run.blockSize, false);
  expect(plan).toEqual({ token: run.oldToken, fullReason: null });
  await changes(rng, run, pc, img, rng.int(0, 3));

  // The freeze, inside the image's quiesce (changes in flight finish first, new ones wait).
  let taken = new Set<number>();
  let jobs = batch(rng, run, pc, img, taken);
  run.freeze.started = pc.tick();
  const freeze = img.quiesce(() => h.freeze()).then(() => void (run.freeze.done = pc.tick()));
  jobs.push(...batch(rng, run, pc, img, taken), freeze);
  await Promise.all(jobs);

  // The backup reads and commits meanwhile; then §10 step 3 with changes beside it.
  await changes(rng, run, pc, img, rng.int(1, 3));
  taken = new Set<number>();
  jobs = batch(rng, run, pc, img, taken);
  run.commit.started = pc.tick();
  const commit = h.commit().then(() => void (run.commit.done = pc.tick()));
  jobs.push(...batch(rng, run, pc, img, taken), commit);
  await Promise.all(jobs);
  await changes(rng, run, pc, img, rng.int(0, 2));

  await stampedSpan(pc, run.flushes, () => img.close());
}

/** The bits NAME must hold when the next backup counts from `token`, for a cut at T. */
function owed(run: Run, T: number, token: string, landed: Set<DevOp>): Uint8Array {
  const g = run.blockSize;
  const bits = new Uint8Array(Math.ceil(run.size / g));
  const fromOld = token === run.oldToken;
  if (fromOld) for (const op of run.setupOps) markOp(bits, op, g);
  for (const ev of run.ops) {
    if (ev.issued >= T || !(ev.acked < T || landed.has(ev.op))) continue;
    if (fromOld || ev.issued > run.freeze.started) markOp(bits, ev.op, g);
  }
  return bits;
}

async function bitsOf(img: KscImage, run: Run): Promise<{ bits: Uint8Array; problems: string[] }> {
  return extentsToBits(await img.bitmapExtents(NAME), run.blockSize, run.size);
}

async function verifyCut(run: Run, file: string, T: number): Promise<string[]> {
  const problems: string[] = [];
  const { base, candidates } = contentAt(run, T);
  const ro = await openKsc(file);
  let actual: Buffer;
  try {
    actual = await ro.read(0, run.size);
  } finally {
    await ro.close();
  }
  problems.push(...checkCrashContent(actual, base, candidates, run.blockSize));
  problems.push(...(await crashCheckProblems(file)));
  if (problems.length) return problems;

  // What the next backup makes of it.
  const landed = provablyLanded(actual, base, candidates, run.blockSize);
  const img = await openKsc(file, { write: true });
  let bits: Uint8Array;
  try {
    const plan = await new Handover(img, false, NAME).plan(run.blockSize, false);
    const names = img.bitmapNames();
    if (names.includes(frozenBitmapName(NAME))) problems.push('the frozen bitmap is still there after the plan');
    const info = img.bitmapInfo(NAME);
    if (!info?.enabled || !info.consistent) problems.push(`bitmap ${NAME}: ${JSON.stringify(info)}`);
    const tokens = tokenBitmapsOf(names, NAME);
    const got = await bitsOf(img, run);
    problems.push(...got.problems);
    bits = got.bits;
    if (plan.fullReason !== null) {
      // Only the commit may leave two token records (then the next backup is full); never none.
      if (tokens.length !== 2 || !(T > run.commit.started && T <= run.commit.done)) problems.push(`a full backup at a cut outside the commit (${plan.fullReason}); token records ${tokens.join(', ')}`);
    } else if (plan.token === run.oldToken) {
      if (T > run.commit.done) problems.push('the OLD token is the reference after the commit completed');
      const miss = bitsMissing(owed(run, T, run.oldToken, landed), bits, run.blockSize);
      if (miss) problems.push(`counting from the OLD backup, ${NAME} lacks ${miss}`);
    } else if (plan.token === run.newToken) {
      if (T <= run.commit.started) problems.push('the NEW token is the reference before the commit started');
      const miss = bitsMissing(owed(run, T, run.newToken, landed), bits, run.blockSize);
      if (miss) problems.push(`counting from the NEW backup, ${NAME} lacks ${miss}`);
    } else problems.push(`plan ${JSON.stringify(plan)}: neither token`);
    if (img.bitmapNames().some((n) => n !== NAME && n !== 'other' && !tokens.includes(n))) problems.push(`bitmaps ${img.bitmapNames().join(', ')}`);
  } finally {
    await img.close();
  }
  const after = await checkImage(file, { verify: true });
  if (!after.ok) problems.push(...after.errors.map((e) => `check after the plan and a clean close: ${e}`));
  const again = await openKsc(file);
  try {
    const miss = bitsMissing(bits, (await bitsOf(again, run)).bits, run.blockSize);
    if (miss) problems.push(`after a clean close ${NAME} lost ${miss}`);
    if (again.wasDirty) problems.push('still DIRTY after a clean close');
  } finally {
    await again.close();
  }
  return problems;
}

describe('the backup handover (freeze, commit) cut at every moment', { timeout: 600_000 }, () => {
  seededCases('test/image/powercut-handover.test.ts', CASES, 'kscinc-powercut-handover-', async ({ rng, dir, index }) => {
    const { run, summary } = await setup(rng, dir);
    const pc = new PowerCut(jitterOpener(rng.fork()));
    await workload(rng, run, pc);
    const end = pc.clock + 1;
    const every = new Set<number>();
    for (const s of [run.freeze, run.commit]) for (let t = s.started; t <= s.done + 1; t++) every.add(t);
    // And a few cuts elsewhere (before the freeze, between, after the commit).
    const others = new Set<number>([1, end]);
    for (let k = 0; k < 6; k++) others.add(rng.int(1, end));
    const plans = { total: 0, random: 0 };
    for (const T of [...new Set([...every, ...others])].sort((a, b) => a - b)) {
      const modes: (Rng | null)[] = [null, ...(every.has(T) ? Array.from({ length: RANDOM_CUTS }, () => rng) : [rng])];
      for (const [k, mode] of modes.entries()) {
        const out = join(dir, `cut-${T}-${k}.ksc`);
        const s = await pc.materialise(run.path, T, out, mode ?? KILL);
        const problems = await verifyCut(run, out, T);
        if (problems.length)
          throw new Error(
            `cut at clock ${T} of ${end} (${mode ? 'random' : 'kill'}: ${JSON.stringify(s)}; freeze ${run.freeze.started}–${run.freeze.done}, commit ${run.commit.started}–${run.commit.done}):\n  ${problems.join('\n  ')}`,
          );
        rmSync(out);
        plans.total++;
        if (mode) plans.random++;
      }
    }
    const rec = pc.recorded(run.path);
    console.log(
      `[powercut-handover] case ${index}: ${summary}; ${run.ops.length} writes; freeze ${run.freeze.started}–${run.freeze.done}, commit ${run.commit.started}–${run.commit.done} of ${end}; ${rec.changes} host writes, ${rec.syncs} syncs; ${plans.total} cuts (${plans.random} random)`,
    );
    expect(every.size).toBeGreaterThan(10);
  });
});
