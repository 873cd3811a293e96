/**
 * Positions of a backup that hold the same chunk (formats/ksc_inc.md §4.2 rule 3, issue 18): a live restore
 * fetches and verifies a chunk once and may fill every position holding it, as restore writes one decoded
 * chunk to each of its positions. Built once the index is loaded, in slices that yield to the event loop
 * (a 1 TiB disk of 1 MiB chunks is a million lookups): until then no position has duplicates.
 *
 * `next[k]` is the next position after `k` (wrapping) whose chunk has the same index slot, `k` itself when
 * no other has it, -1 for a position never fetched (zero or local-base chunks). 4 bytes a chunk.
 */
import type { ChunkIndex } from '../repo/repository.js';

const SLICE = 16384;

export class DuplicateChunks {
  private next: Int32Array | null = null;

  /** Whether any position shares its chunk with another (the map is built and not trivial). */
  get ready(): boolean {
    return this.next !== null;
  }

  /**
   * Builds the map for positions 0 … count-1: `fetched(k)` false leaves k out, `slotOf(k)` is its index
   * slot, below `slots` (negative: not indexed, left out). `stop()` true abandons the build (the backing
   * closed). Per-slot arrays, not maps: a million chunks cost ~16 MiB for the build and a few ms a slice.
   */
  async build(count: number, slots: number, fetched: (k: number) => boolean, slotOf: (k: number) => number, stop: () => boolean): Promise<void> {
    const next = new Int32Array(count).fill(-1);
    const first = new Int32Array(slots).fill(-1);
    const last = new Int32Array(slots).fill(-1);
    let shared = false;
    for (let k = 0; k < count; k++) {
      if (k % SLICE === SLICE - 1) {
        await new Promise((r) => setImmediate(r));
        if (stop()) return;
      }
      if (!fetched(k)) continue;
      const s = slotOf(k);
      if (s < 0 || s >= slots) continue;
      const prev = last[s]!;
      if (prev < 0) first[s] = k;
      else {
        next[prev] = k;
        shared = true;
      }
      last[s] = k;
    }
    if (!shared) return;
    // Close each ring: the last position of a slot points back to its first (k itself when alone).
    for (let s = 0; s < slots; s++) if (last[s]! >= 0) next[last[s]!] = first[s]!;
    this.next = next;
  }

  /**
   * Up to `max` other positions holding chunk `k`'s data, in order after `k` (wrapping), for which `want`
   * is true; it looks at no more than 4 × `max` of them (a chunk held a million times costs no walk).
   */
  others(k: number, max: number, want: (j: number) => boolean): number[] {
    const next = this.next;
    const out: number[] = [];
    if (!next || k < 0 || k >= next.length || max <= 0) return out;
    let steps = 4 * max;
    for (let j = next[k]!; j !== k && j >= 0 && out.length < max && steps-- > 0; j = next[j]!) if (want(j)) out.push(j);
    return out;
  }
}

/** `index.slotOf` of each position's id, for DuplicateChunks.build. */
export function slotFinder(index: ChunkIndex, idOf: (k: number) => Buffer): (k: number) => number {
  return (k) => index.slotOf(idOf(k));
}
