/**
 * Index objects (formats/repository.md §6): the writer (encodeIndex) and the one decoder (IndexDecoder),
 * which reads an object whole or in pieces. Every other index reader is built on it: visitIndex and
 * decodeIndex here for an object in memory, Repository.readIndex for the objects of a repository.
 */
import { crc32 } from 'node:zlib';
import { ID_BYTES } from '../hash/chunkid.js';
import { INDEX_ENTRY, INDEX_HEADER, INDEX_MAGIC, INDEX_PACK_ID, INDEX_VERSION } from './constants.js';
import { corrupt, safeU64, unsupported } from './corrupt.js';

export interface IndexEntry {
  id: Buffer;
  pack: string; // 32 hex digits
  offset: number;
  length: number;
  rawLength: number;
}

/** Called for each index entry: the id is the 16 bytes of `b` at `at` (a view valid during the call). */
export type IndexVisitor = (b: Buffer, at: number, pack: string, offset: number, length: number, rawLength: number) => void;
/**
 * Called once for an index object read whole, instead of an IndexVisitor per entry: its `n` entries at
 * `b[at…]` have passed every check; their pack numbers index `packs`.
 */
export type IndexEntries = (b: Buffer, at: number, n: number, packs: readonly string[]) => void;
/** An IndexVisitor of ids and packs only. */
export type IdVisitor = (b: Buffer, at: number, pack: string) => void;

/** An index object of `entries`, which is iterated twice (an array, or an iterable that starts afresh). */
export function encodeIndex(entries: Iterable<IndexEntry>): Buffer {
  const packNo = new Map<string, number>();
  let count = 0;
  for (const e of entries) {
    if (!packNo.has(e.pack)) packNo.set(e.pack, packNo.size);
    count++;
  }
  const packs = [...packNo.keys()];
  const b = Buffer.alloc(INDEX_HEADER + packs.length * INDEX_PACK_ID + count * INDEX_ENTRY);
  INDEX_MAGIC.copy(b, 0);
  b.writeUInt32LE(INDEX_VERSION, 8);
  b.writeUInt32LE(packs.length, 12);
  b.writeUInt32LE(count, 16);
  packs.forEach((p, i) => b.write(p, INDEX_HEADER + i * INDEX_PACK_ID, 'hex'));
  let o = INDEX_HEADER + packs.length * INDEX_PACK_ID;
  let second = 0;
  for (const e of entries) {
    const n = packNo.get(e.pack);
    if (n === undefined || ++second > count) throw new Error('encodeIndex: the entries changed between the two passes (a one-shot iterator?)');
    e.id.copy(b, o, 0, ID_BYTES);
    b.writeUInt32LE(n, o + 16);
    b.writeBigUInt64LE(BigInt(e.offset), o + 24);
    b.writeUInt32LE(e.length, o + 32);
    b.writeUInt32LE(e.rawLength, o + 36);
    o += INDEX_ENTRY;
  }
  if (second !== count) throw new Error('encodeIndex: the entries changed between the two passes (a one-shot iterator?)');
  b.writeUInt32LE(crc32(b.subarray(INDEX_HEADER), crc32(b.subarray(0, 28))), 28);
  return b;
}

/**
 * The entries' words are read through a DataView in the loops over entries: its getUint32 is a V8 builtin,
 * cheap even before the JIT has compiled the loop (a backup's one index load per process runs mostly cold),
 * where Buffer's readUInt32LE is a JavaScript function that calls a checker (bench/README.md, session 19).
 */
function viewOf(b: Buffer): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Checks an index object's 32-byte header against the object's size; returns its pack and entry counts. */
export function indexHeader(b: Buffer, size: number, object: string): { packs: number; entries: number } {
  if (b.length < INDEX_HEADER || size < INDEX_HEADER || !b.subarray(0, 8).equals(INDEX_MAGIC)) throw corrupt(object, 'not an index object (bad magic or truncated)');
  if (b.readUInt32LE(8) !== INDEX_VERSION) throw unsupported(object, `index version ${b.readUInt32LE(8)} is not supported`);
  const p = b.readUInt32LE(12);
  const e = b.readUInt32LE(16);
  if (size !== INDEX_HEADER + p * INDEX_PACK_ID + e * INDEX_ENTRY) throw corrupt(object, `length ${size} does not match ${p} packs and ${e} entries (truncated?)`);
  return { packs: p, entries: e };
}

/**
 * The decoder of one index object of `size` bytes, fed in order: the header (to the constructor), the pack
 * table (table()), then the entries in runs of whole entries, each run given to checksum() and to visit()
 * (in either order); end() checks the checksum. visit() checks each entry (its pack number, its offset below
 * 2^53) before calling `fn` with it; the checksum covers everything and is known only at end(), so whatever
 * must not come from a damaged object waits for end().
 */
export class IndexDecoder {
  readonly packs: number;
  readonly entries: number;
  /** Where the pack table and the entries start in the object. */
  readonly tableAt = INDEX_HEADER;
  readonly entriesAt: number;
  private readonly packIds: string[] = [];
  private readonly storedCrc: number;
  private crc: number;

  constructor(
    head: Buffer,
    size: number,
    readonly object: string,
  ) {
    const h = indexHeader(head, size, object);
    this.packs = h.packs;
    this.entries = h.entries;
    this.entriesAt = INDEX_HEADER + h.packs * INDEX_PACK_ID;
    this.storedCrc = head.readUInt32LE(28);
    this.crc = crc32(head.subarray(0, 28));
  }

  /** The pack table: `packs` ids of 16 bytes. */
  table(t: Buffer): void {
    if (t.length !== this.packs * INDEX_PACK_ID) throw corrupt(this.object, 'pack table truncated');
    this.crc = crc32(t, this.crc);
    for (let i = 0; i < this.packs; i++) this.packIds.push(t.toString('hex', i * INDEX_PACK_ID, (i + 1) * INDEX_PACK_ID));
  }

  /** The pack table's ids in hex, by pack number (complete once table() has run). */
  get packTable(): readonly string[] {
    return this.packIds;
  }

  /** Adds bytes of the object after the pack table to the running checksum. */
  checksum(b: Buffer): void {
    this.crc = crc32(b, this.crc);
  }

  /**
   * Checks the `n` entries at `b[at…]`, entry number `first` onwards, and calls `fn` for each (when given).
   * A hot loop (an index can list hundreds of millions of entries): an error is made only once a check failed.
   */
  visit(b: Buffer, at: number, n: number, first: number, fn?: IndexVisitor): void {
    const v = viewOf(b);
    if (!fn) {
      for (let j = 0, o = at; j < n; j++, o += INDEX_ENTRY) this.check(v, b, o, first + j);
      return;
    }
    for (let j = 0, o = at; j < n; j++, o += INDEX_ENTRY) {
      const pack = this.check(v, b, o, first + j);
      fn(b, o, pack, v.getUint32(o + 28, true) * 0x100000000 + v.getUint32(o + 24, true), v.getUint32(o + 32, true), v.getUint32(o + 36, true));
    }
  }

  /**
   * visit() of entries check() has passed already (visitIndex: every entry is checked before the first is
   * visited): the same calls without checking each entry a second time.
   */
  visitChecked(b: Buffer, at: number, n: number, fn: IndexVisitor): void {
    const packIds = this.packIds;
    const v = viewOf(b);
    for (let j = 0, o = at; j < n; j++, o += INDEX_ENTRY) {
      fn(b, o, packIds[v.getUint32(o + 16, true)]!, v.getUint32(o + 28, true) * 0x100000000 + v.getUint32(o + 24, true), v.getUint32(o + 32, true), v.getUint32(o + 36, true));
    }
  }

  /** visit() for a visitor of ids and packs only, which skips reading the locations (about twice as fast). */
  visitIds(b: Buffer, at: number, n: number, first: number, fn: IdVisitor): void {
    const v = viewOf(b);
    for (let j = 0, o = at; j < n; j++, o += INDEX_ENTRY) fn(b, o, this.check(v, b, o, first + j));
  }

  /** Checks entry number `no` at `b[o…]` (its pack number, its offset below 2^53); returns its pack. */
  private check(v: DataView, b: Buffer, o: number, no: number): string {
    const pn = v.getUint32(o + 16, true);
    if (pn >= this.packs) throw corrupt(this.object, `entry ${no} names pack number ${pn} of ${this.packs}`);
    if (v.getUint32(o + 28, true) > 0x1fffff) safeU64(b, o + 24, this.object, 'blob offset');
    return this.packIds[pn]!;
  }

  /** Throws KSC_E_CORRUPT unless the checksum of everything fed matches the header's. */
  end(): void {
    if (this.crc !== this.storedCrc) throw corrupt(this.object, 'checksum mismatch');
  }
}

/**
 * Checks an index object in memory whole (magic, version, lengths, checksum, every entry's pack number and
 * offset), then calls `fn` once per entry with the object's buffer and the offset of the entry's id in it.
 * Nothing is visited when any check fails.
 */
export function visitIndex(b: Buffer, object: string, fn: IndexVisitor): void {
  const d = checkIndex(b, object);
  d.visitChecked(b, d.entriesAt, d.entries, fn);
}

/**
 * Checks an index object in memory whole, as visitIndex does, and returns its decoder: its `entries` entries
 * at `b[entriesAt…]` have passed every check, their pack numbers index `packTable`.
 */
export function checkIndex(b: Buffer, object: string): IndexDecoder {
  const d = new IndexDecoder(b, b.length, object);
  d.table(b.subarray(d.tableAt, d.entriesAt));
  d.checksum(b.subarray(d.entriesAt));
  d.end();
  d.visit(b, d.entriesAt, d.entries, 0);
  return d;
}

/** The entries of an index object in memory (see visitIndex). */
export function decodeIndex(b: Buffer, object: string): IndexEntry[] {
  const out: IndexEntry[] = [];
  visitIndex(b, object, (buf, at, pack, offset, length, rawLength) => out.push({ id: Buffer.from(buf.subarray(at, at + ID_BYTES)), pack, offset, length, rawLength }));
  return out;
}

/** How many entries index objects of these sizes hold (an upper bound on the distinct chunks). */
export function entriesIn(objects: { size: number }[]): number {
  return objects.reduce((s, o) => s + Math.max(0, Math.floor((o.size - INDEX_HEADER) / INDEX_ENTRY)), 0);
}
