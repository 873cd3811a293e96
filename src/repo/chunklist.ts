/**
 * A manifest's chunk list in memory (formats/repository.md §7.2, §7.5): the chunk ids in segments of
 * SEGMENT_IDS ids. An all-zero segment is not allocated, and segments are shared copy-on-write between a
 * list and its clones, so an incremental backup's list costs only the segments it changes, and a sparse
 * 16 TiB disk's list a few MiB instead of 256 MiB.
 */
import { closeSync, mkdtempSync, openSync, readSync, rmdirSync, unlinkSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KscError } from '../errors.js';
import { ID_BYTES, ZERO_ID, chunkId, isZeroId, merkleRoot } from '../hash/chunkid.js';

// §7.5: ids per segment (1 MiB of ids). 256 × 256, so a full segment is one node of the Merkle tree's level 2.
import { SEGMENT_IDS } from './constants.js';
export { SEGMENT_IDS };
const SEGMENT_SHIFT = 16;
const GROUP = 256; // §7.3 fan-out

class Segment {
  /** The ids, or null while the segment waits in its store's file. */
  ids: Buffer | null;
  i32: Int32Array | null;
  /** Level-2 Merkle node of this segment (§7.3), computed when first needed, dropped on change. */
  node: Buffer | null = null;
  /** Where the store's file holds a copy (-1: none yet), and whether the ids changed since it was written. */
  pos = -1;
  dirty = true;
  readonly bytes: number;
  constructor(
    ids: Buffer,
    public nonZero: number,
    readonly store: SegmentStore | null,
  ) {
    this.ids = ids;
    this.i32 = new Int32Array(ids.buffer, ids.byteOffset, ids.length >> 2);
    this.bytes = ids.length;
    store?.touch(this);
  }
}

const closer = new FinalizationRegistry<number>((fd) => {
  try {
    closeSync(fd);
  } catch {
    // closed already
  }
});

/**
 * Where the segments of large chunk lists wait while not in use, so that a list's memory is bounded
 * whatever the disk's size (a densely written 16 TiB disk has 256 MiB of ids): at most `cacheSegments`
 * segments (1 MiB each) stay in memory, least recently used first out, the others in a temporary file that
 * is unlinked as soon as it is open (it goes with the process, however that ends). Lists cloned from one
 * another share their store. Reads and writes are synchronous (the list's API is): a 1 MiB read or write of
 * a file in the page cache, once per segment change of an access pattern.
 */
export class SegmentStore {
  /** The file, opened at the first eviction (-1: not yet, or closed). */
  private fd = -1;
  private closed = false;
  private end = 0;
  /** Segments holding their ids in memory, least recently used first. */
  private readonly lru = new Set<Segment>();
  private last: Segment | null = null;
  /** Segment reads and writes of the file (for tests and figures). */
  reads = 0;
  writes = 0;

  constructor(
    readonly cacheSegments = LIST_CACHE_SEGMENTS,
    private readonly dir = tmpdir(),
  ) {
    if (!(cacheSegments >= 1)) throw new RangeError('a segment store caches at least one segment');
  }

  private file(): number {
    if (this.fd < 0) {
      if (this.closed) throw new Error('SegmentStore: used after close()');
      const d = mkdtempSync(join(this.dir, 'kscinc-ids-'));
      const path = join(d, 'segments');
      this.fd = openSync(path, 'w+');
      unlinkSync(path);
      rmdirSync(d);
      closer.register(this, this.fd, this);
    }
    return this.fd;
  }

  /** Segments in memory now. */
  get cached(): number {
    return this.lru.size;
  }

  /** Bytes of the file (segments written out, including ones since replaced). */
  get fileBytes(): number {
    return this.end;
  }

  /** Marks `s` as just used; evicts the least recently used segments beyond the cache. */
  touch(s: Segment): void {
    if (this.last === s) return;
    this.last = s;
    this.lru.delete(s);
    this.lru.add(s);
    while (this.lru.size > this.cacheSegments) {
      const old = this.lru.values().next().value as Segment;
      this.evict(old);
    }
  }

  private evict(s: Segment): void {
    this.lru.delete(s);
    if (this.last === s) this.last = null;
    if (s.dirty) {
      // A segment's file region belongs to it alone (a changed copy is a new segment), so it is rewritten in place.
      if (s.pos < 0) {
        s.pos = this.end;
        this.end += s.bytes;
      }
      let done = 0;
      const fd = this.file();
      while (done < s.bytes) done += writeSync(fd, s.ids!, done, s.bytes - done, s.pos + done);
      s.dirty = false;
      this.writes++;
    }
    s.ids = null;
    s.i32 = null;
  }

  /** Brings `s`'s ids back into memory. */
  load(s: Segment): void {
    const ids = ownBuffer(s.bytes);
    let done = 0;
    while (done < s.bytes) {
      const n = readSync(this.file(), ids, done, s.bytes - done, s.pos + done);
      if (n === 0) throw new KscError('KSC_E_IO', `chunk-list segment file ended at ${s.pos + done} (expected ${s.bytes} bytes at ${s.pos})`);
      done += n;
    }
    this.reads++;
    s.ids = ids;
    s.i32 = new Int32Array(ids.buffer, 0, ids.length >> 2);
    this.touch(s);
  }

  /** Closes the file now (otherwise when the store is collected). Lists using it must not be used after. */
  close(): void {
    this.closed = true;
    this.lru.clear();
    this.last = null;
    if (this.fd < 0) return;
    closer.unregister(this);
    closeSync(this.fd);
    this.fd = -1;
  }
}

/** Segments a large list keeps in memory at most (16 MiB of ids). */
export const LIST_CACHE_SEGMENTS = 16;

/** A store for a list of `chunks` ids larger than LIST_CACHE_SEGMENTS segments (null for a smaller one). */
export function storeForList(chunks: number): SegmentStore | null {
  return ChunkList.segmentsFor(chunks) > LIST_CACHE_SEGMENTS ? new SegmentStore(LIST_CACHE_SEGMENTS) : null;
}

/** `s`'s ids, loaded from its store when they wait there. */
function idsOf(s: Segment): Buffer {
  if (!s.ids) s.store!.load(s);
  else s.store?.touch(s);
  return s.ids!;
}

function wordsOf(s: Segment): Int32Array {
  idsOf(s);
  return s.i32!;
}

/** A fresh buffer of `n` bytes with its own ArrayBuffer at offset 0 (so Int32Array views are aligned). */
export function ownBuffer(n: number): Buffer {
  return Buffer.from(new ArrayBuffer(n));
}

/** Whether the id whose first word is `i32[o]` is all zeros. */
function zeroAt(i32: Int32Array, o: number): boolean {
  return (i32[o]! | i32[o + 1]! | i32[o + 2]! | i32[o + 3]!) === 0;
}

function countNonZero(i32: Int32Array): number {
  let n = 0;
  for (let o = 0; o < i32.length; o += 4) if (!zeroAt(i32, o)) n++;
  return n;
}

let zeroNodes: { group: Buffer; segment: Buffer } | null = null;
/** Merkle nodes of 256 zero ids (level 1) and of a full all-zero segment (level 2): fixed values. */
function zeroNode(): { group: Buffer; segment: Buffer } {
  if (!zeroNodes) {
    const group = chunkId(Buffer.alloc(GROUP * ID_BYTES));
    const level1 = Buffer.alloc(GROUP * ID_BYTES);
    for (let i = 0; i < GROUP; i++) group.copy(level1, i * ID_BYTES);
    zeroNodes = { group, segment: chunkId(level1) };
  }
  return zeroNodes;
}

export class ChunkList {
  private readonly segs: (Segment | null)[];
  /** owned[i] = 1: segs[i] belongs to this list alone and may be changed in place. */
  private readonly owned: Uint8Array;

  /** An all-zero list of `length` chunk ids; with a store, its segments beyond the store's cache wait in a file. */
  constructor(
    readonly length: number,
    readonly store: SegmentStore | null = null,
  ) {
    if (!Number.isSafeInteger(length) || length < 0) throw new KscError('KSC_E_INVALID', `chunk list length ${length} is not a whole number`);
    const n = ChunkList.segmentsFor(length);
    this.segs = new Array<Segment | null>(n).fill(null);
    this.owned = new Uint8Array(n);
  }

  static segmentsFor(length: number): number {
    return Math.ceil(length / SEGMENT_IDS);
  }

  /** From a flat buffer of 16-byte ids (copied; all-zero segments are not allocated). */
  static fromBuffer(flat: Buffer, store: SegmentStore | null = null): ChunkList {
    if (flat.length % ID_BYTES !== 0) throw new KscError('KSC_E_INVALID', `a chunk list of ${flat.length} bytes is not whole 16-byte ids`);
    const l = new ChunkList(flat.length / ID_BYTES, store);
    for (let i = 0; i < l.segs.length; i++) {
      const start = i * SEGMENT_IDS * ID_BYTES;
      l.putSegment(i, flat.subarray(start, start + l.segmentLength(i) * ID_BYTES));
    }
    return l;
  }

  /** Number of segments (allocated or not). */
  get segmentCount(): number {
    return this.segs.length;
  }

  /** Ids in segment `i` (SEGMENT_IDS, fewer in the last). */
  segmentLength(i: number): number {
    return Math.min(SEGMENT_IDS, this.length - i * SEGMENT_IDS);
  }

  /** Segments holding memory (the others are all zero ids). */
  allocatedSegments(): number {
    let n = 0;
    for (const s of this.segs) if (s) n++;
    return n;
  }

  /** The ids of segment `i`, or null when they are all zero. A read-only view: do not change it. */
  segment(i: number): Buffer | null {
    const s = this.segs[i];
    return s ? idsOf(s) : null;
  }

  /**
   * Stores segment `i` from `ids` (16 × segmentLength(i) bytes, copied unless `adopt`: then `ids` must be
   * a buffer of its own at offset 0 that nothing else changes). Used by the manifest decoder.
   */
  putSegment(i: number, ids: Buffer, adopt = false): void {
    if (i < 0 || i >= this.segs.length) throw new RangeError(`segment ${i} of ${this.segs.length}`);
    if (ids.length !== this.segmentLength(i) * ID_BYTES) throw new RangeError(`segment ${i} needs ${this.segmentLength(i) * ID_BYTES} bytes, got ${ids.length}`);
    // Kept as is when adopted; else copied to a buffer of its own (which an unaligned input needs anyway to
    // be counted through 32-bit words).
    let own = ids;
    if (!(adopt && ids.byteOffset === 0 && ids.buffer.byteLength === ids.length)) {
      own = ownBuffer(ids.length);
      ids.copy(own);
    }
    const nonZero = countNonZero(new Int32Array(own.buffer, 0, own.length >> 2));
    if (nonZero === 0) {
      this.segs[i] = null;
      this.owned[i] = 0;
      return;
    }
    this.segs[i] = new Segment(own, nonZero, this.store);
    this.owned[i] = 1;
  }

  private check(k: number): void {
    if (!(k >= 0 && k < this.length && Number.isInteger(k))) throw new RangeError(`chunk ${k} is outside the list of ${this.length}`);
  }

  isZero(k: number): boolean {
    this.check(k);
    const s = this.segs[k >>> SEGMENT_SHIFT];
    if (!s) return true;
    return zeroAt(wordsOf(s), (k & (SEGMENT_IDS - 1)) * 4);
  }

  /** Chunk `k`'s id: a view valid until the list changes (ZERO_ID for a zero chunk: do not change it). */
  view(k: number): Buffer {
    this.check(k);
    const s = this.segs[k >>> SEGMENT_SHIFT];
    if (!s) return ZERO_ID;
    const o = (k & (SEGMENT_IDS - 1)) * ID_BYTES;
    return idsOf(s).subarray(o, o + ID_BYTES);
  }

  /** A copy of chunk `k`'s id. */
  get(k: number): Buffer {
    return Buffer.from(this.view(k));
  }

  set(k: number, id: Uint8Array): void {
    this.check(k);
    if (id.length < ID_BYTES) throw new RangeError('a chunk id is 16 bytes');
    const si = k >>> SEGMENT_SHIFT;
    const zero = isZeroId(id);
    let s = this.segs[si];
    const o = (k & (SEGMENT_IDS - 1)) * 4;
    if (!s) {
      if (zero) return;
      s = new Segment(ownBuffer(this.segmentLength(si) * ID_BYTES), 0, this.store);
      this.segs[si] = s;
      this.owned[si] = 1;
    }
    const wasZero = zeroAt(wordsOf(s), o);
    if (wasZero && zero) return;
    if (!wasZero && !zero && s.ids!.subarray(o * 4, o * 4 + ID_BYTES).equals(id.subarray(0, ID_BYTES))) return;
    const nonZero = s.nonZero + (zero ? 0 : 1) - (wasZero ? 0 : 1);
    if (nonZero === 0) {
      // the last non-zero id goes: the segment is all zeros again
      this.segs[si] = null;
      this.owned[si] = 0;
      return;
    }
    if (!this.owned[si]) {
      // copy-on-write
      const copy = ownBuffer(s.bytes);
      s.ids!.copy(copy);
      s = new Segment(copy, s.nonZero, this.store);
      this.segs[si] = s;
      this.owned[si] = 1;
    }
    idsOf(s).set(id.subarray(0, ID_BYTES), o * 4);
    s.dirty = true;
    s.nonZero = nonZero;
    s.node = null;
  }

  /** A list with the same ids sharing every segment (O(segments)); either list copies a segment before changing it. */
  clone(): ChunkList {
    const c = new ChunkList(this.length, this.store);
    for (let i = 0; i < this.segs.length; i++) c.segs[i] = this.segs[i]!;
    this.owned.fill(0);
    return c;
  }

  /** Number of chunks whose id is not the zero id. */
  nonZeroCount(): number {
    let n = 0;
    for (const s of this.segs) if (s) n += s.nonZero;
    return n;
  }

  /**
   * Calls `fn` for every non-zero chunk in order, with a view of its id (valid during the call); stops when
   * `fn` returns false.
   */
  forEachNonZero(fn: (k: number, id: Buffer) => boolean | void): void {
    this.forEachNonZeroAt((k, b, at) => fn(k, b.subarray(at, at + ID_BYTES)));
  }

  /**
   * forEachNonZero without a view per chunk: `fn` gets the buffer holding the id and where in it (valid during
   * the call). For a pass over every id of a list that only reads them (a parent vouched for, issue 19).
   */
  forEachNonZeroAt(fn: (k: number, ids: Buffer, at: number) => boolean | void): void {
    for (let si = 0; si < this.segs.length; si++) {
      const s = this.segs[si];
      if (!s) continue;
      const base = si * SEGMENT_IDS;
      // Held here: `fn` may use other segments, which may send this one back to the file meanwhile.
      const ids = idsOf(s);
      const i32 = s.i32!;
      const n = ids.length / ID_BYTES;
      for (let j = 0, o = 0; j < n; j++, o += 4) {
        if (zeroAt(i32, o)) continue;
        if (fn(base + j, ids, o * 4) === false) return;
      }
    }
  }

  /**
   * True when `fn` returns true for every segment: the segment's ids (16 bytes each, zero ids included) as
   * bytes and as little-endian words, valid during the call. A pass over every id with a call per segment,
   * not per id (a parent vouched for, issue 19).
   */
  everySegment(fn: (ids: Buffer, words: Int32Array) => boolean): boolean {
    for (const s of this.segs) {
      if (!s) continue;
      const ids = idsOf(s);
      if (!fn(ids, s.i32!)) return false;
    }
    return true;
  }

  /** The flat list (16 bytes per chunk). O(length): for tests and small lists. */
  toBuffer(): Buffer {
    const out = Buffer.alloc(this.length * ID_BYTES);
    this.segs.forEach((s, i) => s && idsOf(s).copy(out, i * SEGMENT_IDS * ID_BYTES));
    return out;
  }

  equals(other: ChunkList): boolean {
    if (other.length !== this.length) return false;
    for (let i = 0; i < this.segs.length; i++) {
      const a = this.segs[i],
        b = other.segs[i];
      if (a === b) continue;
      if (!a || !b || !idsOf(a).equals(idsOf(b))) return false;
    }
    return true;
  }

  /** §7.3 Merkle root over the decoded list, computed segment by segment (all-zero segments from fixed values). */
  merkleRoot(): Buffer {
    if (this.length === 0) return Buffer.alloc(ID_BYTES);
    if (this.length <= GROUP) return chunkId(this.segment(0) ?? Buffer.alloc(this.length * ID_BYTES)); // one level-1 node is the root
    const level2 = Buffer.allocUnsafe(this.segs.length * ID_BYTES);
    for (let i = 0; i < this.segs.length; i++) this.segmentNode(i).copy(level2, i * ID_BYTES);
    // One segment: its level-2 node is the root; several: the tree goes on over the segments' nodes.
    return this.segs.length === 1 ? level2 : merkleRoot(level2);
  }

  private segmentNode(i: number): Buffer {
    const s = this.segs[i];
    const n = this.segmentLength(i);
    if (!s && n === SEGMENT_IDS) return zeroNode().segment;
    if (s?.node) return s.node;
    const groups = Math.ceil(n / GROUP);
    const level1 = Buffer.allocUnsafe(groups * ID_BYTES);
    const ids = s ? idsOf(s) : null;
    for (let g = 0; g < groups; g++) {
      const len = Math.min(GROUP, n - g * GROUP) * ID_BYTES;
      if (!s && len === GROUP * ID_BYTES) zeroNode().group.copy(level1, g * ID_BYTES);
      else if (!s) chunkId(Buffer.alloc(len), level1, g * ID_BYTES);
      else chunkId(ids!.subarray(g * GROUP * ID_BYTES, g * GROUP * ID_BYTES + len), level1, g * ID_BYTES);
    }
    const node = chunkId(level1);
    if (s) s.node = node;
    return node;
  }
}
