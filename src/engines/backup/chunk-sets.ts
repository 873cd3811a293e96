/** Sets of chunk numbers: from extents, in runs, in groups. */
import type { BitSet } from '../../util/bitset.js';

/** Adds the chunks `extents` touch to `into`. */
export function chunkSetFromExtents(extents: { offset: number; length: number }[], chunkSize: number, into: BitSet): void {
  for (const e of extents) {
    if (e.length > 0) into.addRange(Math.floor(e.offset / chunkSize), Math.floor((e.offset + e.length - 1) / chunkSize));
  }
}

/** Runs of consecutive members of `set` as [first, last] pairs, in order. */
export function* runsOf(set: BitSet): Generator<[number, number]> {
  let first = -1,
    last = -2;
  for (const k of set) {
    if (k !== last + 1) {
      if (first >= 0) yield [first, last];
      first = k;
    }
    last = k;
  }
  if (first >= 0) yield [first, last];
}

/** The numbers of `items` (a BitSet's in ascending order) in groups of up to `n`, made as they are taken. */
export function* groupsOf(items: Iterable<number>, n: number): Generator<number[]> {
  let g: number[] = [];
  for (const k of items) {
    g.push(k);
    if (g.length === n) {
      yield g;
      g = [];
    }
  }
  if (g.length > 0) yield g;
}

/** Bytes of a disk of `size` bytes that the chunks of `set` cover (the last chunk may be short). */
export function bytesOf(set: BitSet, chunkSize: number, size: number): number {
  const chunks = Math.ceil(size / chunkSize);
  return set.count * chunkSize - (set.has(chunks - 1) ? chunks * chunkSize - size : 0);
}
