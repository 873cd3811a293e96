/**
 * Flush and close of a ksc_inc image (formats/ksc_inc.md §9 rules 3, 4, 7 and 8):
 *  - flush: snapshot dirty metadata, write new pages, sync, rewrite records in place, sync; then the
 *    clusters the now-durable map no longer references are punched and become reusable;
 *  - close: flush, write the free list, sync, clear the intent words, write a clean header.
 * One flush at a time (core.flushMutex); bitmap management steps run under the same mutex.
 */
import { ioError } from '../../errors.js';
import { INCOMPAT_DIRTY } from '../../format/constants.js';
import { encodeFreeList, freeListBytes } from '../../format/freelist.js';
import type { MapWrite } from '../maptable.js';
import { type KscCore, punchRuns } from './core.js';

/** §9 rule 3 and 8. Concurrent callers share a flush that starts after their call. */
export function flush(c: KscCore): Promise<void> {
  c.live();
  if (c.readOnly) return Promise.resolve();
  if (c.broken) return Promise.reject(c.broken);
  c.pendingFlush ??= c.flushMutex.run(async () => {
    c.pendingFlush = null;
    await flushNow(c);
  });
  return c.pendingFlush;
}

/**
 * The flush itself; the caller holds flushMutex. `handover` (§9 rule 11, the last flush before a handover):
 * the records rewritten in place are written but not synced, and the clusters their change unlinked are
 * returned instead of released: the next writer releases them after its first completed flush, whose sync
 * makes those records durable.
 */
export async function flushNow(c: KscCore, handover = false): Promise<number[]> {
  const fresh: MapWrite[] = [];
  const inPlace: MapWrite[] = [];
  const allocMeta = (n: number): number => c.alloc.allocMeta(n);
  c.map.snapshot(allocMeta, fresh, inPlace);
  for (const b of c.bitmapSlots) b?.snapshot(allocMeta, fresh, inPlace);
  const epoch = ++c.epoch;
  try {
    await Promise.all(fresh.map((w) => c.file.write(w.data, w.offset)));
    await c.file.sync(); // data and new pages durable before anything points at them
    if (inPlace.length > 0) {
      await Promise.all(inPlace.map((w) => c.file.write(w.data, w.offset)));
      if (!handover) await c.file.sync();
    }
  } catch (e) {
    // Records that did not reach the disk are lost to this session: refuse further changes rather than
    // guess. Reopening the image recovers from the intent bits.
    c.broken = ioError(c.name, 'flush', e);
    throw c.broken;
  }
  if (handover) return c.alloc.released(epoch - 1);
  await releaseClusters(c, c.alloc.released(epoch - 1));
  // Not on the way to a handover (§9 rule 11): the next writer would pay an intent sync for every region cleared.
  if (!c.keepIntent) await c.intent.clearIdle(epoch);
  return [];
}

/**
 * §9 rule 4: clusters whose unlinking map change is now durable are punched out of the file, then become
 * reusable. Never earlier: until the map change is durable a crash brings back the entry that points at
 * the cluster, and it must still hold the block's data. Punching only returns space to the host, so a
 * failed punch leaves the cluster as it is and it is reused all the same.
 */
async function releaseClusters(c: KscCore, clusters: number[]): Promise<void> {
  if (clusters.length === 0) return;
  try {
    await punchRuns(c.file, clusters, c.blockSize);
  } catch {
    // Space only: the map no longer references these clusters on disk, whatever they hold.
  } finally {
    c.alloc.addFree(clusters);
  }
}

/** §9 rule 7. Closes the backing chain too. Idempotent. */
export async function close(c: KscCore): Promise<void> {
  if (c.closed) return;
  // Fills (§4.2) are the image's own changes, not a caller's: the close waits for them, so none lands after
  // the last flush with its clusters neither referenced nor free.
  c.closing = true;
  while (c.fills.size > 0) await Promise.allSettled([...c.fills]);
  // A deferred leak sweep (§8.1) hands its clusters over first, so the free list below lists them.
  if (c.sweepDone) await c.sweepDone;
  try {
    if (!c.readOnly && !c.broken) {
      await flush(c);
      await c.flushMutex.run(() => writeFreeListAndCleanHeader(c));
    }
  } finally {
    c.closed = true;
    await c.file.close();
    await c.backingDev?.close();
  }
}

/** Clean close after the last flush: free list durable, intent words clear, then a header without DIRTY. */
async function writeFreeListAndCleanHeader(c: KscCore): Promise<void> {
  const runs = c.alloc.freeRuns();
  const oldOffset = c.header.freeListOffset;
  const oldBytes = freeListBytes(c.header.freeListEntries);
  const bytes = freeListBytes(runs.length);
  // The list fills whole 4 KiB pages (zero-padded), so no stale record outlives a shorter list.
  const reuse = oldOffset !== 0 && runs.length > 0 && oldBytes >= bytes;
  const freeOffset = runs.length === 0 ? 0 : reuse ? oldOffset : c.alloc.allocMeta(bytes, true); // at the end: `runs` must not list its own space
  if (runs.length > 0) {
    await c.file.write(encodeFreeList(runs, reuse ? oldBytes : bytes), freeOffset);
    await c.file.sync();
  }
  await c.intent.clearAll();
  await c.writeHeader({
    ...c.header,
    incompatible: c.header.incompatible & ~INCOMPAT_DIRTY,
    freeListOffset: freeOffset,
    freeListEntries: runs.length,
  });
  // The old list's pages are punched only after the header that stops pointing at them is durable.
  if (oldOffset !== 0 && !reuse) await c.punchRanges([{ offset: oldOffset, length: oldBytes }]);
}
