/**
 * A backup in a repository as the backing of a ksc_inc image: a live restore (formats/ksc_inc.md §4.2).
 *
 * Design notes. The device is read-only and knows one manifest: chunk `k` of the disk is the manifest's id
 * `k`. A zero id reads as zeros without a request. Any other chunk is looked up in the repository's index
 * (loaded once, on the first fetch, keeping only this backup's chunks), read from its pack with one ranged
 * read, decompressed and checked against its id in the worker pool (the same decoder restore uses), and only
 * then returned (§4.2 rule 2). Concurrent reads of one chunk share one fetch; when the overlay above
 * installed a fill (`setFill`, a writable open), the verified chunk is handed to it (copy-on-read, rule 3)
 * and stays in memory until the fill is done, so no read between fetch and fill fetches it again. Positions
 * holding the same chunk id (repo-dups.ts) share its fetch and are filled from it, up to DUP_FILLS a fetch:
 * a disk that repeats a chunk fetches and decodes it once, as a restore does.
 *
 * While a writer has the image open, the device holds a shared repository lock naming the live restore
 * (rule 5), refreshed in the background: prune's exclusive lock cannot be taken meanwhile.
 */
import { KscError } from '../errors.js';
import { SharedSlot } from '../compress/pool.js';
import type { Read } from '../repo/fetch.js';
import { planBulkReads } from './bulk-plan.js';
import { mapLimit } from '../util/concurrency.js';
import { BitSet } from '../util/bitset.js';
import { BLOB_HEADER } from '../compress/codec.js';
import type { BackupRef } from '../format/header.js';
import { isZeroId } from '../hash/chunkid.js';
import { openStore } from '../objstore/open.js';
import type { ObjectStore } from '../objstore/types.js';
import type { Manifest } from '../repo/manifest.js';
import { Repository, STALE_MS, readerLockOn, systemLockClock, type RepoLock } from '../repo/repository.js';
import { bytesToUuid, uuidToBytes } from '../util/uuid.js';
import { REF_RENEW_MS, deleteLiveRef, putLiveRef } from '../repo/liverefs.js';
import * as nodePath from 'node:path';
import { type BlockDevice, type Extent, assertRange, mergeExtents } from './types.js';
import type { LocalBaseRef } from '../format/local-base.js';
import { LocalBase } from './local-base.js';
import { type BackupBackingStats, RepoChunks } from './repo-chunks.js';
import { DuplicateChunks, slotFinder } from './repo-dups.js';
import { ReadaheadWindow } from './repo-readahead.js';

export { LIVE_TIMEOUT_DEFAULT_MS, liveTimeoutMs } from './live-wait.js';
export type { BackupBackingStats } from './repo-chunks.js';

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
}

/** A chunk of a bulk fetch that readers may wait for: its data once verified (a view until `copyOut`). */
interface Waiting {
  data: Buffer | null;
  waiters: { resolve: (b: Buffer) => void; reject: (e: unknown) => void }[];
}

export class BackupBacking implements BlockDevice {
  readonly format = 'raw' as const;
  readonly readOnly = true;
  readonly blockSize: number;
  readonly size: number;
  /** The repository side: index, ranged reads, decoding (repo-chunks.ts). */
  private readonly src: RepoChunks;
  /** Chunk position → its verified data, from the start of its fetch until it is filled (or returned). */
  private readonly inflight = new Map<number, Promise<Buffer>>();
  /** Chunk position → its own fetch from the repository, while it runs (positions holding the same chunk share it). */
  private readonly fetching = new Map<number, Promise<Buffer>>();
  private readonly fills = new Set<Promise<void>>();
  /** Chunks of a bulk fetch (fetchAll) whose read has started and whose fill is not done. */
  private readonly bulk = new Map<number, Waiting>();
  /** Chunks this backing has filled into the overlay (no bulk fetch reads them again). */
  /** A bit set: V8 caps a Set at 2^24 members, a 1 TiB disk of 64 KiB chunks. */
  private readonly filledChunks: BitSet;
  private fill: FillFn | null = null;
  private closed = false;
  /** The image's absolute path, when a writer holds it open (its reference, repository.md §8.1). */
  private image: string | null = null;
  private renewTimer: NodeJS.Timeout | null = null;
  /** Chunks fetched ahead of a sequential reader (KSCINC_LIVE_READAHEAD, default 4; 0: none). */
  private readonly readahead = readaheadChunks();
  /** Which chunks a sequential reader gets fetched ahead (repo-readahead.ts). */
  private readonly ahead: ReadaheadWindow;
  /** Positions holding the same chunk (filled from one fetch: `DUP_FILLS`), built once the index is loaded. */
  private readonly dups = new DuplicateChunks();
  private dupsStarted = false;
  /** Slots of bulk reads kept for the next fetchAll (fresh shared memory per read cost page faults and zeroing). */
  private readonly bulkSlots: SharedSlot[] = [];

  private constructor(
    readonly name: string,
    repo: Repository,
    private readonly store: ObjectStore,
    readonly manifest: Manifest,
    private readonly lock: RepoLock | null,
    /** §4.2 rule 9: the local raw base that base chunks read, or null. */
    readonly localBase: LocalBase | null,
  ) {
    this.blockSize = manifest.chunkSize;
    this.size = manifest.size;
    this.filledChunks = new BitSet(manifest.ids.length);
    this.ahead = new ReadaheadWindow(
      this.blockSize,
      manifest.ids.length,
      this.readahead,
      Math.max(this.readahead, Math.floor(MAX_AHEAD / this.blockSize)),
      (k) => this.isZeroChunk(k) || this.isBaseChunk(k),
    );
    this.src = new RepoChunks(name, repo, store, manifest, () => this.closed);
  }

  get stats(): BackupBackingStats {
    return this.src.stats;
  }

  /** §4.2 rule 7: how long an access waits for an unreachable repository (KSCINC_LIVE_TIMEOUT). */
  get timeoutMs(): number {
    return this.src.timeoutMs;
  }

  set timeoutMs(ms: number) {
    this.src.timeoutMs = ms;
  }

  /**
   * Opens the backup `ref` in the repository at `location` as the backing of `image` (virtual size
   * `size`). `hold`: take the shared lock of §4.2 rule 5 (a writer's open). Refuses (KSC_E_CORRUPT) a
   * manifest that is not the one the image names (rule 1).
   */
  static async open(image: string, location: string, ref: BackupRef, size: number, opts: { hold: boolean; localBase?: { ref: LocalBaseRef; dev: BlockDevice } }): Promise<BackupBacking> {
    // No bucket check first (S3): the config and lock requests below find a missing bucket as well.
    const store = await openStore(location, { s3Options: { check: false } }).catch((e: unknown) => {
      throw new KscError((e as KscError).code ?? 'KSC_E_UNAVAILABLE', `image ${image}: its backing repository ${location} cannot be opened: ${(e as Error).message}`, { cause: e });
    });
    let lock: RepoLock | null = null;
    // Side by side (issue 18: each is a round trip on S3): the config, the shared lock, the manifest (read
    // once the config is; checked against the image below, rule 1, so it need not wait for the lock).
    // repository.md §8.1: a writer's open renews the image's reference, under the shared lock: put once the
    // lock is held and the location proved a repository (a reference put for a manifest found wrong only
    // names this image, as before).
    const abs = nodePath.resolve(image);
    const opened = Repository.open(store);
    const locked = opts.hold ? readerLockOn(store, { staleMs: STALE_MS, clock: systemLockClock }, `live restore of backup ${ref.id} into ${image}`, 0) : Promise.resolve(null);
    const read = opened.then((repo) => repo.readManifest(ref.id));
    // The index objects are listed beside the manifest read once the lock is held (no prune changes them
    // then): the index a writer's open prefetches needs them (below).
    const listing = opts.hold ? Promise.all([opened, locked]).then(([repo]) => repo.indexObjects()) : null;
    listing?.catch(() => undefined);
    const renewed = opts.hold ? Promise.all([locked, opened]).then(() => putLiveRef(store, { backup: ref.id, disk: bytesToUuid(ref.disk), image: abs })) : Promise.resolve(null);
    const all = await Promise.allSettled([opened, locked, read, renewed]);
    try {
      if (all[1].status === 'fulfilled') lock = all[1].value;
      const failed = all.find((x) => x.status === 'rejected');
      if (failed) throw failed.reason;
      const repo = (all[0] as PromiseFulfilledResult<Repository>).value;
      const m = (all[2] as PromiseFulfilledResult<Manifest>).value;
      checkManifest(image, m, ref, size, repo.name);
      const local = opts.localBase ? LocalBase.check(image, m, opts.localBase.ref, opts.localBase.dev) : null;
      const b = new BackupBacking(`backup ${ref.id} in ${location}`, repo, store, m, lock, local);
      if (opts.hold) {
        // Renewed daily while open; the index loads while the server starts (the first read needs it).
        b.image = abs;
        b.renewTimer = setInterval(() => void b.renewReference().catch(() => undefined), REF_RENEW_MS);
        b.renewTimer.unref();
        b.src.prefetchIndex(listing!);
      }
      return b;
    } catch (e) {
      await lock?.release();
      await store.close();
      throw e;
    }
  }

  /** Installs the copy-on-read fill of the overlay above (a writable open). */
  setFill(fill: FillFn | null): void {
    this.fill = fill;
  }

  /** Whether chunk `k` is a zero chunk (no fetch needed). */
  isZeroChunk(k: number): boolean {
    return isZeroId(this.manifest.ids.view(k));
  }

  /** §4.2 rule 9: whether chunk `k` reads the local base (never fetched, never filled). */
  isBaseChunk(k: number): boolean {
    return this.localBase?.isBaseChunk(k) ?? false;
  }

  get chunks(): number {
    return this.manifest.ids.length;
  }

  /** Capability (capabilities.ts): the backed-up disk; a backup is never left half-written. */
  get identity(): { diskUuid: Buffer; wasDirty: boolean } {
    return { diskUuid: uuidToBytes(this.manifest.disk), wasDirty: false };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const b = Buffer.alloc(length);
    await this.readInto(offset, b);
    return b;
  }

  async readInto(offset: number, target: Buffer): Promise<void> {
    this.live();
    assertRange(this, offset, target.length);
    const C = this.blockSize;
    const parts: Promise<void>[] = [];
    for (let pos = offset; pos < offset + target.length;) {
      const k = Math.floor(pos / C);
      const end = Math.min((k + 1) * C, offset + target.length);
      const at = pos - offset;
      const inChunk = pos - k * C;
      const n = end - pos;
      if (this.isZeroChunk(k)) target.fill(0, at, at + n);
      else if (this.isBaseChunk(k)) parts.push(this.localBase!.readInto(pos, target.subarray(at, at + n)));
      else parts.push(this.chunk(k).then((d) => void d.copy(target, at, inChunk, inChunk + n)));
      pos = end;
    }
    this.noteRead(offset, target.length);
    await Promise.all(parts);
  }

  /**
   * A read of [offset, offset+length) of the image above, local or not (KscImage.onRead, open.ts): a
   * sequential reader's readahead goes on while it reads chunks already filled.
   */
  noteRead(offset: number, length: number): void {
    if (this.fill && this.readahead > 0 && !this.closed) this.readAhead(offset, length);
  }

  /**
   * Readahead for a sequential reader (a guest reading a file or the disk in order; repo-readahead.ts says
   * which chunks): those not local, not zero and not already coming are fetched and filled now, each shared
   * with the reads that reach it meanwhile (`chunk`). Only with a fill (a writable open): a fetched chunk
   * then stays local, fetched once. Its failure is the reader's to see when it gets there, not this read's.
   */
  private readAhead(offset: number, length: number): void {
    const range = this.ahead.onRead(offset, length);
    if (!range) return;
    const ks: number[] = [];
    for (let j = range.from; j < range.to; j++) {
      if (this.isZeroChunk(j) || this.isBaseChunk(j) || this.filledChunks.has(j) || this.inflight.has(j) || this.bulk.has(j) || this.twinFetching(j)) continue;
      ks.push(j);
    }
    // The positions holding the same chunks come along: one decode fills them all (planBulkReads).
    const all = new Set(ks);
    for (const k of ks) for (const j of this.duplicatesOf(k)) all.add(j);
    // As a restore reads them: coalesced ranged reads of the packs, decoded in the worker pool.
    if (all.size > 0) this.fetchAll([...all], { concurrency: 2 }).catch(() => undefined);
  }

  /** Up to DUP_FILLS other positions holding chunk k's data that are not local and not coming yet. */
  private duplicatesOf(k: number): number[] {
    if (!this.fill || !this.dups.ready) return [];
    return this.dups.others(k, DUP_FILLS, (j) => !this.filledChunks.has(j) && !this.inflight.has(j) && !this.bulk.has(j));
  }

  /** Whether another position holding chunk k's data is being fetched chunk by chunk (its fetch fills k too). */
  private twinFetching(k: number): boolean {
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
          (k) => !this.isZeroChunk(k) && !this.isBaseChunk(k),
          slotFinder(index, (k) => ids.view(k)),
          () => this.closed,
        ),
      )
      .catch(() => (this.dupsStarted = false));
  }

  /** Chunk `k`'s verified data: one fetch for concurrent readers, kept until the overlay has filled it. */
  chunk(k: number): Promise<Buffer> {
    const have = this.inflight.get(k) ?? this.fromBulk(k);
    if (have) {
      this.stats.chunksShared++;
      return have;
    }
    this.startDuplicates();
    // Another position holding the same chunk being fetched: its fetch serves this one too.
    const twin = this.dups.others(k, DUP_FILLS, (j) => this.fetching.has(j) || this.bulk.has(j))[0];
    let src: Promise<Buffer>;
    if (twin !== undefined) {
      this.stats.chunksShared++;
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
        if (fill && !this.closed) {
          // The positions holding the same chunk, filled from this one fetch and shared with their readers.
          const same = twin === undefined ? this.duplicatesOf(k) : [];
          for (const j of same) this.inflight.set(j, p);
          for (const j of [k, ...same]) {
            const f = fill(j * this.blockSize, data)
              .catch(() => undefined)
              .finally(() => {
                this.filledChunks.add(j);
                this.inflight.delete(j);
                this.fills.delete(f);
              });
            this.fills.add(f);
          }
          this.stats.duplicatesFilled += same.length;
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
    this.live();
    const fill = this.fill;
    if (!fill) throw new KscError('KSC_E_READ_ONLY', `${this.name}: fetching into the image needs it open for writing`);
    this.startDuplicates();
    const index = await this.src.loadIndex();
    const plan = planBulkReads(
      ks.filter((k) => !this.isZeroChunk(k) && !this.isBaseChunk(k)),
      index,
      (k) => Buffer.from(this.manifest.ids.view(k)),
      (k, id) => this.src.notIndexed(k, id),
      opts.maxRead ?? 4 * 1024 * 1024,
    );
    const outBytes = Math.max(plan.outBytes, BLOB_HEADER);
    await mapLimit(plan.reads, Math.max(1, opts.concurrency ?? 4), async (r) => {
      await opts.beforeRead?.(r.length);
      this.live();
      const slot = this.takeBulkSlot(plan.inBytes, outBytes);
      try {
        await this.bulkRead(r, plan.positions, slot, fill, opts);
      } finally {
        this.giveBulkSlot(slot);
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
    if (this.bulkSlots.length < 4 && slot.input.length + slot.output.length <= BULK_SLOT_KEEP && !this.closed) this.bulkSlots.push(slot);
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
      const res = await this.src.readUnpacked(r, items, positions, slot);
      await Promise.all(
        items.map(async (it, i) => {
          const x = res?.[i];
          const data = x && x.ok ? x.data : await this.src.fetch(positions[it.from!]![0]!);
          if (x && x.ok) this.stats.chunksFetched++;
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
    const f = fill(k * this.blockSize, data);
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

  async extents(offset: number, length: number): Promise<Extent[]> {
    assertRange(this, offset, length);
    const C = this.blockSize;
    const out: Extent[] = [];
    for (let pos = offset; pos < offset + length;) {
      const k = Math.floor(pos / C);
      const end = Math.min((k + 1) * C, offset + length);
      out.push({ offset: pos, length: end - pos, state: this.isZeroChunk(k) ? 'zero' : 'data', depth: 0 });
      pos = end;
    }
    return mergeExtents(out);
  }

  write(): Promise<void> {
    return Promise.reject(this.readOnlyError());
  }

  writeZeroes(): Promise<void> {
    return Promise.reject(this.readOnlyError());
  }

  discard(): Promise<void> {
    return Promise.reject(this.readOnlyError());
  }

  async flush(): Promise<void> {}

  /** Puts the image's live-restore reference again (repository.md §8.1). */
  async renewReference(): Promise<void> {
    if (this.image && !this.closed) await putLiveRef(this.store, { backup: this.manifest.meta.id, disk: this.manifest.disk, image: this.image });
  }

  /**
   * Deletes the image's reference: only once the image durably no longer names this backing (pull, after
   * the header without it). Returns the key deleted.
   */
  async dropReference(image: string): Promise<string> {
    if (this.renewTimer) clearInterval(this.renewTimer);
    this.renewTimer = null;
    this.image = null;
    return deleteLiveRef(this.store, this.manifest.meta.id, nodePath.resolve(image));
  }

  /** Throws KSC_E_LOCKED when the shared lock of §4.2 rule 5 was lost. */
  checkLock(): void {
    this.lock?.check();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.renewTimer) clearInterval(this.renewTimer);
    await Promise.all([...this.fills]).catch(() => undefined);
    await this.lock?.release();
    await this.store.close();
    await this.localBase?.close();
  }

  private live(): void {
    if (this.closed) throw new KscError('KSC_E_CLOSED', `${this.name}: closed`);
  }

  private readOnlyError(): KscError {
    return new KscError('KSC_E_READ_ONLY', `${this.name}: a backup is read-only (writes go to the image above it)`);
  }
}

/** Rule 1: KSC_E_CORRUPT unless `m` is the manifest the image names (disk, size, chunk size, Merkle root). */
function checkManifest(image: string, m: Manifest, ref: BackupRef, size: number, repoName: string): void {
  const disk = bytesToUuid(ref.disk);
  const why =
    m.disk !== disk
      ? `disk ${m.disk}, the image names ${disk}`
      : m.size !== size
        ? `size ${m.size}, the image is ${size} bytes`
        : m.chunkSize !== ref.chunkSize
          ? `chunk size ${m.chunkSize}, the image names ${ref.chunkSize}`
          : !m.root.equals(ref.root)
            ? `Merkle root ${m.root.toString('hex')}, the image names ${ref.root.toString('hex')} (another backup under the same id)`
            : null;
  if (why) throw new KscError('KSC_E_CORRUPT', `image ${image}: the manifest of backup ${ref.id} in ${repoName} is not the one it was restored from: ${why}`);
}

/**
 * Other positions holding a fetched chunk that are filled from it at most (per chunk fetched): a read of
 * one position then makes its duplicates local without another fetch and decode, as a restore writes one
 * decoded chunk everywhere it goes; bounded so that one read never writes much more than it asked for.
 */
const DUP_FILLS = 16;

/** Bulk-read slots up to this size (input and output together) are kept for reuse. */
const BULK_SLOT_KEEP = 32 * 1024 * 1024;

/** Bytes of disk readahead's window grows to at most (repo-readahead.ts). */
const MAX_AHEAD = 32 * 1024 * 1024;

/** KSCINC_LIVE_READAHEAD: chunks a sequential reader's first window fetches ahead (0 turns readahead off). */
function readaheadChunks(): number {
  const v = process.env.KSCINC_LIVE_READAHEAD;
  if (v === undefined || v === '') return 4;
  const n = Number(v);
  return Number.isInteger(n) && n >= 0 && n <= 64 ? n : 4;
}
