/**
 * Storms under a PowerCut (test/helpers/powercut.ts), cut afterwards (test/hostile/alloc-now-powercut.test.ts,
 * test/hostile/partial-groups.test.ts): rounds of requests issued at once, each block's versions and the
 * flushes recorded on the cut's clock, then `cutLoop`: the image after a power cut at many clock values,
 * each checked against what the user had been told by then.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { expect } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { type PowerCut, crashCheckErrors } from './powercut.js';
import type { Rng } from './rng.js';

const SECTOR = 512;

/** A version of a block, as a storm under a PowerCut records it (times on the cut's clock). */
export interface BlockVersion {
  data: Buffer;
  issued: number;
  acked: number;
  /** Written in place over the block's cluster (may tear per sector); else a new cluster or an unmap (atomic). */
  inPlace: boolean;
  fua?: boolean;
}

/**
 * Records block `i`'s new version (its bytes as `model` holds them now) for a request issued at `issued`,
 * not yet acknowledged; a block's first record also records its start, zeros.
 */
export function recordVersion(history: Map<number, BlockVersion[]>, model: Buffer, bs: number, i: number, issued: number, inPlace: boolean, fua = false): BlockVersion {
  const v: BlockVersion = { data: Buffer.from(model.subarray(i * bs, (i + 1) * bs)), issued, acked: Infinity, inPlace, fua };
  let h = history.get(i);
  if (!h) history.set(i, (h = [{ data: Buffer.alloc(bs), issued: 0, acked: 0, inPlace: false, fua: false }]));
  h.push(v);
  return v;
}

/** A storm's flush issued at `issued`: recorded in `flushes`, its completion stamped on the cut's clock. */
export function recordFlush(cut: PowerCut, flushes: { issued: number; done: number }[], issued: number, flush: Promise<void>): Promise<number> {
  const f = { issued, done: Infinity };
  flushes.push(f);
  return flush.then(() => (f.done = cut.tick()));
}

/** `p`, which stamps the versions `vs` it made acknowledged (on the cut's clock) when it resolves. */
export function ackedWhen(cut: PowerCut, p: Promise<unknown>, vs: BlockVersion[]): Promise<void> {
  return p.then(() => {
    const t = cut.tick();
    for (const v of vs) v.acked = t;
  });
}

/**
 * A storm of `rounds` rounds, each of rng.int(...perRound) requests issued in one go (a turn of the event
 * loop let pass before each with chance `pause`) and then awaited: `issue(issued)` issues one, stamped
 * `issued` on the cut's clock, and returns it (ackedWhen, recordFlush).
 */
export async function stormRounds(cut: PowerCut, rng: Rng, rounds: number, perRound: [number, number], pause: number, issue: (issued: number) => Promise<unknown>): Promise<void> {
  for (let r = 0; r < rounds; r++) {
    const ops: Promise<unknown>[] = [];
    for (let k = rng.int(...perRound); k > 0; k--) {
      if (rng.chance(pause)) await new Promise((res) => setImmediate(res));
      ops.push(issue(cut.tick()));
    }
    await Promise.all(ops);
  }
}

export const digest = (b: Buffer): string => createHash('sha1').update(b).digest('hex').slice(0, 16);

/**
 * Cuts the power `cuts` times in a recorded storm on the image `path` (the first at its end, the others at
 * random clock values), each cut's image written to `dir`. Every cut: `check --verify` finds nothing but
 * crash residue (crashCheckErrors); a block with no history reads zeros; any other reads a version from
 * `floor` on that was issued before the cut, or (when one of those was written in place) each 512-byte
 * sector as one of them. `floor(hist, coveredUpTo, at)`: the oldest version allowed, given that the flushes
 * completed before the cut cover what was acknowledged before `coveredUpTo`.
 */
export async function cutLoop(o: {
  cut: PowerCut;
  path: string;
  dir: string;
  rng: Rng;
  cuts: number;
  end: number;
  blocks: number;
  bs: number;
  history: Map<number, BlockVersion[]>;
  flushes: { issued: number; done: number }[];
  readBack: (path: string) => Promise<Buffer>;
  floor: (hist: BlockVersion[], coveredUpTo: number, at: number) => number;
  tag: string;
}): Promise<void> {
  const { bs } = o;
  for (let c = 0; c < o.cuts; c++) {
    const at = c === 0 ? o.end : o.rng.int(1, o.end);
    const out = join(o.dir, `cut-${c}.ksc`);
    await o.cut.materialise(o.path, at, out, o.rng);
    const where = `cut ${c} at ${at} of ${o.end} (${o.tag})`;
    const chk = await checkImage(out, { verify: true });
    expect(crashCheckErrors(chk.errors), `${where}: check --verify`).toEqual([]);
    const content = await o.readBack(out);
    const coveredUpTo = Math.max(0, ...o.flushes.filter((f) => f.done < at).map((f) => f.issued));
    for (let i = 0; i < o.blocks; i++) {
      const got = content.subarray(i * bs, (i + 1) * bs);
      const hist = o.history.get(i);
      if (!hist) {
        expect(got.equals(Buffer.alloc(bs)), `${where}: cold block ${i} holds bytes`).toBe(true);
        continue;
      }
      const floor = o.floor(hist, coveredUpTo, at);
      const allowed = hist.slice(floor).filter((v) => v.issued < at);
      if (allowed.some((v) => v.data.equals(got))) continue;
      const tearable = allowed.some((v, j) => j > 0 && v.inPlace);
      const bad = Array.from({ length: bs / SECTOR }, (_, s) => s * SECTOR).find((x) => !allowed.some((v) => v.data.subarray(x, x + SECTOR).equals(got.subarray(x, x + SECTOR))));
      expect(
        tearable && bad === undefined,
        `${where}: block ${i} reads ${digest(got)}, none of its ${allowed.length} allowed versions (floor ${floor} of ${hist.length}; first sector no version explains: ${bad})`,
      ).toBe(true);
    }
  }
}
