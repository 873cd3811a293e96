/**
 * Chunks of a live restore's backing fetched from the repository and filled into the overlay above
 * (src/image/repobacking.ts, formats/ksc_inc.md §4.2 rules 2 and 3): concurrent reads of one chunk share one
 * fetch, and the verified chunk stays in memory until its fill is done, so no read between fetch and fill
 * fetches it again. Positions holding the same chunk id (repo-dups.ts) share its fetch and are filled from
 * it, up to DUP_FILLS a fetch: a disk that repeats a chunk fetches and decodes it once, as a restore does.
 * Bulk fetches (fetchAll: readahead and the pull) read as a restore reads, coalesced ranged reads of the
 * packs decoded in the worker pool, and share each chunk with the readers that reach it meanwhile.
 */
import { KscError, isKscError } from '../errors.js';
import { SharedSlot } from '../compress/pool.js';
import type { Read } from '../repo/fetch.js';
import { planBulkReads } from './bulk-plan.js';
import { mapLimit } from '../util/concurrency.js';
import { BitSet } from '../util/bitset.js';
import { BLOB_HEADER } from '../compress/codec.js';
import type { Manifest } from '../repo/manifest.js';
import type { RepoChunks } from './repo-chunks.js';
import { DuplicateChunks, slotFinder } from './repo-dups.js';

export type FillFn = (offset: number, data: Buffer) => Promise<void>;

export interface FetchAllOptions {
  /** Coalesced reads in flight (default 4). */
  concurrency?: number;
  /** Bytes of pack a coalesced read spans at most (default 4 MiB). */
  maxRead?: number;
  /** Called once chunk `k` is verified and filled (or found already held). */
  onChunk?: (k: number) => void;
  /** Awaited before each coalesced read with its length (a throttle); throwing stops the fetch. */
  beforeRead?: (bytes: number) => Promise<void>;
  /** Called when a coalesced read whose `beforeRead` returned has ended, however it ended. */
  afterRead?: () => void;
  /** Readahead: its decoding waits while a reader's own chunk is decoding (RepoChunks.readUnpacked). */
  background?: boolean;
}

/** A chunk of a bulk fetch that readers may wait for: its data once verified (a view until `copyOut`). */
interface Waiting {
  data: Buffer | null;
  waiters: { resolve: (b: Buffer) => void; reject: (e: unknown) => void }[];
}

export class ChunkFills {
  /** The copy-on-read fill of the overlay above (a writable open), or null. */
  fill: FillFn | null = null;
  /** Chunk position → its verified data, from the start of its fetch until it is filled (or returned). */
  private readonly inflight = new Map<number, Promise<Buffer>>();
  /** Chunk position → its own fetch from the repository, while it runs (positions holding the same chunk share it). */
  private readonly fetching = new Map<number, Promise<Buffer>>();
  private readonly fills = new Set<Promise<void>>();
  /** Chunks of a bulk fetch (fetchAll) whose read has started and whose fill is not done. */
  private readonly bulk = new Map<number, Waiting>();
  /** Chunks filled into the overlay (no bulk fetch reads them again). */
  /** A bit set: V8 caps a Set at 2^24 members, a 1 TiB disk of 64 KiB chunks. */
  private readonly filledChunks: BitSet;
  /** Positions holding the same chunk (filled from one fetch: `DUP_FILLS`), built once the index is loaded. */
  private readonly dups = new DuplicateChunks();
  private dupsStarted = false;
  /** Slots of bulk reads kept for the next fetchAll (fresh shared memory per read cost page faults and zeroing). */
  private readonly bulkSlots: SharedSlot[] = [];
  private readonly chunkSize: number;

  constructor(
    private readonly name: string,
    private readonly src: RepoChunks,
    private readonly manifest: Manifest,
    /** Whether chunk k needs no fetch (a zero chunk, or the local base's). */
    private readonly noFetch: (k: number) => boolean,
    private readonly closed: () => boolean,
  ) {
    this.chunkSize = manifest.chunkSize;
    this.filledChunks = new BitSet(manifest.ids.length);
  }

  /** Whether chunk k is filled, being fetched or in a bulk read (nothing to start for it). */
  held(k: number): boolean {
    return this.filledChunks.has(k) || this.inflight.has(k) || this.bulk.has(k);
  }

  /** Up to DUP_FILLS other positions holding chunk k's data that are not local and not coming yet. */
  duplicatesOf(k: number): number[] {
    if (!this.fill || !this.dups.ready) return [];
    return this.dups.others(k, DUP_FILLS, (j) => !this.filledChunks.has(j) && !this.inflight.has(j) && !this.bulk.has(j));
  }

  /** Whether another position holding chunk k's data is being fetched chunk by chunk (its fetch fills k too). */
  twinFetching(k: number): boolean {
    return this.fetching.size > 0 && this.dups.others(k, 1, (j) => this.fetching.has(j)).length > 0;
  }

  /** Builds the map of positions sharing a chunk once, in the background, when the index is loaded. */
  private startDuplicates(): void {
    if (this.dupsStarted || !this.fill) return;
    this.dupsStarted = true;
    const ids = this.manifest.ids;
    this.src
      .loadIndex()
      .then((index) =>
        this.dups.build(
          ids.length,
          index.slots,
          (k) => !this.noFetch(k),
          slotFinder(index, (k) => ids.view(k)),
          () => this.closed(),
        ),
      )
      .catch(() => (this.dupsStarted = false));
  }

  /** Chunk `k`'s verified data: one fetch for concurrent readers, kept until the overlay has filled it. */
  chunk(k: number, joined = false): Promise<Buffer> {
    const have = this.inflight.get(k) ?? this.fromBulk(k);
    if (have) {
      this.src.stats.chunksShared++;
      return joined ? have : this.ownWait(k, have);
    }
    this.startDuplicates();
    // Another position holding the same chunk being fetched: its fetch serves this one too.
    const twin = this.dups.others(k, DUP_FILLS, (j) => this.fetching.has(j) || this.bulk.has(j))[0];
    let src: Promise<Buffer>;
    if (twin !== undefined) {
      this.src.stats.chunksShared++;
      src = this.fetching.get(twin) ?? this.fromBulk(twin)!;
    } else {
      src = this.src.fetch(k);
      this.fetching.set(k, src);
      const done = (): void => void this.fetching.delete(k);
      src.then(done, done);
    }
    const p: Promise<Buffer> = src.then(
      (data) => {
        const fill = this.fill;
        if (fill && !this.closed()) {
          // The positions holding the same chunk, filled from this one fetch and shared with their readers.
          const same = twin === undefined ? this.duplicatesOf(k) : [];
          for (const j of same) this.inflight.set(j, p);
          for (const j of [k, ...same]) {
            const f = fill(j * this.chunkSize, data)
              .catch(() => undefined)
              .finally(() => {
                this.filledChunks.add(j);
                this.inflight.delete(j);
                this.fills.delete(f);
              });
            this.fills.add(f);
          }
          this.src.stats.duplicatesFilled += same.length;
        } else this.inflight.delete(k);
        return data;
      },
      (e: unknown) => {
        this.inflight.delete(k);
        throw e;
      },
    );
    this.inflight.set(k, p);
    return p;
  }

  /**
   * A fetch started by another reader or the pull, joined: when it gives up on an unreachable repository
   * (its live timeout ran from its own first failure, perhaps long before this read), this read fetches once
   * on its own, with a wait of its own (formats/ksc_inc.md §4.2 rule 7).
   */
  private ownWait(k: number, shared: Promise<Buffer>): Promise<Buffer> {
    return shared.catch((e: unknown) => {
      if (!isKscError(e, 'KSC_E_UNAVAILABLE') || this.closed()) throw e;
      return this.chunk(k, true);
    });
  }

  /** Chunk k's data from a bulk fetch whose read has started (a copy: the read's buffers are reused), or null. */
  private fromBulk(k: number): Promise<Buffer> | null {
    const w = this.bulk.get(k);
    if (!w) return null;
    if (w.data) return Promise.resolve(Buffer.from(w.data));
    return new Promise((resolve, reject) => w.waiters.push({ resolve, reject }));
  }

  /**
   * Fetches chunks `ks` the way a restore reads (src/repo/fetch.ts): their blobs sorted by pack and offset,
   * coalesced into ranged reads of up to `maxRead` bytes, several in flight, decoded and checked in the
   * worker pool, each verified chunk filled into the overlay (awaited: a read's buffers are reused only
   * after its fills) before `onChunk`. A chunk whose read has started is shared with readers (`chunk`);
   * one that a reader fetched and filled meanwhile, or is fetching, is left out when its read starts. A
   * read that fails its checks falls back to the chunk-by-chunk path (other copies). Needs a fill (a
   * writable open).
   */
  async fetchAll(ks: number[], opts: FetchAllOptions = {}): Promise<void> {
    const fill = this.fill;
    if (!fill) throw new KscError('KSC_E_READ_ONLY', `${this.name}: fetching into the image needs it open for writing`);
    this.startDuplicates();
    const index = await this.src.loadIndex();
    const plan = planBulkReads(
      ks.filter((k) => !this.noFetch(k)),
      index,
      (k) => Buffer.from(this.manifest.ids.view(k)),
      (k, id) => this.src.notIndexed(k, id),
      opts.maxRead ?? 4 * 1024 * 1024,
    );
    const outBytes = Math.max(plan.outBytes, BLOB_HEADER);
    await mapLimit(plan.reads, Math.max(1, opts.concurrency ?? 4), async (r) => {
      await opts.beforeRead?.(r.length);
      try {
        if (this.closed()) throw new KscError('KSC_E_CLOSED', `${this.name}: closed`);
        const slot = this.takeBulkSlot(plan.inBytes, outBytes);
        try {
          await this.bulkRead(r, plan.positions, slot, fill, opts);
        } finally {
          this.giveBulkSlot(slot);
        }
      } finally {
        opts.afterRead?.();
      }
    });
  }

  /** A free bulk-read slot with room for `inBytes` read and `outBytes` decoded, or a new one. */
  private takeBulkSlot(inBytes: number, outBytes: number): SharedSlot {
    const i = this.bulkSlots.findIndex((s) => s.input.length >= inBytes && s.output.length >= outBytes);
    if (i >= 0) return this.bulkSlots.splice(i, 1)[0]!;
    // Readahead's reads are small: room for a few more chunks than asked, so the next ones fit as well.
    const grow = (n: number): number => (n <= BULK_SLOT_KEEP / 2 ? Math.max(n, Math.min(2 * n, BULK_SLOT_KEEP / 2)) : n);
    return new SharedSlot(grow(inBytes), grow(outBytes));
  }

  /** Keeps a few slots of readahead's size for the next fetch (readahead runs one fetchAll per miss). */
  private giveBulkSlot(slot: SharedSlot): void {
    if (this.bulkSlots.length < 4 && slot.input.length + slot.output.length <= BULK_SLOT_KEEP && !this.closed()) this.bulkSlots.push(slot);
  }

  /**
   * One coalesced read of fetchAll: at its start it leaves out what readers filled or are fetching and
   * shares the rest (`bulk`); unpacks and checks every blob, falling back to other copies chunk by chunk
   * when the read is damaged; fills each chunk into the overlay, then answers its waiters.
   */
  private async bulkRead(r: Read, positions: number[][], slot: SharedSlot, fill: FillFn, opts: FetchAllOptions): Promise<void> {
    // Positions whose chunk a twin is fetching chunk by chunk are left to that fetch (it fills them too).
    const twins: Promise<void>[] = [];
    const items = r.items.filter((it) => {
      const ps: number[] = [];
      for (const k of positions[it.from!]!) {
        if (this.filledChunks.has(k) || this.inflight.has(k) || this.bulk.has(k)) opts.onChunk?.(k);
        else if (this.twinFetching(k)) twins.push(this.afterTwin(k, opts));
        else ps.push(k);
      }
      positions[it.from!] = ps;
      return ps.length > 0;
    });
    const waited = Promise.all(twins);
    waited.catch(() => undefined);
    if (items.length === 0) return waited.then(() => undefined);
    const mine = items.flatMap((it) => positions[it.from!]!);
    for (const k of mine) this.bulk.set(k, { data: null, waiters: [] });
    try {
      const res = await this.src.readUnpacked(r, items, positions, slot, opts.background);
      await Promise.all(
        items.map(async (it, i) => {
          const x = res?.[i];
          const data = x && x.ok ? x.data : await this.src.fetch(positions[it.from!]![0]!);
          if (x && x.ok) this.src.stats.chunksFetched++;
          await Promise.all(positions[it.from!]!.map((k) => this.fillBulk(k, data, fill, opts)));
        }),
      );
      await waited;
    } catch (e) {
      for (const k of mine) {
        const w = this.bulk.get(k);
        if (!w) continue;
        this.bulk.delete(k);
        for (const q of w.waiters.splice(0)) q.reject(e);
      }
      throw e;
    }
  }

  /** Chunk k, whose twin was being fetched chunk by chunk: filled by that fetch, or else fetched now. */
  private async afterTwin(k: number, opts: FetchAllOptions): Promise<void> {
    const twin = this.dups.others(k, 1, (j) => this.fetching.has(j))[0];
    await (twin === undefined ? undefined : this.fetching.get(twin))?.catch(() => undefined);
    // That fetch marked k in flight (DUP_FILLS) unless it failed or k was past its limit.
    if (!this.filledChunks.has(k) && !this.inflight.has(k) && !this.bulk.has(k)) await this.chunk(k);
    opts.onChunk?.(k);
  }

  /** Fills chunk k from a bulk read: waiters get the data at once, the fill is awaited before the next use. */
  private async fillBulk(k: number, data: Buffer, fill: FillFn, opts: FetchAllOptions): Promise<void> {
    const w = this.bulk.get(k)!;
    w.data = data;
    for (const q of w.waiters.splice(0)) q.resolve(Buffer.from(data));
    const f = fill(k * this.chunkSize, data);
    this.fills.add(f);
    try {
      await f;
    } finally {
      this.fills.delete(f);
    }
    this.filledChunks.add(k);
    w.data = null;
    this.bulk.delete(k);
    opts.onChunk?.(k);
  }

  /** Resolves when every fill started so far has finished (tests, pull). */
  async settled(): Promise<void> {
    while (this.fills.size > 0) await Promise.all([...this.fills]);
  }
}

/**
 * Other positions holding a fetched chunk that are filled from it at most (per chunk fetched): a read of
 * one position then makes its duplicates local without another fetch and decode, as a restore writes one
 * decoded chunk everywhere it goes; bounded so that one read never writes much more than it asked for.
 */
const DUP_FILLS = 16;

/** Bulk-read slots up to this size (input and output together) are kept for reuse. */
const BULK_SLOT_KEEP = 32 * 1024 * 1024;
