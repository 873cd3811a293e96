/**
 * Leak sweep (formats/ksc_inc.md §8.1). After a crash the free list is void (§8), and clusters that were
 * free, freed, or written but not yet referenced when the writer died are *leaked*: nothing references
 * them and nothing would ever reuse them, so each crash grew the file. A writer opening a crashed image
 * finds them here and reuses them.
 *
 * Safety: a cluster is reported only when no durable structure references it. The caller runs this after
 * its DIRTY header sync (§9 rule 1), which made every earlier write of the file durable, so what is read
 * here is what the disk holds; and before any change of its own, or, deferred, while the session changes
 * the image (src/image/ksc/leak-sweep.ts says why the result stays right then). The referenced set is everything a header
 * can point at: both header slots, the directory, map pages and their DATA clusters, the bitmap directory,
 * each bitmap's table and pages, the intent words and the (void) free list's own pages. If any of it cannot
 * be read or is damaged, nothing is reported (what cannot be seen may reference data).
 */
import { BITMAP_DIR_ENTRY_SIZE, FIRST_FREE_OFFSET } from '../format/constants.js';
import type { Header } from '../format/header.js';
import { BitSet } from '../util/bitset.js';
import { alignUp } from './allocator.js';
import type { SparseBitmap } from './sparse-bitmap.js';
import type { Guard, MapTable } from './maptable.js';

/** Above this many map pages (4 Mi blocks) the sweep is skipped: opening would read too much. */
export const SWEEP_MAX_MAP_PAGES = 1024;
/** Above this many clusters in the file the sweep is skipped (its bit set would exceed 32 MiB). */
const SWEEP_MAX_CLUSTERS = 2 ** 28;

export interface SweepResult {
  /** Leaked clusters, ascending. */
  clusters: number[];
  /**
   * Leaked 4 KiB pieces, ascending: unreferenced pages of a cluster that also holds referenced metadata (a
   * bitmap page or table carved out of it, §8.1), or of the file's last, partial cluster.
   */
  pieces: number[];
  /** Why nothing was swept, or null. */
  skipped: string | null;
}

const PIECE = 4096;

export interface SweepInput {
  header: Header;
  map: MapTable;
  bitmaps: readonly (SparseBitmap | null)[];
  clusterSize: number;
  /** The end of the file when the image was opened: clusters at or past it are the session's own. */
  fileEnd: number;
  /** Runs the bitmap scan and each map page's scan (a deferred sweep: under the flush mutex). */
  guard?: Guard;
}

/** Test hook: awaited before each step of a sweep (`bitmaps`, `page N`, `result`). */
let stepHook: ((step: string) => Promise<void>) | null = null;

/** Installs (or removes, with null) a hook that runs before each step of every sweep (tests only). */
export function setSweepStepHook(hook: ((step: string) => Promise<void>) | null): void {
  stepHook = hook;
}

/** Awaits the step hook, if any. */
export async function sweepStep(step: string): Promise<void> {
  if (stepHook) await stepHook(step);
}

export async function findLeakedClusters(s: SweepInput): Promise<SweepResult> {
  const guard: Guard = s.guard ?? ((fn) => fn());
  const B = s.clusterSize;
  const count = Math.floor(s.fileEnd / B);
  if (count > SWEEP_MAX_CLUSTERS) return { clusters: [], pieces: [], skipped: `the file has more than ${SWEEP_MAX_CLUSTERS} clusters` };
  let pages = 0;
  try {
    for (let p = 0; p < s.map.directoryEntries; p++) if (s.map.pageOffset(p) !== 0) pages++;
  } catch {
    return { clusters: [], pieces: [], skipped: 'the directory is damaged' };
  }
  if (pages > SWEEP_MAX_MAP_PAGES) return { clusters: [], pieces: [], skipped: `the map has ${pages} pages (more than ${SWEEP_MAX_MAP_PAGES})` };
  const used = new BitSet(count);
  // Clusters only partly covered (metadata pieces; the file's last, partial cluster): their used 4 KiB pages.
  const partly = new Map<number, Set<number>>();
  const tail = s.fileEnd % B === 0 ? -1 : count;
  const notePages = (from: number, to: number): void => {
    for (let pg = Math.floor(from / PIECE); pg * PIECE < to; pg++) {
      const cl = Math.floor((pg * PIECE) / B);
      if (cl >= count && cl !== tail) continue;
      const pages = partly.get(cl) ?? new Set<number>();
      pages.add(pg);
      partly.set(cl, pages);
    }
  };
  const mark = (offset: number, bytes: number): void => {
    if (bytes <= 0) return;
    const end = offset + bytes;
    const first = Math.ceil(offset / B);
    const last = Math.floor(end / B) - 1; // the clusters wholly inside [offset, end)
    if (first > last) return notePages(offset, end);
    used.addRange(first, last);
    notePages(offset, first * B);
    notePages((last + 1) * B, end);
  };
  const h = s.header;
  mark(0, FIRST_FREE_OFFSET);
  mark(h.directoryOffset, h.directoryEntries * 16);
  mark(h.bitmapDirOffset, h.bitmapSlots * BITMAP_DIR_ENTRY_SIZE);
  mark(h.intentOffset, h.intentWords * 16);
  if (h.freeListOffset !== 0) mark(h.freeListOffset, alignUp(h.freeListEntries * 16, 4096));
  await sweepStep('bitmaps');
  // Under the guard: a bitmap management step (which holds the flush mutex) is wholly before or after the
  // scan, so an old table it stops referencing is either seen here or already released (Allocator.sweepResult).
  const bitmapsOk = await guard(async () => {
    try {
      for (const b of s.bitmaps) {
        if (!b) continue;
        const ranges = await b.hostRanges();
        // A table entry or table that failed its check names nothing it can be trusted for: what it pointed
        // at may still be a page of the bitmap (hostRanges leaves it out), so nothing is reclaimed.
        if (b.damage) return false;
        for (const r of ranges) mark(r.offset, r.length);
      }
      return true;
    } catch {
      return false;
    }
  });
  if (!bitmapsOk) return { clusters: [], pieces: [], skipped: 'a bitmap table is damaged' };
  let page = 0;
  const eachPage: Guard = async (fn) => {
    await sweepStep(`page ${page++}`);
    return guard(fn);
  };
  if (!(await s.map.scanReferences(mark, eachPage))) return { clusters: [], pieces: [], skipped: 'the map is damaged' };
  const firstCluster = Math.ceil(FIRST_FREE_OFFSET / B);
  const clusters: number[] = [];
  for (let c = firstCluster; c < count; c++) if (!used.has(c) && !partly.has(c)) clusters.push(c * B);
  const pieces: number[] = [];
  if (tail >= 0 && !partly.has(tail)) partly.set(tail, new Set());
  for (const [c, pages] of [...partly].sort((a, b) => a[0] - b[0])) {
    // Cluster 0 too: past the header slots it holds the first metadata (directory, intent words, and the
    // pieces appended while the file was shorter than a cluster).
    if (c < count && used.has(c)) continue;
    const stop = Math.min((c + 1) * B, s.fileEnd);
    for (let o = Math.max(c * B, FIRST_FREE_OFFSET); o < stop; o += PIECE) if (!pages.has(o / PIECE)) pieces.push(o);
  }
  return { clusters, pieces, skipped: null };
}
