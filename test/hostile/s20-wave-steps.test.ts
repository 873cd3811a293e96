/**
 * Hostile, on session 19's span writes of a new block's later waves (src/image/ksc/partial.ts submitWave:
 * HostFile.writeWithCrcs(blk, host, B, lo, hi), the whole block's CRC-32 with only [lo, hi) written). Rounds of
 * small pieces issued at once (as NBD pipelines them) into a few new blocks, overlapping one another, with
 * write-zeroes, discards and flushes of the same blocks in the same batches, so that pieces queue behind a
 * wave and a flush's map snapshot falls between waves. The session is stopped after EVERY step (the fault
 * layer's throw: the file holds steps 1 … N, as after a SIGKILL there); then a writer's reopen and close,
 * `check --verify` clean, and every sector reads a state the model allows: the content as of the last flush
 * that followed every op before it, or a state after the later ops in issue order (test/helpers/model.ts
 * checkCrashContent). Unstopped, the content equals the model exactly.
 */
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { faultFired, setFaultPlan } from '../../src/io/fault.js';
import { clearFaultsAfterAll } from '../helpers/fault-runs.js';
import { type DevOp, applyOp, checkCrashContent, describeOp, runOp } from '../helpers/model.js';
import { readAll } from '../helpers/read-all.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

clearFaultsAfterAll();

const KiB = 1024;
const B = 64 * KiB;
const SIZE = 16 * B;
const ROUNDS = 8;
const MAX_STEPS = 600;

type Item = DevOp | { kind: 'flush' };

/** `p`, with a handler from the start: one may fail while the batch still waits for a later turn. */
function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(() => undefined);
  return p;
}

/** A batch of pieces into 2–3 blocks (new ones first), with a zero, a discard or a flush among them at times. */
function workload(rng: Rng): Item[][] {
  const rounds: Item[][] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const blocks = [rng.int(0, 15), rng.int(0, 15), rng.int(0, 15)];
    const batch: Item[] = [];
    const n = rng.int(4, 14);
    for (let i = 0; i < n; i++) {
      const b = blocks[rng.int(0, blocks.length - 1)]!;
      const kind = rng.weighted({ write: 10, zero: 1, discard: 1, flush: 1 });
      if (kind === 'flush') {
        batch.push({ kind: 'flush' });
        continue;
      }
      const len = rng.chance(0.2) ? rng.int(1, 4) * 4 * KiB : rng.int(1, 6 * KiB);
      const offset = b * B + rng.int(0, B - len);
      if (kind === 'write') batch.push({ kind, offset, data: rng.bytes(len) });
      else if (kind === 'zero') batch.push({ kind, offset, length: len, mayTrim: rng.chance(0.5) });
      else batch.push({ kind, offset, length: len });
    }
    rounds.push(batch);
  }
  return rounds;
}

it("a new block's waves stopped after every step: check clean, every sector a state the model allows", async () => {
  const seed = seedFor('test/hostile/s20-wave-steps.test.ts');
  const rng = new Rng(seed);
  const rounds = workload(rng);
  const gaps = rounds.map((b) => b.map(() => (rng.chance(0.5) ? 0 : rng.int(1, 3))));
  const problems: string[] = [];
  let completed = false;
  for (let n = 0; n < MAX_STEPS && !completed; n++) {
    const dir = tempDir('kscinc-scratch-');
    const path = join(dir, 'img.ksc');
    await createImage(path, { size: SIZE, blockSize: B });
    // The model: `base` the content as of the last flush that every earlier op had settled before; `later`
    // the ops issued since (in issue order), each of which may or may not have landed.
    const model = Buffer.alloc(SIZE);
    let base = Buffer.from(model);
    let later: DevOp[] = [];
    setFaultPlan({ after: n, action: 'throw' });
    try {
      const img = await openKsc(path, { write: true });
      try {
        for (const [r, batch] of rounds.entries()) {
          const turns = gaps[r]!;
          const jobs: Promise<unknown>[] = [];
          for (const [k, item] of batch.entries()) {
            // Some pieces in a later turn of the event loop than the one before: they queue behind the wave
            // being written (a later wave) instead of joining the first one.
            if (k > 0 && turns[k]! > 0) for (let t = 0; t < turns[k]!; t++) await new Promise((r) => setImmediate(r));
            if (item.kind === 'flush') {
              jobs.push(handled(img.flush()));
              continue;
            }
            later.push(item);
            applyOp(model, item, B);
            jobs.push(handled(runOp(img, item)));
          }
          const settled = await Promise.allSettled(jobs);
          const failed = settled.find((s) => s.status === 'rejected');
          if (failed) throw (failed as PromiseRejectedResult).reason;
          await img.flush();
          base = Buffer.from(model);
          later = [];
        }
      } finally {
        await img.close().catch(() => undefined);
      }
      completed = !faultFired();
    } catch (e) {
      if (!faultFired()) throw e;
    } finally {
      setFaultPlan(null);
    }
    const w = await openKsc(path, { write: true });
    await w.close();
    const report = await checkImage(path, { verify: true });
    if (report.errors.length) problems.push(`stopped after step ${n}: check --verify: ${report.errors.join('; ')}`);
    const got = await readAll(path);
    if (completed) {
      if (!got.equals(model)) problems.push(`unstopped (${n} steps): the content differs from the model`);
    } else {
      for (const p of checkCrashContent(got, base, later, B, 2)) problems.push(`stopped after step ${n} (unflushed: ${later.map(describeOp).join(', ')}): ${p}`);
    }
    if (problems.length >= 4) break;
  }
  expect(completed || problems.length > 0, `the workload completed within ${MAX_STEPS} steps`).toBe(true);
  expect(problems, `seed ${seed}`).toEqual([]);
}, 600_000);
