/**
 * Deduplication: which chunks the repository holds already (formats/repository.md §9). Two ways behind one
 * interface: exact, with the index's chunk ids in memory (20 bytes an id), and through a Bloom filter when
 * that would be too large (dedupe-filter.ts: windows, and "maybe"s settled by reading the index objects).
 * Loading also adopts packs an interrupted writer uploaded but never indexed (§9 rule 6).
 */
import { isKscError } from '../../errors.js';
import type { IndexEntry } from '../../repo/index-object.js';
import { Repository, packKey, type ChunkIndex, type PackWriter } from '../../repo/repository.js';
import { mapLimit } from '../../util/concurrency.js';
import type { BitSet } from '../../util/bitset.js';
import { FilterDedupe } from './dedupe-filter.js';
import type { FrozenView } from './frozen-view.js';

/** How a backup deduplicates (BackupOptions.exactIds, filterBitsPerId; windowChunks, at least a batch). */
export interface DedupeSettings {
  exactIds: number;
  bitsPerId: number | undefined;
  window: number;
}

/** Where a chunk the backup just read stands: in the repository (or earlier in this backup), maybe, or new. */
export type Verdict = 'stored' | 'maybe' | 'new';

export interface Dedupe {
  readonly kind: 'exact' | 'filter';
  /**
   * The repository may hold the chunk whose 16-byte id is at `at` of `buf`: "no" is certain, "yes" only for
   * 'exact' (for a parent's chunks; no view is made per id).
   */
  mayHoldAt(buf: Buffer, at: number): boolean;
  /** mayHoldAt for every id but the zero id of `ids` (16 bytes each; `words`: the same as little-endian words). */
  mayHoldAll(ids: Buffer, words: Int32Array): boolean;
  /** An index object found damaged while loading, when that makes mayHoldAt() unfit to vouch for a parent. */
  readonly damagedIndex: string | null;
  /** For adoption: the index names the pack / takes an adopted entry. */
  hasPack(pack: string): boolean;
  add(e: IndexEntry): void;
  /** This backup's view for `more` chunks to read: itself, or a filter when the exact index would grow past `exactIds`. */
  fit(more: number, settings: DedupeSettings): Dedupe;
  /** Before the first pack: makes adopted entries findable; returns those the final index object must name. */
  start(repo: Repository, adopted: IndexEntry[]): Promise<IndexEntry[]>;
  /** The chunks to read, in windows; each ends with settleWindow(). */
  windows(read: BitSet): Iterable<Iterable<number>>;
  verdict(id: Buffer, writer: PackWriter): Verdict;
  /** Chunk `k` got the verdict "maybe": the frozen view keeps it until a settleWindow() decides. */
  defer(k: number, id: Buffer): void;
  /** The writer stored `id`. */
  stored(id: Buffer): void;
  /**
   * After a window (`last`: the final one): the chunks deferred whose ids the repository turned out not to
   * hold, to read again and store; those it holds are released from `view`.
   */
  settleWindow(writer: PackWriter, view: FrozenView | null, last: boolean): Promise<number[]>;
}

/** Deduplication against the index in memory. */
export class ExactDedupe implements Dedupe {
  readonly kind = 'exact';
  readonly damagedIndex = null;

  constructor(readonly index: ChunkIndex) {}

  mayHoldAt(buf: Buffer, at: number): boolean {
    return this.index.hasAt(buf, at);
  }

  mayHoldAll(_ids: Buffer, words: Int32Array): boolean {
    return this.index.hasAllNonZero(words);
  }

  hasPack(pack: string): boolean {
    return this.index.hasPack(pack);
  }

  add(e: IndexEntry): void {
    this.index.add(e);
  }

  fit(more: number, settings: DedupeSettings): Dedupe {
    return this.index.size + more > settings.exactIds ? FilterDedupe.of(this.index, more, settings) : this;
  }

  async start(_repo: Repository, adopted: IndexEntry[]): Promise<IndexEntry[]> {
    return adopted;
  }

  windows(read: BitSet): Iterable<Iterable<number>> {
    return [read];
  }

  verdict(id: Buffer, writer: PackWriter): Verdict {
    return this.index.hasAt(id, 0) || writer.has(id) ? 'stored' : 'new';
  }

  defer(): void {
    throw new Error('exact deduplication has no "maybe"');
  }

  stored(): void {}

  async settleWindow(): Promise<number[]> {
    return [];
  }
}

/**
 * What `repo` holds, for deduplication: exact when its index has at most `settings.exactIds` entries, else a filter
 * sized for `more` ids to come. Ids only (dedupe needs no locations). A damaged index object is skipped: the
 * packs only it named are adopted like orphans.
 */
export async function loadDedupe(repo: Repository, more: number, settings: DedupeSettings): Promise<Dedupe> {
  const objects = await repo.indexObjects();
  const entries = Repository.entriesIn(objects);
  // The objects just listed are the ones read (a second listing would cost a round trip more).
  // Sized for them up front: the table never grows by rehashing on the way (CPU, and 1.5× the memory at a peak).
  if (entries <= settings.exactIds) return new ExactDedupe(await repo.loadIndex(() => undefined, { locations: false, objects, expected: entries }));
  return FilterDedupe.load(repo, objects, entries + more, settings);
}

/** Adopts packs an interrupted writer uploaded but never indexed (§9 rule 6); `packs`: every pack's id. */
export async function adoptOrphans(repo: Repository, dedupe: Dedupe, packs: string[]): Promise<IndexEntry[]> {
  const adopted: IndexEntry[] = [];
  const orphans = packs.filter((id) => !dedupe.hasPack(id));
  await mapLimit(orphans, 4, async (id) => {
    try {
      const entries = await repo.readPackFooter(id);
      // Its writer was stopped somewhere after the rename, maybe before the name was synced: durable before an
      // index object of ours names it (§9 rule 1).
      await repo.store.syncObject?.(packKey(id));
      for (const e of entries) {
        const entry = { id: e.id, pack: id, offset: e.offset, length: e.length, rawLength: e.rawLength };
        adopted.push(entry);
        dedupe.add(entry);
      }
    } catch (e) {
      if (!isKscError(e, 'KSC_E_CORRUPT') && !isKscError(e, 'KSC_E_NOT_FOUND')) throw e; // a damaged orphan is prune's business
    }
  });
  return adopted;
}
