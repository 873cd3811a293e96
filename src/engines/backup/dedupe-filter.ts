/**
 * Deduplication through a Bloom filter, for an index too large to hold exactly (formats/repository.md §9,
 * "Deduplicating against a large index"). The filter's "no" is certain; a "maybe" keeps the chunk in the
 * frozen view until the index objects settle it: held ids are looked up while streaming every index object,
 * and the chunks not found are read again and stored. The disk is read in windows, each ending with the
 * writer's chunks indexed, so the writer's memory is one window's.
 */
import { ID_BYTES } from '../../hash/chunkid.js';
import type { IndexEntry } from '../../repo/index-object.js';
import { BloomFilter } from '../../repo/bloom.js';
import { ChunkIndex, type PackWriter, type Repository } from '../../repo/repository.js';
import type { BitSet } from '../../util/bitset.js';
import { groupsOf } from './chunk-sets.js';
import type { Dedupe, DedupeSettings, Verdict } from './dedupe.js';
import type { FrozenView } from './frozen-view.js';

/** Maybes kept before they are settled (at most; fewer with smaller windows). */
const MAYBE_LIMIT = 1 << 16;

/** The repository's index as a filter of its chunk ids and the set of packs it names. */
class IndexFilter {
  readonly bloom: BloomFilter;
  private readonly packs = new ChunkIndex({ locations: false });
  private readonly scratch = Buffer.alloc(16);

  constructor(expected: number, bitsPerId?: number) {
    this.bloom = new BloomFilter(expected, bitsPerId);
  }

  addPack(pack: string): void {
    this.scratch.write(pack, 'hex');
    if (!this.packs.hasAt(this.scratch, 0)) this.packs.addAt(this.scratch, 0, '', 0, 0, 0);
  }

  hasPack(pack: string): boolean {
    this.scratch.write(pack, 'hex');
    return this.packs.hasAt(this.scratch, 0);
  }
}

/** Chunks the filter may know, with their ids (packed, ID_BYTES each), kept until settled. */
class Maybes {
  ks: number[] = [];
  ids = Buffer.alloc(0);

  add(k: number, id: Buffer): void {
    const at = this.ks.length * ID_BYTES;
    if (at + ID_BYTES > this.ids.length) {
      const grown = Buffer.allocUnsafe(Math.max(1024 * ID_BYTES, this.ids.length * 2));
      this.ids.copy(grown, 0, 0, at);
      this.ids = grown;
    }
    id.copy(this.ids, at, 0, ID_BYTES);
    this.ks.push(k);
  }
}

export class FilterDedupe implements Dedupe {
  readonly kind = 'filter';
  damagedIndex: string | null = null;
  private readonly filter: IndexFilter;
  private readonly maybes = new Maybes();
  /** Settling reads every index object, so it waits until this many maybes are kept (or the end). */
  private readonly maybeLimit: number;
  private readonly window: number;
  /** Where the maybes are settled (set by start()). */
  private repo: Repository | null = null;

  private constructor(expected: number, settings: DedupeSettings) {
    this.filter = new IndexFilter(expected, settings.bitsPerId);
    this.window = settings.window;
    this.maybeLimit = Math.min(MAYBE_LIMIT, settings.window);
  }

  /** From an exact index, for `more` ids still to come. */
  static of(index: ChunkIndex, more: number, settings: DedupeSettings): FilterDedupe {
    const d = new FilterDedupe(index.size + more, settings);
    for (const p of index.packList()) d.filter.addPack(p);
    for (let s = 0; s < index.slots; s++) if (index.packNumber(s) >= 0) d.filter.bloom.addAt(index.idAt(s), 0);
    return d;
  }

  /**
   * From the index objects, streamed in ranges (flat memory). Ids go in as seen (one from a damaged object
   * only makes a false "maybe"); packs once their object checks out (so a damaged object's packs are
   * adopted as orphans). A damaged object's ids may be in the filter already when its checksum fails, so
   * the filter then cannot vouch for a parent (damagedIndex).
   */
  static async load(repo: Repository, objects: { id: string; size: number }[], expected: number, settings: DedupeSettings): Promise<FilterDedupe> {
    const d = new FilterDedupe(expected, settings);
    const f = d.filter;
    await repo.readIndex(
      objects,
      () => {
        const packs = new Set<string>();
        return {
          visit: (b, at, pack) => {
            f.bloom.addAt(b, at);
            packs.add(pack);
          },
          done: () => packs.forEach((p) => f.addPack(p)),
        };
      },
      (key) => {
        d.damagedIndex ??= key;
      },
      { inRanges: true },
    );
    return d;
  }

  mayHoldAt(buf: Buffer, at: number): boolean {
    return this.filter.bloom.mayHaveAt(buf, at);
  }

  mayHoldAll(ids: Buffer, words: Int32Array): boolean {
    for (let o = 0; o + 3 < words.length; o += 4) {
      if ((words[o]! | words[o + 1]! | words[o + 2]! | words[o + 3]!) !== 0 && !this.mayHoldAt(ids, o * 4)) return false;
    }
    return true;
  }

  hasPack(pack: string): boolean {
    return this.filter.hasPack(pack);
  }

  add(e: IndexEntry): void {
    this.filter.bloom.addAt(e.id, 0);
    this.filter.addPack(e.pack);
  }

  fit(): Dedupe {
    return this;
  }

  /** The filter's "maybe" is settled by reading the index objects, adopted orphans' among them. */
  async start(repo: Repository, adopted: IndexEntry[]): Promise<IndexEntry[]> {
    this.repo = repo;
    if (adopted.length > 0) await repo.putIndex(adopted);
    return [];
  }

  windows(read: BitSet): Iterable<number[]> {
    return groupsOf(read, this.window);
  }

  verdict(id: Buffer, writer: PackWriter): Verdict {
    if (writer.has(id)) return 'stored';
    return this.mayHoldAt(id, 0) ? 'maybe' : 'new';
  }

  defer(k: number, id: Buffer): void {
    this.maybes.add(k, id);
  }

  stored(id: Buffer): void {
    this.filter.bloom.addAt(id, 0);
  }

  async settleWindow(writer: PackWriter, view: FrozenView | null, last: boolean): Promise<number[]> {
    if (!last && this.maybes.ks.length < this.maybeLimit) {
      await writer.flushIndex();
      return [];
    }
    return this.settle(writer, view);
  }

  /**
   * The new chunks' packs land and an index object names them, then the index objects say which maybes are
   * stored; the others are returned, to be read again from the frozen view and stored.
   */
  private async settle(writer: PackWriter, view: FrozenView | null): Promise<number[]> {
    await writer.flushIndex();
    const m = this.maybes;
    if (m.ks.length === 0) return [];
    const found = await this.findStored();
    const again: number[] = [];
    for (let j = 0; j < m.ks.length; j++) {
      const k = m.ks[j]!;
      if (found.hasAt(m.ids, j * ID_BYTES)) view?.release(k);
      else again.push(k);
    }
    m.ks = [];
    return again;
  }

  /**
   * The maybes' ids that an index object names. A chunk counts as stored once an index object naming it has
   * passed its checks (a damaged object's chunks are stored again).
   */
  private async findStored(): Promise<ChunkIndex> {
    const m = this.maybes;
    const asked = new ChunkIndex({ locations: false, expected: m.ks.length });
    for (let j = 0; j < m.ks.length; j++) asked.addAt(m.ids, j * ID_BYTES, '', 0, 0, 0);
    const found = new ChunkIndex({ locations: false });
    const repo = this.repo!;
    await repo.readIndex(
      await repo.indexObjects(),
      () => {
        const mine: Buffer[] = [];
        return {
          visit: (b, at) => void (asked.hasAt(b, at) && mine.push(Buffer.from(b.subarray(at, at + ID_BYTES)))),
          done: () => mine.forEach((id) => found.hasAt(id, 0) || found.addAt(id, 0, '', 0, 0, 0)),
        };
      },
      () => undefined,
      { inRanges: true },
    );
    return found;
  }
}
