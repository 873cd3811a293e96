/**
 * The repository side of a live restore's backing (src/image/repobacking.ts, formats/ksc_inc.md §4.2): the
 * index of the backup's chunks, ranged reads of packs that wait for an unreachable repository (rule 7), and
 * decoding with the id checked (rule 2).
 *
 * Start-up (issue 18: the first read of a live restore within a second): the index is loaded once, and a
 * writer's open starts loading it in the background (`prefetchIndex`) while the server starts; a chunk
 * fetched before the worker pool is up is decoded on this thread (one chunk: a few milliseconds) instead of
 * waiting for the workers to start, which took 0.5–1 s of a loaded 2-core machine.
 *
 * Readahead does not hold up a reader's own fetch in the worker pool (a queue in call order): its decoding
 * (readUnpacked with `background`) is not handed to the pool while a reader's chunk is decoding or waiting
 * for a worker, and takes at most one worker fewer than the pool has when it has 3 or more (a reader's
 * chunk finds a worker free); with 1 or 2 workers it may take them all (one worker for readahead halved
 * its decoding on 2 cores), so a reader's chunk waits at most for one readahead decode (≤ 4 MiB) to end.
 */
import { KscError, isDamage } from '../errors.js';
import { SharedSlot, poolReady, poolSize, unpackInto, warmPool } from '../compress/pool.js';
import type { Read, ReadItem } from '../repo/fetch.js';
import { BLOB_HEADER, BlobError, decodeBlobInto } from '../compress/codec.js';
import { initHash } from '../hash/chunkid.js';
import type { ObjectStore } from '../objstore/types.js';
import type { Manifest } from '../repo/manifest.js';
import { CONFIG_KEY, ChunkIndex, type Repository, packKey } from '../repo/repository.js';
import { isUnreachable, liveTimeoutMs, waitReachable } from './live-wait.js';

export interface BackupBackingStats {
  /** Chunks fetched from the repository (each verified). */
  chunksFetched: number;
  bytesFetched: number;
  /** Ranged reads of packs issued (a bulk fetch coalesces many chunks into one). */
  reads: number;
  /** Chunk reads answered from a fetch already in flight or not yet filled. */
  chunksShared: number;
  /** Tries of the repository that failed because it was unreachable, and were tried again (rule 7). */
  retries: number;
  /** Other positions holding a chunk a read fetched, filled from that one fetch (repobacking.ts DUP_FILLS). */
  duplicatesFilled: number;
}

type UnpackResult = Awaited<ReturnType<typeof unpackInto>>;

export class RepoChunks {
  readonly stats: BackupBackingStats = { chunksFetched: 0, bytesFetched: 0, reads: 0, chunksShared: 0, retries: 0, duplicatesFilled: 0 };
  /** §4.2 rule 7: how long an access waits for an unreachable repository (KSCINC_LIVE_TIMEOUT). */
  timeoutMs = liveTimeoutMs();
  private index: Promise<ChunkIndex> | null = null;
  /** A prefetch's one try, until the first loadIndex adopts it. */
  private early: Promise<ChunkIndex> | null = null;
  private readonly badIndex: string[] = [];
  /** Buffers of chunk-by-chunk fetches, reused (fresh shared memory per fetch cost page faults and zeroing). */
  private readonly slots: SharedSlot[] = [];
  /** Readers' chunks decoding in the pool now, readahead's decodes running, and those waiting for a turn. */
  private demandDecodes = 0;
  private backgroundDecodes = 0;
  private readonly backgroundWaiting: (() => void)[] = [];

  constructor(
    private readonly name: string,
    readonly repo: Repository,
    readonly store: ObjectStore,
    private readonly manifest: Manifest,
    private readonly closed: () => boolean,
  ) {}

  private get chunkSize(): number {
    return this.manifest.chunkSize;
  }

  /** The length of chunk `k` (the last one may be short). */
  lenAt(k: number): number {
    return Math.min(this.chunkSize, this.manifest.size - k * this.chunkSize);
  }

  /** KSC_E_CORRUPT: chunk `k` (id `id`) is in no index object. */
  notIndexed(k: number, id: Buffer): KscError {
    const damaged = this.badIndex.length ? ` (damaged: ${this.badIndex.join(', ')})` : '';
    return new KscError('KSC_E_CORRUPT', `${this.name}: chunk ${k} (${id.toString('hex')}) is in no index object${damaged}: repository damaged, run "kscinc verify"`);
  }

  /**
   * Starts loading the index now, one try (a writer's open: it is ready by the first read). The first
   * loadIndex adopts it, and loads again, waiting as rule 7 says, if it failed. `listing`: the index
   * objects, listed by the opener beside its manifest read, after it read the repository's config (so the
   * repository was there before the listing, rule 7).
   */
  prefetchIndex(listing?: Promise<{ id: string; size: number }[]>): void {
    if (this.index || this.early) return;
    this.early = this.readIndex(listing);
    this.early.catch(() => undefined);
  }

  /** The index entries of this backup's chunks, loaded once (again after a failure). */
  loadIndex(): Promise<ChunkIndex> {
    if (!this.index) {
      const early = this.early;
      this.early = null;
      const load = (): Promise<ChunkIndex> => this.reach('loading its index', () => this.readIndex());
      this.index = early ? early.catch(load) : load();
      this.index.catch(() => (this.index = null));
    }
    return this.index;
  }

  /**
   * One try at the index: only this backup's entries. A folder that is away lists as empty: the index is
   * only trusted when the repository was there before and after it was listed (rule 7).
   */
  private async readIndex(listing?: Promise<{ id: string; size: number }[]>): Promise<ChunkIndex> {
    const m = this.manifest;
    const needed = new ChunkIndex({ locations: false, expected: m.ids.nonZeroCount() });
    m.ids.forEachNonZero((k) => void needed.addAt(m.ids.view(k), 0, '', 0, 0, 0));
    this.badIndex.length = 0;
    if (!listing) await this.present(); // else the caller's listing began after it read the config
    const objects = await listing;
    const index = await this.repo.loadIndex((key) => this.badIndex.push(this.repo.objName(key)), { only: (b, at) => needed.hasAt(b, at), objects });
    await this.present();
    return index;
  }

  /** §4.2 rule 2: index → pack → ranged read → decompress and check the id; another copy when one fails. */
  async fetch(k: number): Promise<Buffer> {
    const id = Buffer.from(this.manifest.ids.view(k));
    const what = `${this.name}: chunk ${k} (${id.toString('hex')})`;
    const index = await this.loadIndex();
    const s = index.slotOf(id);
    if (s < 0) throw this.notIndexed(k, id);
    const copies = index.extraCopies === 0 ? [s] : index.copies(s);
    const errors: string[] = [];
    for (const h of copies) {
      const key = packKey(index.packName(h));
      const offset = index.blobOffset(h);
      const length = index.blobLength(h);
      const slot = this.takeSlot(length);
      try {
        await this.readRange(key, offset, slot.input.subarray(0, length));
        const [r] = await this.decode(slot, length, id);
        if (!r!.ok) throw new KscError('KSC_E_CORRUPT', `repository object ${this.repo.objName(key)}: chunk ${id.toString('hex')} at offset ${offset}: ${r!.error}`);
        if (r!.data.length !== this.lenAt(k)) throw new KscError('KSC_E_CORRUPT', `${what} is ${r!.data.length} bytes, ${this.lenAt(k)} expected`);
        this.stats.chunksFetched++;
        this.stats.bytesFetched += length;
        // Out of the shared slot (the fill and the readers keep it), into memory that is not shared.
        const out = Buffer.allocUnsafe(r!.data.length);
        r!.data.copy(out);
        return out;
      } catch (e) {
        if (!isDamage(e)) throw e;
        errors.push((e as Error).message);
      } finally {
        this.giveSlot(slot);
      }
    }
    throw new KscError('KSC_E_CORRUPT', `${what}: every copy failed its check: ${errors.join('; ')}`);
  }

  /** A slot whose input holds `length` bytes: a free one, or a new one (sized for a whole stored chunk). */
  private takeSlot(length: number): SharedSlot {
    const i = this.slots.findIndex((s) => s.input.length >= length);
    if (i >= 0) return this.slots.splice(i, 1)[0]!;
    return new SharedSlot(Math.max(length, this.chunkSize + BLOB_HEADER), Math.max(this.chunkSize, BLOB_HEADER));
  }

  /** Returns a slot for reuse (a few are kept: as many as fetches run at once, about). */
  private giveSlot(slot: SharedSlot): void {
    if (this.slots.length < 8) this.slots.push(slot);
  }

  /**
   * One blob of `slot.input` decoded and checked: in the worker pool once it runs; before that on this
   * thread (the same decoder), and the pool is started for the reads that follow.
   */
  private async decode(slot: SharedSlot, length: number, id: Buffer): Promise<UnpackResult> {
    if (poolReady()) {
      this.demandDecodes++;
      try {
        return await unpackInto(slot, [[0, length]], [id], this.chunkSize, this.repo.blobKeys);
      } finally {
        this.demandDecodes--;
        this.wakeBackground();
      }
    }
    warmPool();
    await initHash();
    try {
      const n = decodeBlobInto(slot.input.subarray(0, length), id, this.chunkSize, slot.output, 0, this.repo.blobKeys);
      return [{ ok: true, data: slot.output.subarray(0, n) }];
    } catch (e) {
      if (!(e instanceof BlobError)) throw e;
      return [{ ok: false, error: e.message }];
    }
  }

  /**
   * Reads and unpacks one coalesced read of a bulk fetch, every blob checked against its id and the
   * length of each chunk `positions[item.from]` names; null when it is damaged (the caller then tries other
   * copies chunk by chunk). `background` (readahead): decoded only when no reader's chunk is (see above).
   */
  async readUnpacked(r: Read, items: ReadItem[], positions: number[][], slot: SharedSlot, background = false): Promise<UnpackResult | null> {
    const key = packKey(r.pack);
    try {
      await this.readRange(key, r.offset, slot.input.subarray(0, r.length));
      if (background) await this.backgroundTurn();
      let res: UnpackResult;
      try {
        res = await unpackInto(
          slot,
          items.map((it) => [it.at, it.length]),
          items.map((it) => it.id),
          this.chunkSize,
          this.repo.blobKeys,
        );
      } finally {
        if (background) {
          this.backgroundDecodes--;
          this.wakeBackground();
        }
      }
      for (let i = 0; i < res.length; i++) {
        const x = res[i]!;
        if (!x.ok) throw new KscError('KSC_E_CORRUPT', `repository object ${this.repo.objName(key)}: chunk ${items[i]!.id.toString('hex')} at offset ${r.offset + items[i]!.at}: ${x.error}`);
        for (const k of positions[items[i]!.from!]!) {
          if (x.data.length !== this.lenAt(k)) throw new KscError('KSC_E_CORRUPT', `${this.name}: chunk ${k} (${items[i]!.id.toString('hex')}) is ${x.data.length} bytes, ${this.lenAt(k)} expected`);
        }
      }
      this.stats.bytesFetched += r.length;
      return res;
    } catch (e) {
      if (!isDamage(e)) throw e;
      return null;
    }
  }

  /** Waits until no reader's chunk is decoding and a background decode may run, and takes that turn. */
  private async backgroundTurn(): Promise<void> {
    const n = poolSize();
    while (this.demandDecodes > 0 || this.backgroundDecodes >= (n > 2 ? n - 1 : n)) {
      await new Promise<void>((resolve) => this.backgroundWaiting.push(resolve));
    }
    this.backgroundDecodes++;
  }

  /** Lets the background decodes waiting look again. */
  private wakeBackground(): void {
    for (const w of this.backgroundWaiting.splice(0)) w();
  }

  /** Reads `target.length` bytes of object `key` at `offset`, waiting for an unreachable repository (rule 7). */
  private async readRange(key: string, offset: number, target: Buffer): Promise<void> {
    this.stats.reads++;
    const got = await this.reach(`reading ${this.repo.objName(key)}`, async (retry) => {
      if (this.store.getRangeInto && !retry) {
        await this.store.getRangeInto(key, offset, target);
        return null;
      }
      // A retry may be given up while it runs (live-wait.ts) and answer later, when `target` (a shared slot)
      // holds another read: it reads into a buffer of its own, copied below only when it is the answer.
      const g = await this.store.getRange(key, offset, target.length);
      if (g.length !== target.length) throw new KscError('KSC_E_CORRUPT', `repository object ${this.repo.objName(key)}: ${g.length} bytes at offset ${offset}, ${target.length} expected`);
      return g;
    });
    got?.copy(target);
  }

  /** §4.2 rule 7: `op`, tried again while the repository is unreachable (see waitReachable). */
  private reach<T>(what: string, op: (retry: boolean) => Promise<T>): Promise<T> {
    return waitReachable(`${this.name}: ${what}`, op, {
      timeoutMs: this.timeoutMs,
      closed: this.closed,
      unreachable: (e) => isUnreachable(this.store, e),
      onRetry: () => this.stats.retries++,
    });
  }

  /** Throws a retryable KSC_E_UNAVAILABLE when the repository's config object cannot be read. */
  private async present(): Promise<void> {
    if ((await this.store.stat(CONFIG_KEY)) === null) {
      throw new KscError('KSC_E_UNAVAILABLE', `${this.name}: the repository's config object is not there (the repository is away)`, { retryable: true });
    }
  }
}
