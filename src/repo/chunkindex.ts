/**
 * The union of a repository's index objects (formats/repository.md §6), in memory: chunk id → where its
 * blob lives. Backup, verify and prune hold the whole index, so its size per entry sets how much unique
 * data a repository can hold before they outgrow their memory bound (a restore keeps only its chunks').
 *
 * An open-addressing hash table in typed arrays: 36 bytes a slot (id 16, pack number 4, offset 8, two
 * lengths 8), at most 70% full; 20 bytes a slot without locations (a set of ids: what a backup needs to
 * dedupe, and what a restore needs to pick the index entries of one backup). A Map from hex strings to
 * location objects took ≈ 150 bytes of heap an entry (measured with 1 M entries) and a string conversion on
 * every lookup.
 *
 * Several copies of a chunk (§6: two backups that ran side by side, a resumed backup, an interrupted prune)
 * are all kept: the slot holds the first location added, and each further distinct location goes into an
 * overflow list (24 bytes a copy in growable typed arrays, plus one Map entry for each chunk that has any)
 * chained from its slot. The common single-copy case costs nothing more. A **copy handle** names one
 * location: the slot number for the first copy, `slots + n` for overflow copy `n`; like slot numbers it is
 * valid until the next add.
 */
import { randomInt } from 'node:crypto';
import { ID_BYTES } from '../hash/chunkid.js';
import { nativeOps } from '../io/native.js';
import { INDEX_ENTRY } from './constants.js';

export interface ChunkLocation {
  pack: string;
  offset: number;
  length: number;
  rawLength: number;
}

const MIN_SLOTS = 1024;
const HEX_ID = /^[0-9a-f]{32}$/;
/** Mixed into every slot number: ids made to collide in one process do not collide in another. */
const SEED = randomInt(0x7fffffff) | 1;
const MAX_LOAD = 0.7;

export class ChunkIndex {
  /** Index object ids read. */
  readonly objects: string[] = [];

  private readonly packNames: string[] = [];
  private readonly packNumbers = new Map<string, number>();
  /** The pack of the previous add and its number (an index object lists a pack's chunks together). */
  private lastPack: string | null = null;
  private lastPackNo = 0;
  private count = 0;
  private mask = 0;
  /** Four little-endian words of the id per slot. */
  private keys = new Uint32Array(0);
  /** Pack number + 1 per slot; 0 marks an empty slot. */
  private pack = new Uint32Array(0);
  private offset = new Float64Array(0);
  private length = new Uint32Array(0);
  private rawLength = new Uint32Array(0);
  /** Overflow copies (see the design notes): location, next copy (-1: none) and owning slot. */
  private ovPack = new Uint32Array(0);
  private ovOffset = new Float64Array(0);
  private ovLength = new Uint32Array(0);
  private ovRaw = new Uint32Array(0);
  private ovNext = new Int32Array(0);
  private ovOwner = new Uint32Array(0);
  private ovCount = 0;
  /** Slot → its first overflow copy, for the slots that have any. */
  private extra = new Map<number, number>();
  /** Where a hex id is decoded for a lookup. */
  private readonly scratch = Buffer.alloc(ID_BYTES);

  /** False: ids and packs only (20 bytes a slot), for a set of ids; get() and the blob accessors throw. */
  readonly locations: boolean;

  constructor(opts: { expected?: number; locations?: boolean } = {}) {
    this.locations = opts.locations ?? true;
    let slots = MIN_SLOTS;
    while (slots * MAX_LOAD < (opts.expected ?? 0)) slots *= 2;
    this.allocate(slots);
  }

  /** True when the 16-byte id at `at` of `buf` is present (no view made). */
  hasAt(buf: Buffer, at: number): boolean {
    const s = this.find(buf.readUInt32LE(at), buf.readUInt32LE(at + 4), buf.readUInt32LE(at + 8), buf.readUInt32LE(at + 12));
    return this.pack[s] !== 0;
  }

  /** Number of slots: slot numbers run from 0 to this (for per-slot marks kept beside the table). */
  get slots(): number {
    return this.mask + 1;
  }

  /** Number of distinct chunk ids. */
  get size(): number {
    return this.count;
  }

  /**
   * Adds a chunk's location. An id already present keeps its first location as the slot's; with locations,
   * a further distinct location (another pack or offset) is kept as another copy.
   */
  add(e: { id: Buffer; pack: string; offset: number; length: number; rawLength: number }): void {
    this.addAt(e.id, 0, e.pack, e.offset, e.length, e.rawLength);
  }

  /**
   * `add` with the id read from `buf` at `at` (no copy of it is kept). Throws a RangeError, and adds
   * nothing, when the 16 bytes at `at` do not lie inside `buf` (callers bound `at`; a byte read past the end
   * would be taken as 0 by the word arithmetic below).
   */
  addAt(buf: Buffer, at: number, pack: string, offset: number, length: number, rawLength: number): void {
    if (at >>> 0 !== at || at + ID_BYTES > buf.length) throw new RangeError(`chunk id at ${at} is outside a buffer of ${buf.length} bytes`);
    if (pack !== this.lastPack) {
      this.lastPack = pack;
      this.lastPackNo = this.packNumberOf(pack);
    }
    if (this.count + 1 > (this.mask + 1) * MAX_LOAD) this.allocate((this.mask + 1) * 2);
    // the id's four words, read without a call per word (cold code: see index-object.ts's viewOf)
    const w0 = (buf[at]! | (buf[at + 1]! << 8) | (buf[at + 2]! << 16) | (buf[at + 3]! << 24)) >>> 0;
    const w1 = (buf[at + 4]! | (buf[at + 5]! << 8) | (buf[at + 6]! << 16) | (buf[at + 7]! << 24)) >>> 0;
    const w2 = (buf[at + 8]! | (buf[at + 9]! << 8) | (buf[at + 10]! << 16) | (buf[at + 11]! << 24)) >>> 0;
    const w3 = (buf[at + 12]! | (buf[at + 13]! << 8) | (buf[at + 14]! << 16) | (buf[at + 15]! << 24)) >>> 0;
    const s = this.find(w0, w1, w2, w3);
    if (this.pack[s] !== 0) {
      if (this.locations) this.addCopy(s, this.lastPackNo + 1, offset, length, rawLength);
      return;
    }
    this.place(s, w0, w1, w2, w3, this.lastPackNo + 1, offset, length, rawLength);
    this.count++;
  }

  /**
   * `addAt` for the `n` entries of an index object at `b[at…]` (formats/repository.md §6: 40 bytes each, the
   * pack number at +16 into `packs`, the object's pack table; checked by the caller, IndexDecoder.visit), in
   * one loop: a backup's one index load per process runs mostly before V8 has compiled anything, where a call
   * per entry through a visitor costs ≈ 14 000 instructions (bench/README.md, session 22).
   */
  addEntries(b: Buffer, at: number, n: number, packs: readonly string[]): void {
    if (at >>> 0 !== at || at + n * INDEX_ENTRY > b.length) throw new RangeError(`${n} index entries at ${at} are outside a buffer of ${b.length} bytes`);
    const plusOne = new Uint32Array(packs.length);
    for (let i = 0; i < packs.length; i++) plusOne[i] = this.packNumberOf(packs[i]!) + 1;
    const add = this.locations ? undefined : nativeOps()?.idTableAdd;
    if (add) {
      // In C (native/kscinc_idtable.c), on this table: stops when it is full, grown here, then goes on.
      const state = new Uint32Array([this.count, 0]);
      const entries = new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
      for (let j = 0; ;) {
        state[0] = this.count;
        state[1] = Math.floor((this.mask + 1) * MAX_LOAD);
        let done: number;
        try {
          done = add(this.keys, this.pack, SEED, state, entries, at + j * INDEX_ENTRY, n - j, plusOne);
        } finally {
          this.count = state[0]!; // also when it throws part way: the ids added before stay, and count them
        }
        j += done;
        if (j >= n) return;
        this.allocate((this.mask + 1) * 2);
      }
    }
    const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
    const withLocations = this.locations;
    for (let j = 0, o = at; j < n; j++, o += INDEX_ENTRY) {
      if (this.count + 1 > (this.mask + 1) * MAX_LOAD) this.allocate((this.mask + 1) * 2);
      const w0 = v.getUint32(o, true);
      const w1 = v.getUint32(o + 4, true);
      const w2 = v.getUint32(o + 8, true);
      const w3 = v.getUint32(o + 12, true);
      const packPlusOne = plusOne[v.getUint32(o + 16, true)];
      if (packPlusOne === undefined) throw new RangeError(`index entry ${j} at ${o} names pack number ${v.getUint32(o + 16, true)} of ${packs.length}`);
      const offset = withLocations ? v.getUint32(o + 28, true) * 0x100000000 + v.getUint32(o + 24, true) : 0;
      const s = this.find(w0, w1, w2, w3);
      if (this.pack[s] !== 0) {
        if (withLocations) this.addCopy(s, packPlusOne, offset, v.getUint32(o + 32, true), v.getUint32(o + 36, true));
        continue;
      }
      this.place(s, w0, w1, w2, w3, packPlusOne, offset, withLocations ? v.getUint32(o + 32, true) : 0, withLocations ? v.getUint32(o + 36, true) : 0);
      this.count++;
    }
  }

  /**
   * True when every id of `words` but the zero id is present: `words` holds ids back to back, four words each
   * (a chunk list's segment, ChunkList.everySegment). One loop, for the same reason as addEntries: a parent's
   * whole list is looked up once per backup, in a cold process.
   */
  hasAllNonZero(words: Int32Array): boolean {
    const hasAll = nativeOps()?.idTableHasAll;
    if (hasAll) return hasAll(this.keys, this.pack, SEED, new Uint32Array(words.buffer, words.byteOffset, words.length));
    const keys = this.keys;
    const pack = this.pack;
    const mask = this.mask;
    for (let o = 0; o + 3 < words.length; o += 4) {
      const w0 = words[o]! >>> 0;
      const w1 = words[o + 1]! >>> 0;
      const w2 = words[o + 2]! >>> 0;
      const w3 = words[o + 3]! >>> 0;
      if ((w0 | w1 | w2 | w3) === 0) continue;
      // find(), inline: this loop is the one V8 compiles (on-stack), not a call per id
      let s = (Math.imul(w0 ^ w3 ^ SEED, 0x9e3779b1) ^ Math.imul(w1 ^ w2, 0x85ebca6b)) & mask;
      for (;;) {
        if (pack[s] === 0) return false;
        const k = s * 4;
        if (keys[k] === w0 && keys[k + 1] === w1 && keys[k + 2] === w2 && keys[k + 3] === w3) break;
        s = (s + 1) & mask;
      }
    }
    return true;
  }

  /** The number of `pack` (added to the pack table when new). */
  private packNumberOf(pack: string): number {
    let n = this.packNumbers.get(pack);
    if (n === undefined) {
      n = this.packNames.length;
      this.packNames.push(pack);
      this.packNumbers.set(pack, n);
    }
    return n;
  }

  /** Keeps another location of the chunk in slot `s`, unless it is one already kept. */
  private addCopy(s: number, packPlusOne: number, offset: number, length: number, rawLength: number): void {
    if (this.pack[s] === packPlusOne && this.offset[s] === offset) return;
    let last = -1;
    for (let c = this.extra.get(s) ?? -1; c >= 0; c = this.ovNext[c]!) {
      if (this.ovPack[c] === packPlusOne && this.ovOffset[c] === offset) return;
      last = c;
    }
    if (this.ovCount === this.ovPack.length) this.growOverflow();
    const c = this.ovCount++;
    this.ovPack[c] = packPlusOne;
    this.ovOffset[c] = offset;
    this.ovLength[c] = length;
    this.ovRaw[c] = rawLength;
    this.ovNext[c] = -1;
    this.ovOwner[c] = s;
    if (last < 0) this.extra.set(s, c);
    else this.ovNext[last] = c;
  }

  private growOverflow(): void {
    const n = Math.max(64, this.ovPack.length * 2);
    const grow = <T extends Uint32Array | Int32Array | Float64Array>(a: T, make: (n: number) => T): T => {
      const b = make(n);
      b.set(a as never);
      return b;
    };
    this.ovPack = grow(this.ovPack, (k) => new Uint32Array(k));
    this.ovOffset = grow(this.ovOffset, (k) => new Float64Array(k));
    this.ovLength = grow(this.ovLength, (k) => new Uint32Array(k));
    this.ovRaw = grow(this.ovRaw, (k) => new Uint32Array(k));
    this.ovNext = grow(this.ovNext, (k) => new Int32Array(k));
    this.ovOwner = grow(this.ovOwner, (k) => new Uint32Array(k));
  }

  /** Number of locations kept beyond the first of each chunk. */
  get extraCopies(): number {
    return this.ovCount;
  }

  /** True when slot `s` holds a chunk. */
  hasSlot(s: number): boolean {
    return this.pack[s] !== 0;
  }

  /** How many locations the chunk in slot `s` has. */
  copyCount(s: number): number {
    let n = 1;
    for (let c = this.extra.get(s) ?? -1; c >= 0; c = this.ovNext[c]!) n++;
    return n;
  }

  /** The copy handles of the chunk in slot `s`, first location first. */
  copies(s: number): number[] {
    const out = [s];
    const base = this.mask + 1;
    for (let c = this.extra.get(s) ?? -1; c >= 0; c = this.ovNext[c]!) out.push(base + c);
    return out;
  }

  /** The slot of the chunk a copy handle belongs to. */
  slotOfCopy(h: number): number {
    return h <= this.mask ? h : this.ovOwner[h - this.mask - 1]!;
  }

  /** The location of copy handle `h`. */
  location(h: number): ChunkLocation {
    return { pack: this.packName(h), offset: this.blobOffset(h), length: this.blobLength(h), rawLength: this.rawLengthAt(h) };
  }

  get(id: Buffer | string): ChunkLocation | undefined {
    this.needLocations();
    const s = this.slotOf(id);
    if (s < 0) return undefined;
    return { pack: this.packName(s), offset: this.offset[s]!, length: this.length[s]!, rawLength: this.rawLength[s]! };
  }

  has(id: Buffer | string): boolean {
    return this.slotOf(id) >= 0;
  }

  // A slot names one chunk for as long as nothing is added (adding may move every entry). Planners that
  // handle millions of chunks keep slot numbers (4 bytes) instead of location objects.

  /** The id of the chunk in slot `s` or of copy handle `s` (a new buffer). */
  idAt(h: number): Buffer {
    const s = this.slotOfCopy(h);
    const b = Buffer.allocUnsafe(ID_BYTES);
    for (let i = 0; i < 4; i++) b.writeUInt32LE(this.keys[s * 4 + i]!, i * 4);
    return b;
  }

  /** True when some entry added lives in `pack`. */
  hasPack(pack: string): boolean {
    return this.packNumbers.has(pack);
  }

  /** The packs of the entries added, by pack number. */
  packList(): readonly string[] {
    return this.packNames;
  }

  /** The pack holding the chunk in slot `s` (a number per pack, in the order packs were first added). */
  packNumber(h: number): number {
    return (h <= this.mask ? this.pack[h]! : this.ovPack[h - this.mask - 1]!) - 1;
  }

  /** The pack of slot or copy handle `h` (the blob accessors below take either too). */
  packName(h: number): string {
    return this.packNames[this.packNumber(h)]!;
  }

  blobOffset(h: number): number {
    this.needLocations();
    return h <= this.mask ? this.offset[h]! : this.ovOffset[h - this.mask - 1]!;
  }

  blobLength(h: number): number {
    this.needLocations();
    return h <= this.mask ? this.length[h]! : this.ovLength[h - this.mask - 1]!;
  }

  rawLengthAt(h: number): number {
    this.needLocations();
    return h <= this.mask ? this.rawLength[h]! : this.ovRaw[h - this.mask - 1]!;
  }

  private needLocations(): void {
    if (!this.locations) throw new Error('ChunkIndex: made without locations (a set of ids)');
  }

  /** The slot holding `id`, or -1. A string is the id in hex; anything else is never present. */
  slotOf(id: Buffer | string): number {
    let b: Buffer;
    if (typeof id === 'string') {
      if (!HEX_ID.test(id)) return -1;
      this.scratch.write(id, 0, 'hex');
      b = this.scratch;
    } else {
      if (id.length !== ID_BYTES) return -1;
      b = id;
    }
    const s = this.find(b.readUInt32LE(0), b.readUInt32LE(4), b.readUInt32LE(8), b.readUInt32LE(12));
    return this.pack[s] === 0 ? -1 : s;
  }

  /** The slot holding the id, or the empty slot where it would go (linear probing). */
  private find(w0: number, w1: number, w2: number, w3: number): number {
    const keys = this.keys;
    // Ids are hashes already; mixing all four words with a per-process seed still spreads ids made alike
    // on purpose.
    let s = (Math.imul(w0 ^ w3 ^ SEED, 0x9e3779b1) ^ Math.imul(w1 ^ w2, 0x85ebca6b)) & this.mask;
    for (;;) {
      if (this.pack[s] === 0) return s;
      const k = s * 4;
      if (keys[k] === w0 && keys[k + 1] === w1 && keys[k + 2] === w2 && keys[k + 3] === w3) return s;
      s = (s + 1) & this.mask;
    }
  }

  private place(s: number, w0: number, w1: number, w2: number, w3: number, packPlusOne: number, offset: number, length: number, rawLength: number): void {
    const k = s * 4;
    this.keys[k] = w0;
    this.keys[k + 1] = w1;
    this.keys[k + 2] = w2;
    this.keys[k + 3] = w3;
    this.pack[s] = packPlusOne;
    if (!this.locations) return;
    this.offset[s] = offset;
    this.length[s] = length;
    this.rawLength[s] = rawLength;
  }

  /** (Re)builds the table with `slots` slots (a power of two), re-inserting what it held. */
  private allocate(slots: number): void {
    const old = { keys: this.keys, pack: this.pack, offset: this.offset, length: this.length, rawLength: this.rawLength };
    this.keys = new Uint32Array(slots * 4);
    this.pack = new Uint32Array(slots);
    const n = this.locations ? slots : 0;
    this.offset = new Float64Array(n);
    this.length = new Uint32Array(n);
    this.rawLength = new Uint32Array(n);
    this.mask = slots - 1;
    const extra = this.extra;
    this.extra = new Map();
    for (let s = 0; s < old.pack.length; s++) {
      if (old.pack[s] === 0) continue;
      const k = s * 4;
      const w0 = old.keys[k]!;
      const w1 = old.keys[k + 1]!;
      const w2 = old.keys[k + 2]!;
      const w3 = old.keys[k + 3]!;
      const ns = this.find(w0, w1, w2, w3);
      this.place(ns, w0, w1, w2, w3, old.pack[s]!, old.offset[s] ?? 0, old.length[s] ?? 0, old.rawLength[s] ?? 0);
      const first = extra.get(s);
      if (first !== undefined) {
        this.extra.set(ns, first);
        for (let c = first; c >= 0; c = this.ovNext[c]!) this.ovOwner[c] = ns;
      }
    }
  }
}
