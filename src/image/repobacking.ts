/**
 * A backup in a repository as the backing of a ksc_inc image: a live restore (formats/ksc_inc.md §4.2).
 *
 * Design notes. The device is read-only and knows one manifest: chunk `k` of the disk is the manifest's id
 * `k`. A zero id reads as zeros without a request. Any other chunk is looked up in the repository's index
 * (loaded once, on the first fetch, keeping only this backup's chunks), read from its pack with one ranged
 * read, decompressed and checked against its id in the worker pool (the same decoder restore uses), and only
 * then returned (§4.2 rule 2). Concurrent reads of one chunk share one fetch; when the overlay above
 * installed a fill (`setFill`, a writable open), the verified chunk is handed to it (copy-on-read, rule 3)
 * and stays in memory until the fill is done, so no read between fetch and fill fetches it again.
 *
 * While a writer has the image open, the device holds a shared repository lock naming the live restore
 * (rule 5), refreshed in the background: prune's exclusive lock cannot be taken meanwhile.
 */
import { KscError, isDamage } from '../errors.js';
import { SharedSlot, unpackInto } from '../compress/pool.js';
import { BLOB_HEADER } from '../compress/codec.js';
import type { BackupRef } from '../format/header.js';
import { isZeroId } from '../hash/chunkid.js';
import { openStore } from '../objstore/open.js';
import type { ObjectStore } from '../objstore/types.js';
import type { Manifest } from '../repo/manifest.js';
import { ChunkIndex, Repository, type RepoLock, packKey } from '../repo/repository.js';
import { bytesToUuid, uuidToBytes } from '../util/uuid.js';
import { type BlockDevice, type Extent, checkRange, mergeExtents } from './types.js';

export type FillFn = (offset: number, data: Buffer) => Promise<void>;

export interface BackupBackingStats {
  /** Chunks fetched from the repository (each verified). */
  chunksFetched: number;
  bytesFetched: number;
  /** Chunk reads answered from a fetch already in flight or not yet filled. */
  chunksShared: number;
}

export class BackupBacking implements BlockDevice {
  readonly format = 'raw' as const;
  readonly readOnly = true;
  readonly blockSize: number;
  readonly size: number;
  readonly stats: BackupBackingStats = { chunksFetched: 0, bytesFetched: 0, chunksShared: 0 };
  private index: Promise<ChunkIndex> | null = null;
  private readonly badIndex: string[] = [];
  /** Chunk position → its verified data, from the start of its fetch until it is filled (or returned). */
  private readonly inflight = new Map<number, Promise<Buffer>>();
  private readonly fills = new Set<Promise<void>>();
  private fill: FillFn | null = null;
  private closed = false;

  private constructor(readonly name: string, private readonly repo: Repository, private readonly store: ObjectStore,
    readonly manifest: Manifest, private readonly lock: RepoLock | null) {
    this.blockSize = manifest.chunkSize;
    this.size = manifest.size;
  }

  /**
   * Opens the backup `ref` in the repository at `location` as the backing of `image` (virtual size
   * `size`). `hold`: take the shared lock of §4.2 rule 5 (a writer's open). Refuses (KSC_E_CORRUPT) a
   * manifest that is not the one the image names (rule 1).
   */
  static async open(image: string, location: string, ref: BackupRef, size: number, opts: { hold: boolean }): Promise<BackupBacking> {
    const store = await openStore(location).catch((e: unknown) => {
      throw new KscError((e as KscError).code ?? 'KSC_E_UNAVAILABLE', `image ${image}: its backing repository ${location} cannot be opened: ${(e as Error).message}`, { cause: e });
    });
    let lock: RepoLock | null = null;
    try {
      const repo = await Repository.open(store);
      if (opts.hold) lock = await repo.readerLock(`live restore of backup ${ref.id} into ${image}`, 0);
      const m = await repo.readManifest(ref.id);
      const disk = bytesToUuid(ref.disk);
      const why = m.disk !== disk ? `disk ${m.disk}, the image names ${disk}`
        : m.size !== size ? `size ${m.size}, the image is ${size} bytes`
          : m.chunkSize !== ref.chunkSize ? `chunk size ${m.chunkSize}, the image names ${ref.chunkSize}`
            : !m.root.equals(ref.root) ? `Merkle root ${m.root.toString('hex')}, the image names ${ref.root.toString('hex')} (another backup under the same id)`
              : null;
      if (why) throw new KscError('KSC_E_CORRUPT', `image ${image}: the manifest of backup ${ref.id} in ${repo.name} is not the one it was restored from: ${why}`);
      return new BackupBacking(`backup ${ref.id} in ${location}`, repo, store, m, lock);
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

  get chunks(): number {
    return this.manifest.ids.length;
  }

  /** Capability (capabilities.ts): the backed-up disk; a backup is never left half-written. */
  get identity(): { diskUuid: Buffer; wasDirty: boolean } {
    return { diskUuid: uuidToBytes(this.manifest.disk), wasDirty: false };
  }

  private lenAt(k: number): number {
    return Math.min(this.blockSize, this.size - k * this.blockSize);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const b = Buffer.alloc(length);
    await this.readInto(offset, b);
    return b;
  }

  async readInto(offset: number, target: Buffer): Promise<void> {
    this.live();
    checkRange(this, offset, target.length);
    const C = this.blockSize;
    const parts: Promise<void>[] = [];
    for (let pos = offset; pos < offset + target.length;) {
      const k = Math.floor(pos / C);
      const end = Math.min((k + 1) * C, offset + target.length);
      const at = pos - offset;
      const inChunk = pos - k * C;
      const n = end - pos;
      if (this.isZeroChunk(k)) target.fill(0, at, at + n);
      else parts.push(this.chunk(k).then((d) => void d.copy(target, at, inChunk, inChunk + n)));
      pos = end;
    }
    await Promise.all(parts);
  }

  /** Chunk `k`'s verified data: one fetch for concurrent readers, kept until the overlay has filled it. */
  chunk(k: number): Promise<Buffer> {
    const have = this.inflight.get(k);
    if (have) {
      this.stats.chunksShared++;
      return have;
    }
    const p = this.fetch(k).then((data) => {
      const fill = this.fill;
      if (fill && !this.closed) {
        const f = fill(k * this.blockSize, data).catch(() => undefined).finally(() => {
          this.inflight.delete(k);
          this.fills.delete(f);
        });
        this.fills.add(f);
      } else this.inflight.delete(k);
      return data;
    }, (e: unknown) => {
      this.inflight.delete(k);
      throw e;
    });
    this.inflight.set(k, p);
    return p;
  }

  /** Resolves when every fill started so far has finished (tests, pull). */
  async settled(): Promise<void> {
    while (this.fills.size > 0) await Promise.all([...this.fills]);
  }

  private loadIndex(): Promise<ChunkIndex> {
    if (!this.index) {
      const m = this.manifest;
      const needed = new ChunkIndex({ locations: false, expected: m.ids.nonZeroCount() });
      m.ids.forEachNonZero((k) => void needed.addAt(m.ids.view(k), 0, '', 0, 0, 0));
      this.index = this.repo.loadIndex((key) => this.badIndex.push(this.repo.objName(key)), { only: (b, at) => needed.hasAt(b, at) });
      this.index.catch(() => (this.index = null));
    }
    return this.index;
  }

  /** §4.2 rule 2: index → pack → ranged read → decompress and check the id; another copy when one fails. */
  private async fetch(k: number): Promise<Buffer> {
    const id = Buffer.from(this.manifest.ids.view(k));
    const what = `${this.name}: chunk ${k} (${id.toString('hex')})`;
    const index = await this.loadIndex();
    const s = index.slotOf(id);
    if (s < 0) {
      throw new KscError('KSC_E_CORRUPT', `${what} is in no index object${this.badIndex.length ? ` (damaged: ${this.badIndex.join(', ')})` : ''}: repository damaged, run "kscinc verify"`);
    }
    const copies = index.extraCopies === 0 ? [s] : index.copies(s);
    const errors: string[] = [];
    for (const h of copies) {
      const key = packKey(index.packName(h));
      const offset = index.blobOffset(h);
      const length = index.blobLength(h);
      try {
        const slot = new SharedSlot(length, Math.max(this.blockSize, BLOB_HEADER));
        const got = await this.store.getRange(key, offset, length);
        if (got.length !== length) throw new KscError('KSC_E_CORRUPT', `repository object ${this.repo.objName(key)}: ${got.length} bytes at offset ${offset}, ${length} expected`);
        got.copy(slot.input);
        const [r] = await unpackInto(slot, [[0, length]], [id], this.blockSize, this.repo.blobKeys);
        if (!r!.ok) throw new KscError('KSC_E_CORRUPT', `repository object ${this.repo.objName(key)}: chunk ${id.toString('hex')} at offset ${offset}: ${r!.error}`);
        if (r!.data.length !== this.lenAt(k)) throw new KscError('KSC_E_CORRUPT', `${what} is ${r!.data.length} bytes, ${this.lenAt(k)} expected`);
        this.stats.chunksFetched++;
        this.stats.bytesFetched += length;
        return Buffer.from(r!.data); // out of the shared slot: the fill and the readers keep it
      } catch (e) {
        if (!isDamage(e)) throw e;
        errors.push((e as Error).message);
      }
    }
    throw new KscError('KSC_E_CORRUPT', `${what}: every copy failed its check: ${errors.join('; ')}`);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    checkRange(this, offset, length);
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

  /** Throws KSC_E_LOCKED when the shared lock of §4.2 rule 5 was lost. */
  checkLock(): void {
    this.lock?.check();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all([...this.fills]).catch(() => undefined);
    await this.lock?.release();
    await this.store.close();
  }

  private live(): void {
    if (this.closed) throw new KscError('KSC_E_CLOSED', `${this.name}: closed`);
  }

  private readOnlyError(): KscError {
    return new KscError('KSC_E_READ_ONLY', `${this.name}: a backup is read-only (writes go to the image above it)`);
  }
}
