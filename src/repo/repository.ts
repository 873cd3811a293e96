/**
 * A backup repository on any ObjectStore (formats/repository.md): config, packs, index objects, manifests
 * and locks. The engines (backup, restore, verify, prune) are built on this class; it owns the object
 * names and the §9 write ordering of the pieces it writes.
 */
import { crc32 } from 'node:zlib';
import { KscError, isDamage, isKscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { ID_BYTES, initHash } from '../hash/chunkid.js';
import { STALE_MS, RepoLock, listLocks, takeLock, unlockStale, systemLockClock, type LockInfo, type LockTiming } from './locks.js';
import { ChunkIndex } from './chunkindex.js';
import { storeForList } from './chunklist.js';
import { isoUtc } from '../util/time.js';
import { mapLimit } from '../util/concurrency.js';
import {
  type RepoConfig, type IndexEntry, type Manifest, type ManifestInfo, type PackEntry, readManifestInfoFrom,
  DEFAULT_CHUNK, DEFAULT_PACK, checkChunkSize, encodeConfig, decodeConfig, randomHexId,
  packHeader, packFooter, decodePackTail, decodePackEntries, FOOTER_TAIL, FOOTER_ENTRY, PACK_HEADER,
  encodeIndex, visitIndex, indexHeader, manifestBody, decodeManifest, readManifestFrom, BACKUP_ID_RE, MIB, INDEX_HEADER, INDEX_ENTRY,
} from './format.js';

/** Called for each index entry: the id is the 16 bytes of `b` at `at` (a view valid during the call). */
export type IndexVisitor = (b: Buffer, at: number, pack: string, offset: number, length: number, rawLength: number) => void;

export const CONFIG_KEY = 'config';
export const packKey = (id: string): string => `packs/${id.slice(0, 2)}/${id}.pack`;
export const indexKey = (id: string): string => `index/${id}.idx`;
export const manifestKey = (id: string): string => `manifests/${id}.manifest`;
const PACK_KEY_RE = /^packs\/[0-9a-f]{2}\/([0-9a-f]{32})\.pack$/;
const INDEX_KEY_RE = /^index\/([0-9a-f]{32})\.idx$/;
const MANIFEST_KEY_RE = /^manifests\/(.+)\.manifest$/;

export { STALE_MS, lockKey, RepoLock, type LockInfo, type LockTiming, type LockClock, systemLockClock } from './locks.js';

export { ChunkIndex, type ChunkLocation } from './chunkindex.js';

// re-export for src/engines/backup.ts and src/engines/prune.ts; remove after merge (mapLimit lives in util/concurrency.ts).
export { mapLimit } from '../util/concurrency.js';

/** How long a reader waits for a prune's exclusive lock to go. */
const READER_WAIT_MS = 30 * 60_000;

/** The folders only a repository has (§1): a location holding any of them is a repository. */
const REPO_PREFIXES = ['manifests/', 'index/', 'packs/', 'locks/'];

/**
 * What a location without a config holds (§3.1): nothing, repository objects (its config was lost), or
 * other objects. Reads one listing entry per repository folder, then the first entry of the location.
 */
export async function locationState(store: ObjectStore): Promise<{ kind: 'empty' } | { kind: 'repository' | 'other'; example: string }> {
  for (const prefix of REPO_PREFIXES) {
    for await (const o of store.list(prefix)) return { kind: 'repository', example: o.key };
  }
  for await (const o of store.list('')) return { kind: 'other', example: o.key };
  return { kind: 'empty' };
}

function lostConfig(store: ObjectStore, example: string): KscError {
  return new KscError('KSC_E_CORRUPT', `${store.name} holds repository objects (e.g. ${example}) but no config object: the repository's config was lost or deleted. Nothing was changed. Rebuild it from the manifests with "kscinc repo repair ${store.name}" (formats/repository.md §3.1)`);
}

/** Manifests above this size are read in ranges (a densely written disk of 512 GiB or more). */
const STREAM_MANIFEST = 8 * MIB;

export class Repository {
  /** Manifest sizes from the last listing (so reading one needs no stat). */
  private readonly manifestSizes = new Map<string, number>();

  /** The lock lifetime and the clocks locks use (tests shorten the one and skew the others). */
  lockTiming: LockTiming = { staleMs: STALE_MS, clock: systemLockClock };

  private constructor(readonly store: ObjectStore, readonly config: RepoConfig) {}

  get name(): string {
    return this.store.name;
  }
  get chunkSize(): number {
    return this.config.chunkSize;
  }

  /**
   * Creates a repository (§3.1): only where the location is empty. KSC_E_EXISTS when there is a repository
   * already or the location holds other objects; KSC_E_CORRUPT when it holds repository objects without a
   * config (a lost config: see repo repair).
   */
  static async init(store: ObjectStore, opts: { chunkSize?: number; packSize?: number } = {}): Promise<Repository> {
    if (await store.stat(CONFIG_KEY)) throw new KscError('KSC_E_EXISTS', `${store.name} is already a kscinc repository`);
    const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK;
    checkChunkSize(chunkSize);
    const packSize = opts.packSize ?? DEFAULT_PACK;
    if (!Number.isInteger(packSize) || packSize < 4 * MIB || packSize > 256 * MIB) throw new KscError('KSC_E_INVALID', `pack size ${packSize} must be 4 MiB … 256 MiB`);
    const where = await locationState(store);
    if (where.kind === 'repository') throw lostConfig(store, where.example);
    if (where.kind === 'other') {
      throw new KscError('KSC_E_EXISTS', `${store.name} is not empty and is not a kscinc repository (it holds ${where.example}): refusing to create a repository among other files; use a new or empty folder or prefix`);
    }
    const config: RepoConfig = { format: 'kscinc-repository', version: 1, id: randomHexId(), chunkSize, packSize, created: isoUtc(Date.now()) };
    await store.put(CONFIG_KEY, encodeConfig(config));
    await initHash();
    // Two inits racing on an empty location both put a config; whichever landed last is the repository's,
    // and both go on with it (§3.1).
    return new Repository(store, decodeConfig(await store.get(CONFIG_KEY), `${store.name}/config`));
  }

  /**
   * Opens the repository at `store`; never writes. Without a config: KSC_E_CORRUPT when the location holds
   * repository objects (a lost config, §3.1), KSC_E_NOT_FOUND otherwise.
   */
  static async open(store: ObjectStore): Promise<Repository> {
    await initHash(); // manifests are checked against their Merkle root
    let raw: Buffer;
    try {
      raw = await store.get(CONFIG_KEY);
    } catch (e) {
      if (!isKscError(e, 'KSC_E_NOT_FOUND')) throw e;
      const where = await locationState(store);
      if (where.kind === 'repository') throw lostConfig(store, where.example);
      throw new KscError('KSC_E_NOT_FOUND', where.kind === 'empty'
        ? `${store.name} is not a kscinc repository (it is empty; create one with "kscinc repo init" or a first backup)`
        : `${store.name} is not a kscinc repository (no config object; it holds other files, e.g. ${where.example})`);
    }
    try {
      return new Repository(store, decodeConfig(raw, `${store.name}/config`));
    } catch (e) {
      if (!isKscError(e, 'KSC_E_CORRUPT')) throw e;
      throw new KscError('KSC_E_CORRUPT', `${e.message}. Nothing was changed. Rebuild it from the manifests with "kscinc repo repair ${store.name}" (formats/repository.md §3.1)`, { cause: e });
    }
  }

  /** Opens the repository, or creates one when the location is empty (a first backup); see init. */
  static async openOrInit(store: ObjectStore, opts: { chunkSize?: number; packSize?: number } = {}): Promise<Repository> {
    try {
      return await Repository.open(store);
    } catch (e) {
      if (!isKscError(e, 'KSC_E_NOT_FOUND') || (await store.stat(CONFIG_KEY))) throw e;
      try {
        return await Repository.init(store, opts);
      } catch (e2) {
        if (isKscError(e2, 'KSC_E_EXISTS') && (await store.stat(CONFIG_KEY))) return Repository.open(store); // a concurrent init won
        throw e2;
      }
    }
  }

  objName(key: string): string {
    return `${this.store.name}/${key}`;
  }

  // index ----------------------------------------------------------------------------------------------

  async listIndexObjects(): Promise<string[]> {
    return (await this.indexObjects()).map((o) => o.id);
  }

  /** The index objects with their sizes. */
  async indexObjects(): Promise<{ id: string; size: number }[]> {
    const out: { id: string; size: number }[] = [];
    for await (const o of this.store.list('index/')) {
      const m = INDEX_KEY_RE.exec(o.key);
      if (m) out.push({ id: m[1]!, size: o.size });
    }
    return out;
  }

  /** How many entries the index objects hold, from their sizes (an upper bound on the distinct chunks). */
  static entriesIn(objects: { size: number }[]): number {
    return objects.reduce((s, o) => s + Math.max(0, Math.floor((o.size - INDEX_HEADER) / INDEX_ENTRY)), 0);
  }

  /**
   * Calls `visit` for every entry of every index object (`objects`, default all), a few objects at a time
   * and without keeping them. A damaged object is reported through `onDamage` (or thrown when absent).
   * Returns the ids of the objects read whole.
   */
  async visitIndexEntries(visit: IndexVisitor, onDamage?: (key: string, e: KscError) => void, objects?: string[]): Promise<string[]> {
    const read: string[] = [];
    await mapLimit(objects ?? (await this.listIndexObjects()), 8, async (id) => {
      const key = indexKey(id);
      try {
        visitIndex(await this.store.get(key), this.objName(key), visit);
        read.push(id);
      } catch (e) {
        if (onDamage && isDamage(e)) onDamage(key, e);
        else throw e;
      }
    });
    return read;
  }

  /**
   * Reads index objects in ranges of about 4 MiB, two objects at a time, so memory stays flat however large
   * they are (prune writes one object naming every chunk in use). For each object `open(id)` gives a
   * visitor of its entries (ids and packs only) and a `done` called once the whole object has passed its
   * checks: entries are seen before the checksum is, so whatever must not come from a damaged object waits
   * for `done`. A damaged object is reported through `onDamage` (or thrown when absent).
   */
  async streamIndexIds(objects: { id: string; size: number }[], open: (id: string) => { visit: (b: Buffer, at: number, pack: string) => void; done?: () => void }, onDamage?: (key: string, e: KscError) => void): Promise<void> {
    await mapLimit(objects, 2, async ({ id, size }) => {
      const key = indexKey(id);
      const name = this.objName(key);
      try {
        if (size < INDEX_HEADER) throw new KscError('KSC_E_CORRUPT', `repository object ${name}: not an index object (bad magic or truncated)`);
        const head = await this.store.getRange(key, 0, INDEX_HEADER);
        const { packs: p, entries: e } = indexHeader(head, size, name);
        const table = await this.store.getRange(key, INDEX_HEADER, p * 16);
        let crc = crc32(table, crc32(head.subarray(0, 28)));
        const packs: string[] = [];
        for (let i = 0; i < p; i++) packs.push(table.toString('hex', i * 16, i * 16 + 16));
        const v = open(id);
        const per = Math.max(1, Math.floor((4 * MIB) / INDEX_ENTRY));
        for (let i = 0; i < e; i += per) {
          const n = Math.min(per, e - i);
          const b = await this.store.getRange(key, INDEX_HEADER + p * 16 + i * INDEX_ENTRY, n * INDEX_ENTRY);
          crc = crc32(b, crc);
          for (let j = 0, o = 0; j < n; j++, o += INDEX_ENTRY) {
            const pn = b.readUInt32LE(o + 16);
            if (pn >= p) throw new KscError('KSC_E_CORRUPT', `repository object ${name}: entry ${i + j} names pack number ${pn} of ${p}`);
            if (b.readUInt32LE(o + 28) > 0x1fffff) throw new KscError('KSC_E_CORRUPT', `repository object ${name}: blob offset ${b.readBigUInt64LE(o + 24)} is above 2^53`);
            v.visit(b, o, packs[pn]!);
          }
        }
        if (crc !== head.readUInt32LE(28)) throw new KscError('KSC_E_CORRUPT', `repository object ${name}: checksum mismatch`);
        v.done?.();
      } catch (e) {
        if (onDamage && isDamage(e)) onDamage(key, e);
        else throw e;
      }
    });
  }

  /**
   * Reads every index object. A damaged one is reported through `onDamage` (or thrown when absent).
   * `locations: false` keeps ids and packs only (for dedupe); `only` keeps just the entries whose id (16
   * bytes of `b` at `at`) it accepts (for a restore: the chunks of one backup), so memory follows what is
   * needed, not the repository.
   */
  async loadIndex(onDamage?: (key: string, e: KscError) => void, opts: { locations?: boolean; only?: (b: Buffer, at: number) => boolean } = {}): Promise<ChunkIndex> {
    const idx = new ChunkIndex({ locations: opts.locations ?? true });
    const only = opts.only;
    // Entries go straight into the table (no object per entry: an index object can list millions).
    const read = await this.visitIndexEntries((b, at, pack, offset, length, rawLength) => {
      if (!only || only(b, at)) idx.addAt(b, at, pack, offset, length, rawLength);
    }, onDamage);
    idx.objects.push(...read);
    return idx;
  }

  /** Writes an index object of `entries` (iterated twice: see encodeIndex). */
  async putIndex(entries: Iterable<IndexEntry>): Promise<string> {
    const id = randomHexId();
    await this.store.put(indexKey(id), encodeIndex(entries));
    return id;
  }

  // packs ----------------------------------------------------------------------------------------------

  async listPacks(): Promise<Map<string, { size: number; mtimeMs: number }>> {
    const out = new Map<string, { size: number; mtimeMs: number }>();
    for await (const o of this.store.list('packs/')) {
      const m = PACK_KEY_RE.exec(o.key);
      if (m) out.set(m[1]!, { size: o.size, mtimeMs: o.mtimeMs });
    }
    return out;
  }

  /** Reads and checks a pack's footer (§5.3): the chunks it holds. */
  async readPackFooter(pack: string, size?: number): Promise<PackEntry[]> {
    const key = packKey(pack);
    const name = this.objName(key);
    const total = size ?? (await this.store.stat(key))?.size;
    if (total === undefined) throw new KscError('KSC_E_NOT_FOUND', `repository object ${name} is missing`);
    if (total < PACK_HEADER + FOOTER_TAIL) throw new KscError('KSC_E_CORRUPT', `repository object ${name}: ${total} bytes is too short for a pack (truncated?)`);
    const tail = decodePackTail(await this.store.getRange(key, total - FOOTER_TAIL, FOOTER_TAIL), total, name);
    const entries = await this.store.getRange(key, tail.entriesOffset, tail.count * FOOTER_ENTRY);
    return decodePackEntries(entries, tail.count, tail.entriesCrc, tail.entriesOffset, name);
  }

  /** Starts writing packs; see PackWriter. */
  packWriter(opts: { uploads?: number } = {}): PackWriter {
    return new PackWriter(this, opts.uploads ?? 2);
  }

  // manifests ------------------------------------------------------------------------------------------

  /** Backup ids, oldest first. */
  async listBackupIds(): Promise<string[]> {
    const out: string[] = [];
    for await (const o of this.store.list('manifests/')) {
      const m = MANIFEST_KEY_RE.exec(o.key);
      if (m && BACKUP_ID_RE.test(m[1]!)) {
        out.push(m[1]!);
        this.manifestSizes.set(m[1]!, o.size);
      }
    }
    return out.sort();
  }

  async readManifest(id: string): Promise<Manifest> {
    // A large manifest is read in ranges, never whole.
    return this.manifestObject(id, (key, size) => (size > STREAM_MANIFEST
      ? readManifestFrom(size, (offset, length) => this.store.getRange(key, offset, length), this.objName(key), storeForList)
      : this.store.get(key).then((b) => decodeManifest(b, this.objName(key), storeForList))));
  }

  /**
   * A manifest's header and metadata (disk, time, size, token, tags…) without its chunk list: a small
   * manifest is read and checked whole, a large one only as far as its metadata (a search through the
   * backups of large disks then reads a few hundred bytes of each, not all their ids).
   */
  async readManifestInfo(id: string): Promise<ManifestInfo> {
    return this.manifestObject(id, async (key, size): Promise<ManifestInfo> => {
      if (size > STREAM_MANIFEST) return readManifestInfoFrom(size, (offset, length) => this.store.getRange(key, offset, length), this.objName(key));
      const { ids: _ids, root: _root, ...info } = decodeManifest(await this.store.get(key), this.objName(key));
      return info;
    });
  }

  /**
   * Reads backup `id`'s manifest through `read` (given its key and size: from the last listing, else a
   * stat), with the checks every reader needs: a backup id, the object there, holding that backup, of
   * this repository's chunk size.
   */
  private async manifestObject<T extends ManifestInfo>(id: string, read: (key: string, size: number) => Promise<T>): Promise<T> {
    if (!BACKUP_ID_RE.test(id)) throw new KscError('KSC_E_INVALID', `"${id}" is not a backup id (like 20261126T125422123Z-1a2b3c4d)`);
    const key = manifestKey(id);
    let m: T;
    try {
      const size = this.manifestSizes.get(id) ?? (await this.store.stat(key))?.size;
      if (size === undefined) throw new KscError('KSC_E_NOT_FOUND', `${this.name}: no object ${key}`);
      this.manifestSizes.set(id, size);
      m = await read(key, size);
    } catch (e) {
      if (isKscError(e, 'KSC_E_NOT_FOUND')) {
        this.manifestSizes.delete(id);
        throw new KscError('KSC_E_NOT_FOUND', `no backup ${id} in ${this.name}`);
      }
      throw e;
    }
    if (m.meta.id !== id) throw new KscError('KSC_E_CORRUPT', `repository object ${this.objName(key)}: holds backup ${m.meta.id}, not ${id}`);
    if (m.chunkSize !== this.chunkSize) throw new KscError('KSC_E_CORRUPT', `repository object ${this.objName(key)}: chunk size ${m.chunkSize} differs from the repository's ${this.chunkSize}`);
    return m;
  }

  /** §9 rule 3: the commit point of a backup. */
  async putManifest(m: Omit<Manifest, 'root'>): Promise<void> {
    await this.store.put(manifestKey(m.meta.id), manifestBody(m));
  }

  async deleteManifest(id: string): Promise<void> {
    await this.store.delete(manifestKey(id));
  }

  // locks (§8, locks.ts) --------------------------------------------------------------------------------

  /** Every object under locks/, judged by the storage's clock (at storage time `now`, default: a probe's). */
  async listLocks(now?: number): Promise<LockInfo[]> {
    return listLocks(this.store, this.lockTiming, now);
  }

  /**
   * Takes a lock or fails with KSC_E_LOCKED naming the holder; with `waitMs`, waits that long for a
   * blocking lock to go away first.
   */
  async lock(kind: 'shared' | 'exclusive', what: string, opts: { waitMs?: number } = {}): Promise<RepoLock> {
    return takeLock(this.store, this.lockTiming, kind, what, opts);
  }

  /**
   * §8 rule 6: a reader's shared lock (restore, verify), waiting up to `waitMs` (default 30 min) for a prune
   * to end. Null when the lock object cannot be written at all (a read-only repository): the reader then
   * goes on without one.
   */
  async readerLock(what: string, waitMs = READER_WAIT_MS): Promise<RepoLock | null> {
    try {
      return await this.lock('shared', what, { waitMs });
    } catch (e) {
      if (isKscError(e, 'KSC_E_LOCKED') || !isKscError(e) || e.code === 'KSC_E_UNAVAILABLE') throw e;
      return null;
    }
  }

  /** Deletes stale locks and garbage lock objects (every lock with `force`): what it removed and kept, with reasons. */
  async unlock(force = false): Promise<{ removed: LockInfo[]; kept: LockInfo[] }> {
    return unlockStale(this.store, this.lockTiming, force);
  }
}

/**
 * Groups blobs into packs of about `packSize` bytes and uploads each when full (at most `uploads` in
 * flight, so memory stays bounded at (uploads + 1) × packSize). `entries` lists every chunk of every pack
 * whose upload completed (§9 rule 1: only these may go into an index object).
 */
export class PackWriter {
  private parts: Buffer[] = [];
  private pending: PackEntry[] = [];
  private bytes = 0;
  private inFlight = new Set<Promise<void>>();
  private error: unknown = null;
  /** The chunks of the uploaded packs, 32 bytes each (a full backup of a large disk writes millions). */
  private readonly written: { pack: string; ids: Buffer; offset: Float64Array; length: Uint32Array; rawLength: Uint32Array }[] = [];
  private writtenCount = 0;
  readonly packsWritten: string[] = [];
  bytesUploaded = 0;
  /** Ids queued or stored by this writer (so one backup never stores a chunk twice), as a compact set. */
  private seen = new ChunkIndex({ locations: false });
  /** Index objects flushIndex wrote. */
  readonly indexObjects: string[] = [];

  constructor(private readonly repo: Repository, private readonly maxUploads: number) {}

  has(id: Buffer | string): boolean {
    return this.seen.has(id);
  }

  /**
   * Every chunk of every pack whose upload completed. Each iteration starts afresh and makes its entries
   * as it goes (nothing is held per entry but the 32 bytes above).
   */
  get entries(): Iterable<IndexEntry> & { readonly count: number } {
    const written = this.written;
    return {
      count: this.writtenCount,
      *[Symbol.iterator](): Generator<IndexEntry> {
        for (const g of written) {
          for (let i = 0; i < g.offset.length; i++) {
            yield { id: g.ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES), pack: g.pack, offset: g.offset[i]!, length: g.length[i]!, rawLength: g.rawLength[i]! };
          }
        }
      },
    };
  }

  /** Adds a blob; resolves when there is room for more (back-pressure). */
  async add(id: Buffer, blob: Buffer, rawLength: number): Promise<void> {
    if (this.error) throw this.error;
    if (this.seen.has(id)) return;
    this.seen.addAt(id, 0, '', 0, 0, 0);
    if (this.parts.length === 0) {
      this.parts.push(packHeader());
      this.bytes = PACK_HEADER;
    }
    this.pending.push({ id: Buffer.from(id), offset: this.bytes, length: blob.length, rawLength });
    this.parts.push(blob); // a view into a worker's result buffer, kept until the pack is uploaded
    this.bytes += blob.length;
    if (this.bytes >= this.repo.config.packSize) await this.seal();
  }

  private async seal(): Promise<void> {
    if (this.pending.length === 0) return;
    const parts = this.parts;
    const entries = this.pending;
    parts.push(packFooter(entries, this.bytes));
    const size = this.bytes + entries.length * FOOTER_ENTRY + FOOTER_TAIL;
    this.parts = [];
    this.pending = [];
    this.bytes = 0;
    while (this.inFlight.size >= this.maxUploads) await Promise.race(this.inFlight);
    if (this.error) throw this.error;
    const id = randomHexId();
    const p = this.repo.store.put(packKey(id), parts).then(
      () => {
        const n = entries.length;
        const g = { pack: id, ids: Buffer.allocUnsafe(n * ID_BYTES), offset: new Float64Array(n), length: new Uint32Array(n), rawLength: new Uint32Array(n) };
        entries.forEach((e, i) => {
          e.id.copy(g.ids, i * ID_BYTES, 0, ID_BYTES);
          g.offset[i] = e.offset;
          g.length[i] = e.length;
          g.rawLength[i] = e.rawLength;
        });
        this.written.push(g);
        this.writtenCount += n;
        this.packsWritten.push(id);
        this.bytesUploaded += size;
      },
      (e) => {
        this.error ??= e;
      },
    ).finally(() => this.inFlight.delete(p));
    this.inFlight.add(p);
  }

  /** Seals the last pack and waits for every upload; throws the first upload error. */
  async finish(): Promise<void> {
    if (!this.error) await this.seal().catch((e) => (this.error ??= e));
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
    if (this.error) throw this.error;
  }

  /** Ids queued or stored since the last flushIndex (what `has` answers from). */
  get seenCount(): number {
    return this.seen.size;
  }

  /**
   * Seals the open pack, waits for every upload, and writes one index object naming the chunks uploaded
   * since the last flush and `extra` (§9 rules 1–2); then forgets them, `has` included: from here on the
   * repository's index objects name them. Returns the object's id (null when there was nothing to name).
   */
  async flushIndex(extra: IndexEntry[] = []): Promise<string | null> {
    await this.finish();
    const entries = this.entries;
    let id: string | null = null;
    if (entries.count + extra.length > 0) {
      id = await this.repo.putIndex({ *[Symbol.iterator]() { yield* entries; yield* extra; } });
      this.indexObjects.push(id);
    }
    this.written.length = 0;
    this.writtenCount = 0;
    this.seen = new ChunkIndex({ locations: false });
    return id;
  }

  /** Waits for uploads already started (used when abandoning: never leaves promises dangling). */
  async abandon(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
  }
}

export { ID_BYTES };
