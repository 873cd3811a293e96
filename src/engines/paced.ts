/**
 * Turns of the event loop for the engines' loops over the whole index and over a manifest's ids (prune,
 * verify): each step is a few hundred nanoseconds to a few microseconds of CPU and no I/O, so a repository
 * of millions of chunks kept the thread busy for seconds at a time — no lock refresh, no signal, no
 * progress meanwhile (bench/README.md, session 18, starve).
 *
 * Such a loop asks for a turn every STEPS steps through util/turns.ts's pace(): it hands one back after
 * RUN_MAX such asks in a row or RUN_MS since the first, so at most STEPS × RUN_MAX steps (16 Ki) run without
 * a turn, and usually about 2 ms of them.
 */
import type { ChunkList } from '../repo/chunklist.js';
import { SEGMENT_IDS } from '../repo/constants.js';
import { ID_BYTES } from '../hash/chunkid.js';
import { pace } from '../util/turns.js';

/** Steps of such a loop per call of pace() (a power of two). */
export const STEPS = 64;

/** For step `i` of a loop: a promise to await before going on when the event loop is due a turn, else null. */
export function turnDue(i: number): Promise<void> | null {
  return (i & (STEPS - 1)) === STEPS - 1 ? pace() : null;
}

/**
 * ChunkList.forEachNonZeroAt with turns of the event loop: `fn` gets chunk `k`'s id as the 16 bytes of
 * `ids` at `at` (valid during the call). The list must not change meanwhile.
 */
export async function forEachNonZeroPaced(list: ChunkList, fn: (k: number, ids: Buffer, at: number) => void): Promise<void> {
  let step = 0;
  for (let si = 0; si < list.segmentCount; si++) {
    const ids = list.segment(si);
    if (!ids) continue;
    // Held here: the list's store may send the segment back to its file meanwhile (the bytes stay).
    const base = si * SEGMENT_IDS;
    for (let j = 0, at = 0; at < ids.length; j++, at += ID_BYTES) {
      if (ids.readUInt32LE(at) === 0 && ids.readUInt32LE(at + 4) === 0 && ids.readUInt32LE(at + 8) === 0 && ids.readUInt32LE(at + 12) === 0) continue;
      fn(base + j, ids, at);
      const t = turnDue(step++);
      if (t) await t;
    }
  }
}

/**
 * Runs the calls given to the function it returns one at a time, each in a turn of the event loop of its
 * own: for synchronous work on objects read side by side (an index object's entries), whose reads may all
 * complete in one turn and would otherwise run back to back, timers waiting meanwhile.
 */
export function oneTurnEach(): <T>(f: () => T) => Promise<T> {
  let last: Promise<unknown> = Promise.resolve();
  return <T>(f: () => T): Promise<T> => {
    const p = last.then(() => new Promise<void>((resolve) => setImmediate(resolve))).then(f);
    last = p.catch(() => undefined);
    return p;
  };
}
