/**
 * The leak sweep of a writer that opened a crashed image (formats/ksc_inc.md §8.1), at open or deferred.
 *
 * At open (the default): after the DIRTY header sync and before any change, the clusters nothing references
 * are punched and become free.
 *
 * Deferred (`kscinc serve`: the image serves before the sweep has read its map): the scan runs in the
 * background while the session changes the image. It stays right because
 *  - the session allocates only from the end of the file as it was at open (past every cluster the scan
 *    considers) and from clusters it freed itself (the Allocator notes each one while the sweep runs);
 *  - a cluster the scan may report was referenced by nothing durable at open, and nothing in the session
 *    can come to reference it (it is in no free list until the result is handed over), so it stays leaked;
 *  - a cluster referenced at open that the session unlinks before the scan reaches its entry is one the
 *    session freed: Allocator.sweepResult drops it from the result;
 *  - the scan reads each map page, and the bitmaps, under the flush mutex: no flush rewrites a page being
 *    read and no bitmap management step is half done.
 * The result is handed to the allocator only once the whole scan completed and its clusters are punched.
 * It needs no record on disk: it is a fact about the state that was durable at open, and a crash at any
 * point leaves those clusters leaked again (or referenced, if the session reused one and flushed), for the
 * next open's sweep. A clean close waits for the sweep (its free list then lists them); a handover ends it
 * unfinished (the next writer continues the session without a sweep: the clusters stay leaked until a later
 * crash's sweep or `check --repair`).
 */
import { findLeakedClusters, sweepStep } from '../sweep.js';
import type { Header } from '../../format/header.js';
import type { Guard } from '../maptable.js';
import { type KscCore, punchOrZero, punchRuns } from './core.js';

/** Runs the sweep now (`deferred` false) or starts it in the background, leaving c.sweepDone to await. */
export async function sweepLeaks(c: KscCore, deferred: boolean): Promise<void> {
  // Damage found at open (§6.4, §10: a header slot, the free list, intent words, a bitmap's slot, table or
  // pages) means something may point at clusters this cannot see: leave them to check --repair.
  const damaged = c.openDamage.length > 0 || c.bitmapSlots.some((b) => b?.damage);
  if (damaged) {
    c.sweep = { reclaimed: 0, skipped: 'damaged metadata was found at open' };
    return;
  }
  const header = c.header; // as opened: the free list it names is void but still referenced (§8.1)
  if (!deferred) return sweepNow(c, header, c.alloc.fileEnd, undefined);
  c.alloc.sweepStarted();
  const fileEnd = c.alloc.fileEnd;
  const guard: Guard = (fn) => c.flushMutex.run(fn);
  c.sweepDone = new Promise<void>((r) => setImmediate(r))
    .then(() => sweepNow(c, header, fileEnd, guard))
    .catch((e: unknown) => {
      // The file closed under it (a handover) or a read failed: nothing is handed over; the clusters stay leaked.
      c.sweep = { reclaimed: 0, skipped: `the deferred sweep failed: ${(e as Error).message}` };
    })
    .finally(() => {
      c.alloc.sweepResult([]);
      c.sweepDone = null;
    });
}

async function sweepNow(c: KscCore, header: Header, fileEnd: number, guard: Guard | undefined): Promise<void> {
  const r = await findLeakedClusters({ header, map: c.map, bitmaps: c.bitmapSlots, clusterSize: c.blockSize, fileEnd, guard });
  await sweepStep('result');
  if (c.closed || c.sweepCancelled || c.broken) {
    c.sweep = { reclaimed: 0, skipped: c.broken ? 'the session failed' : 'the image was handed over before the sweep finished' };
    return;
  }
  // One call: the allocator's note of what the session touched ends with it (pieces are dropped by cluster too).
  const kept = new Set(c.alloc.sweepResult([...r.clusters, ...r.pieces]));
  const clusters = r.clusters.filter((o) => kept.has(o));
  const pieces = r.pieces.filter((o) => kept.has(o));
  c.sweep = { reclaimed: clusters.length, reclaimedPieces: pieces.length, skipped: r.skipped };
  if (clusters.length > 0) {
    await punchRuns(c.file, clusters, c.blockSize).catch(() => undefined); // space only
    c.alloc.addFree(clusters);
  }
  // A piece must read as zeros before it serves metadata again (check's leak scan looks for non-zero pages):
  // if zeroing fails it stays out of the pool, leaked as before.
  for (const run of runsOf(pieces, PIECE)) {
    try {
      await punchOrZero(c.file, run.offset, run.length);
      c.alloc.releaseMeta(run.offset, run.length);
    } catch {
      // space only
    }
  }
}

const PIECE = 4096;

/** Adjacent `size`-byte units (ascending offsets) as runs. */
function runsOf(offsets: number[], size: number): { offset: number; length: number }[] {
  const runs: { offset: number; length: number }[] = [];
  for (const o of offsets) {
    const last = runs[runs.length - 1];
    if (last && last.offset + last.length === o) last.length += size;
    else runs.push({ offset: o, length: size });
  }
  return runs;
}
