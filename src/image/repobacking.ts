/**
 * A backup in a repository as the backing of a ksc_inc image: a live restore (formats/ksc_inc.md §4.2).
 *
 * Design notes. The device is read-only and knows one manifest: chunk `k` of the disk is the manifest's id
 * `k`. A zero id reads as zeros without a request. Any other chunk is looked up in the repository's index
 * (loaded once, on the first fetch, keeping only this backup's chunks), read from its pack with one ranged
 * read, decompressed and checked against its id in the worker pool (the same decoder restore uses), and only
 * then returned (§4.2 rule 2): repo-chunks.ts. When the overlay above installed a fill (`setFill`, a
 * writable open), the verified chunk is handed to it (copy-on-read, rule 3); one fetch per chunk for all its
 * readers, duplicate positions and bulk fetches are repo-fills.ts. A sequential reader gets chunks fetched
 * ahead (repo-readahead.ts decides which: a window per reader, up to 8 readers at once).
 *
 * Readahead's bound, per image: at most AHEAD_BYTES (64 MiB) of chunks asked for ahead and not yet filled,
 * at most AHEAD_READS (8) ranged reads of packs in flight for it (each up to 4 MiB), and its decoding
 * waits while a reader's own chunk is decoding (repo-chunks.ts): a reader's fetch never queues behind it.
 *
 * While a writer has the image open, the device holds a shared repository lock naming the live restore
 * (rule 5), refreshed in the background: prune's exclusive lock cannot be taken meanwhile.
 *
 * A holder that may have lost what protects the backup stops reading it (repository.md §8 rule 4, applied to
 * the reference of §8.1): when a renewal of the reference finds it gone (`repo unlock` removed it as stale
 * while the holder was suspended), older than half its lifetime (someone may have judged it stale), or the
 * shared lock lost, it does not put the reference back — a prune may have removed the backup meanwhile —
 * and every later fetch from the repository fails with that reason (KSC_E_LOCKED). Only a new writable
 * open, under a new shared lock and with the manifest read again, puts the reference again.
 */
import { KscError } from '../errors.js';
import type { BackupRef } from '../format/header.js';
import { isZeroId } from '../hash/chunkid.js';
import { openStore } from '../objstore/open.js';
import type { ObjectStore } from '../objstore/types.js';
import type { Manifest } from '../repo/manifest.js';
import { Repository, STALE_MS, readerLockOn, systemLockClock, type RepoLock } from '../repo/repository.js';
import { bytesToUuid, uuidToBytes } from '../util/uuid.js';
import { pace } from '../util/turns.js';
import { REF_RENEW_MS, REF_STALE_MS, deleteLiveRef, liveRefKey, putLiveRef } from '../repo/liverefs.js';
import { storageNow } from '../repo/locks.js';
import { closeRepo } from '../repo/open-close.js';
import * as nodePath from 'node:path';
import { type BlockDevice, type Extent, assertRange, mergeExtents } from './types.js';
import type { LocalBaseRef } from '../format/local-base.js';
import { LocalBase } from './local-base.js';
import { type BackupBackingStats, RepoChunks } from './repo-chunks.js';
import { ChunkFills, type FetchAllOptions, type FillFn } from './repo-fills.js';
import { type AheadRange, ReadaheadStreams } from './repo-readahead.js';

export { LIVE_TIMEOUT_DEFAULT_MS, liveTimeoutMs } from './live-wait.js';
export type { BackupBackingStats } from './repo-chunks.js';
export type { FetchAllOptions, FillFn } from './repo-fills.js';

export class BackupBacking implements BlockDevice {
  readonly format = 'raw' as const;
  readonly readOnly = true;
  readonly blockSize: number;
  readonly size: number;
  /** The repository side: index, ranged reads, decoding (repo-chunks.ts). */
  private readonly src: RepoChunks;
  /** Fetches into the overlay: one per chunk for all its readers, duplicates, bulk fetches (repo-fills.ts). */
  private readonly fills: ChunkFills;
  private closed = false;
  /** The image's absolute path, when a writer holds it open (its reference, repository.md §8.1). */
  private image: string | null = null;
  private renewTimer: NodeJS.Timeout | null = null;
  /** Renewals of the reference started since the open (the open's own put not counted; tests). */
  renewals = 0;
  /** Why the repository may no longer be read (the reference or the lock lost); null while it may. */
  private lost: KscError | null = null;
  /** Chunks fetched ahead of a sequential reader (KSCINC_LIVE_READAHEAD, default 4; 0: none). */
  private readonly readahead = readaheadChunks();
  /** Which chunks each sequential reader gets fetched ahead (repo-readahead.ts). */
  private readonly ahead: ReadaheadStreams;
  /** Bytes of chunks readahead asked for and has not filled yet (at most AHEAD_BYTES). */
  private aheadBytes = 0;
  /** Readahead's ranged reads of packs in flight, and the reads waiting for a turn (at most AHEAD_READS run). */
  private aheadReads = 0;
  private readonly aheadQueue: (() => void)[] = [];
  /** Where the overlay above holds its own blocks (its extents at depth 0), or null: readahead leaves them. */
  private overlayExtents: ((offset: number, length: number) => Promise<Extent[]>) | null = null;

  /** Where the reference is put and deleted: the repository's store, whose changes wait for §13.1 rule 2's check. */
  private readonly changes: ObjectStore;

  private constructor(
    readonly name: string,
    repo: Repository,
    private readonly store: ObjectStore,
    readonly manifest: Manifest,
    private readonly lock: RepoLock | null,
    /** §4.2 rule 9: the local raw base that base chunks read, or null. */
    readonly localBase: LocalBase | null,
  ) {
    this.changes = repo.store;
    this.blockSize = manifest.chunkSize;
    this.size = manifest.size;
    this.ahead = new ReadaheadStreams(
      this.blockSize,
      manifest.ids.length,
      this.readahead,
      Math.max(this.readahead, Math.floor(MAX_AHEAD / this.blockSize)),
      (k) => this.isZeroChunk(k) || this.isBaseChunk(k),
    );
    this.src = new RepoChunks(name, repo, store, manifest, () => this.closed);
    this.fills = new ChunkFills(
      name,
      this.src,
      manifest,
      (k) => this.isZeroChunk(k) || this.isBaseChunk(k),
      () => this.closed,
    );
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
    // Through repo.store: a change, so it waits for §13.1 rule 2's check (WriteGate), as every change does.
    const renewed = opts.hold ? Promise.all([locked, opened]).then(([, repo]) => putLiveRef(repo.store, { backup: ref.id, disk: bytesToUuid(ref.disk), image: abs })) : Promise.resolve(null);
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
        b.renewTimer = setInterval(() => void b.renewReference().catch(() => undefined), renewMs());
        b.renewTimer.unref();
        b.src.prefetchIndex(listing!);
      }
      return b;
    } catch (e) {
      await lock?.release();
      await closeRepo(all[0].status === 'fulfilled' ? all[0].value : undefined, store);
      throw e;
    }
  }

  /**
   * Installs the copy-on-read fill of the overlay above (a writable open), and how to ask it which blocks
   * it holds: readahead fetches no chunk the overlay holds wholly (filled before a reopen: `held` knows only
   * this open's fills).
   */
  setFill(fill: FillFn | null, overlayExtents: ((offset: number, length: number) => Promise<Extent[]>) | null = null): void {
    this.fills.fill = fill;
    this.overlayExtents = overlayExtents;
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
      else if (this.lost) parts.push(Promise.reject(this.lost));
      else parts.push(this.fills.chunk(k).then((d) => void d.copy(target, at, inChunk, inChunk + n)));
      pos = end;
    }
    this.noteRead(offset, target.length, true);
    await Promise.all(parts);
    // Zero chunks and chunks decoded already settle without a turn of the event loop (util/turns.ts).
    const turn = pace();
    if (turn) await turn;
  }

  /**
   * A read of [offset, offset+length) of the image above, local or not (KscImage.onRead, open.ts): a
   * sequential reader's readahead goes on while it reads chunks already filled. `mayStart`: a read through
   * to the repository (readInto), which may start a window.
   */
  noteRead(offset: number, length: number, mayStart = false): void {
    if (this.fills.fill && this.readahead > 0 && !this.closed) this.readAhead(offset, length, mayStart);
  }

  /**
   * Readahead for a sequential reader (a guest reading a file or the disk in order; repo-readahead.ts says
   * which chunks): those not local, not zero and not already coming are fetched and filled now, each shared
   * with the reads that reach it meanwhile (`chunk`). Only with a fill (a writable open): a fetched chunk
   * then stays local, fetched once. Its failure is the reader's to see when it gets there, not this read's.
   */
  private readAhead(offset: number, length: number, mayStart: boolean): void {
    const C = this.blockSize;
    const ks: number[] = [];
    // The window's batch, cut where the image's bound on readahead in flight (AHEAD_BYTES) is reached.
    const grant = (r: AheadRange): number => {
      for (let j = r.from; j < r.to; j++) {
        if (this.isZeroChunk(j) || this.isBaseChunk(j) || this.fills.held(j) || this.fills.twinFetching(j)) continue;
        if (this.aheadBytes + C > AHEAD_BYTES) return j;
        this.aheadBytes += C;
        ks.push(j);
      }
      return r.to;
    };
    this.ahead.onRead(offset, length, mayStart, grant);
    if (ks.length === 0) return;
    // Each chunk's share of the bound is given back once it is filled (or when the fetch ends).
    const pending = new Set(ks);
    const done = (k: number): void => {
      if (pending.delete(k)) this.aheadBytes -= C;
    };
    // Chunks the overlay already holds wholly (filled before a reopen) are left out; a guest write after
    // this look is safe either way (a fill never overwrites a block that is no longer UNALLOCATED).
    this.notInOverlay(ks)
      .then((need) => {
        for (const k of ks) if (!need.has(k)) done(k);
        if (need.size === 0 || this.closed) return;
        // The positions holding the same chunks come along: one decode fills them all (planBulkReads).
        const all = new Set(need);
        for (const k of need) for (const j of this.fills.duplicatesOf(k)) all.add(j);
        // As a restore reads them: coalesced ranged reads of the packs, decoded in the worker pool behind
        // the readers' own chunks (background), at most AHEAD_READS at once for the image.
        return this.fetchAll([...all], { concurrency: 2, onChunk: done, background: true, beforeRead: () => this.aheadTurn(), afterRead: () => this.aheadDone() });
      })
      .catch(() => undefined)
      .finally(() => {
        for (const k of [...pending]) done(k);
      });
  }

  /** Of chunks `ks` (ascending), those the overlay above does not hold wholly (all of them without a way to ask). */
  private async notInOverlay(ks: number[]): Promise<Set<number>> {
    const need = new Set<number>();
    if (!this.overlayExtents) return new Set(ks);
    const C = this.blockSize;
    const from = ks[0]! * C;
    const to = Math.min(this.size, (ks[ks.length - 1]! + 1) * C);
    const wanted = new Set(ks);
    for (const e of await this.overlayExtents(from, to - from)) {
      if (e.depth === 0) continue;
      for (let k = Math.floor(e.offset / C); k <= Math.floor((e.offset + e.length - 1) / C); k++) if (wanted.has(k)) need.add(k);
    }
    return need;
  }

  /** Waits for one of readahead's AHEAD_READS turns at reading a pack. */
  private aheadTurn(): Promise<void> {
    if (this.aheadReads < AHEAD_READS) {
      this.aheadReads++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.aheadQueue.push(resolve));
  }

  /** Gives a turn back (to the next waiting read: the count stays). */
  private aheadDone(): void {
    const next = this.aheadQueue.shift();
    if (next) next();
    else this.aheadReads--;
  }

  /** Readahead in flight now: bytes of chunks asked for and not filled, ranged reads running (tests). */
  get readaheadInFlight(): { bytes: number; reads: number } {
    return { bytes: this.aheadBytes, reads: this.aheadReads };
  }

  /**
   * Fetches chunks `ks` the way a restore reads and fills each into the overlay (repo-fills.ts); needs a
   * fill (a writable open).
   */
  fetchAll(ks: number[], opts: FetchAllOptions = {}): Promise<void> {
    this.live();
    if (this.lost) return Promise.reject(this.lost);
    return this.fills.fetchAll(ks, opts);
  }

  /** Resolves when every fill started so far has finished (tests, pull). */
  settled(): Promise<void> {
    return this.fills.settled();
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

  /**
   * Puts the image's live-restore reference again (repository.md §8.1), only while nothing says that it
   * or the shared lock may have been lost (the module's notes); otherwise puts nothing, stops the renewals
   * and fails every later fetch from the repository with the reason, which it throws (KSC_E_LOCKED). A
   * failure to look (the repository away) throws and changes nothing: the next renewal looks again.
   */
  async renewReference(): Promise<void> {
    if (!this.image || this.closed) return;
    if (this.lost) throw this.lost;
    this.renewals++;
    const image = this.image;
    const key = liveRefKey(this.manifest.meta.id, image);
    const stop = (why: string, cause?: unknown): never => {
      this.lose(
        new KscError(
          'KSC_E_LOCKED',
          `image ${image}: ${why}: it is not put back (a prune may have removed backup ${this.manifest.meta.id} meanwhile), and what the image has not pulled yet is no longer read from ${this.name}; open the image again (its open puts the reference back under a new lock if the backup is still there) to go on`,
          { cause },
        ),
      );
      throw this.lost;
    };
    try {
      this.lock?.check();
    } catch (e) {
      stop((e as Error).message, e);
    }
    const st = await this.store.stat(key);
    if (!st) stop(`its live-restore reference ${key} is gone (removed as stale by repo unlock, or by hand)`);
    const age = (await storageNow(this.store)) - st!.mtimeMs;
    if (age > REF_STALE_MS / 2)
      stop(`its live-restore reference ${key} was last renewed ${(age / 86_400_000).toFixed(1)} days ago by the storage's clock: it may have looked stale (after ${REF_STALE_MS / 86_400_000} days)`);
    if (this.closed || this.image !== image) return; // closed or pulled meanwhile: not put back
    await putLiveRef(this.changes, { backup: this.manifest.meta.id, disk: this.manifest.disk, image });
  }

  /** From now on the repository is not read: every fetch fails with `why`; the renewals stop. */
  private lose(why: KscError): void {
    this.lost ??= why;
    if (this.renewTimer) clearInterval(this.renewTimer);
    this.renewTimer = null;
  }

  /**
   * Deletes the image's reference: only once the image durably no longer names this backing (pull, after
   * the header without it). Returns the key deleted.
   */
  async dropReference(image: string): Promise<string> {
    if (this.renewTimer) clearInterval(this.renewTimer);
    this.renewTimer = null;
    this.image = null;
    return deleteLiveRef(this.changes, this.manifest.meta.id, nodePath.resolve(image));
  }

  /** Throws KSC_E_LOCKED when the shared lock of §4.2 rule 5, or the reference (renewReference), was lost. */
  checkLock(): void {
    if (this.lost) throw this.lost;
    this.lock?.check();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.renewTimer) clearInterval(this.renewTimer);
    await this.fills.settled().catch(() => undefined);
    await this.lock?.release();
    await this.changes.close(); // the repository's store (closeRepo): its WriteGate's check ends with it
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

/** Bytes of disk readahead's window grows to at most (repo-readahead.ts). */
const MAX_AHEAD = 32 * 1024 * 1024;

/** Bytes of chunks readahead has asked for and not yet filled, per image, at most (all its readers). */
export const AHEAD_BYTES = 64 * 1024 * 1024;

/** Readahead's ranged reads of packs in flight per image, at most (an S3 store has 32 sockets). */
export const AHEAD_READS = 8;

/** How often an open image renews its reference: REF_RENEW_MS, or KSCINC_LIVE_REF_RENEW_MS (tests, ≥ 10 ms). */
function renewMs(): number {
  const v = Number(process.env.KSCINC_LIVE_REF_RENEW_MS);
  return Number.isSafeInteger(v) && v >= 10 ? v : REF_RENEW_MS;
}

/** KSCINC_LIVE_READAHEAD: chunks a sequential reader's first window fetches ahead (0 turns readahead off). */
function readaheadChunks(): number {
  const v = process.env.KSCINC_LIVE_READAHEAD;
  if (v === undefined || v === '') return 4;
  const n = Number(v);
  return Number.isInteger(n) && n >= 0 && n <= 64 ? n : 4;
}
