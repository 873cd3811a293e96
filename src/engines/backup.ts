/**
 * The backup engine: reads the chunks a disk's dirty bitmap marks (all chunks for a full backup), hashes,
 * deduplicates and compresses them in workers, packs and uploads them, then commits an index object and a
 * manifest (formats/repository.md §9). The bitmap handover (§10) keeps every change tracked whatever
 * happens: writes during the backup go to the live bitmap, and a failed backup merges the frozen bits back.
 */
import { mkdtemp, open, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { randomBytes } from 'node:crypto';
import { join, resolve } from 'node:path';
import { KscError, isKscError } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { KscImage } from '../image/ksc.js';
import { ID_BYTES, chunkId, initHash, ZERO_ID } from '../hash/chunkid.js';
import { packBatch, poolStarted, warmPool } from '../compress/pool.js';
import { Repository, ChunkIndex, mapLimit } from '../repo/repository.js';
import { BloomFilter } from '../repo/bloom.js';
import { type Manifest, type IndexEntry, backupId, chunkCount } from '../repo/format.js';
import { ChunkList, storeForList } from '../repo/chunklist.js';
import { bytesToUuid } from '../util/uuid.js';
import { BitSet } from '../util/bitset.js';

export const FROZEN_SUFFIX = '~frozen';
export const TOKEN_SEPARATOR = '#';
export const DEFAULT_BITMAP = 'backup';
/** Bitmap names are at most 64 bytes and the token record adds 33. */
export const MAX_BACKUP_BITMAP_NAME = 31;
/** An incremental with at most this many dirty chunks reads them all without asking the map which hold data. */
const DIRECT_READ_CHUNKS = 64;
/** Defaults of BackupOptions.exactIds and windowChunks. */
const EXACT_IDS = 1 << 20;
const WINDOW_CHUNKS = 1 << 17;
/** Maybes kept before they are settled (at most; fewer with smaller windows). */
const MAYBE_LIMIT = 1 << 16;
/** Default of BackupOptions.inlineBytes. */
const INLINE_BYTES = 16 * 1024 * 1024;

export interface BackupProgress {
  phase: 'plan' | 'read' | 'commit';
  doneBytes: number;
  totalBytes: number;
}

export interface BackupOptions {
  /** Dirty bitmap to use and hand over (ksc_inc images); default "backup"; null: none (always full). */
  bitmap?: string | null;
  /** Read every chunk even when the bitmap could be used. */
  full?: boolean;
  tags?: string[];
  /** Recorded in the manifest; default the device name. */
  source?: string;
  progress?: (p: BackupProgress) => void;
  /** Chunks per worker task (default: 4 MiB worth). */
  batchBytes?: number;
  /** Worker batches in flight (default 3). */
  batches?: number;
  /**
   * Up to this many bytes to read, the chunks are hashed and compressed on the caller's thread instead of
   * the worker pool (default: 16 MiB when the pool is not running yet, 0 when it is).
   */
  inlineBytes?: number;
  now?: () => number;
  /**
   * Most chunk ids (the index's plus this backup's new ones) to dedupe against exactly in memory (20 bytes
   * a slot); above it a Bloom filter (≈ 1.2 bytes an id) and windows of `windowChunks`.
   */
  exactIds?: number; // default 1 Mi
  /** Chunks read per window when deduplicating through the filter (default 128 Ki). */
  windowChunks?: number;
  /**
   * Bits of the filter per id (default 10: ≈ 1% of new chunks read twice). 0, for tests: the filter says
   * "maybe" to every id, so every new chunk is read twice and the parent's chunks are not checked at all.
   */
  filterBitsPerId?: number;
}

export interface BackupResult {
  id: string;
  repository: string;
  disk: string;
  parent: string | null;
  full: boolean;
  /** Why the backup was full, when it was. */
  fullReason: string | null;
  size: number;
  chunks: number;
  chunksDirty: number;
  chunksNew: number;
  /** Chunks read twice: the Bloom filter said "maybe", the index objects said no (dedupe 'filter' only). */
  chunksReread: number;
  /** How the backup deduplicated: against the index in memory, or a Bloom filter settled by the index objects. */
  dedupe: 'exact' | 'filter';
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  bytesUploaded: number;
  /** Raw bytes of the dirty non-zero chunks over the raw bytes that had to be stored. */
  dedupeRatio: number;
  durationMs: number;
  /** Bytes read per second. */
  throughput: number;
}

/** §7.4: the UUID of a disk without one. */
export async function diskUuidOf(dev: BlockDevice): Promise<string> {
  if (dev instanceof KscImage) return bytesToUuid(dev.diskUuid);
  await initHash();
  return bytesToUuid(chunkId(Buffer.from(resolve(dev.name), 'utf8')));
}

/**
 * A point-in-time view of chunks of a live image (copy-before-write): before a change touches a chunk the
 * backup still has to read, the old contents are read and kept (spilled to a temporary file beyond
 * `memLimit`). Installed inside KscImage.quiesce(), so it starts at a point with no change in flight.
 */
class FrozenView {
  private readonly pending = new Map<number, Promise<Buffer>>();
  private readonly spilled = new Map<number, { pos: number; len: number }>();
  private readonly done: BitSet;
  private memBytes = 0;
  private spill: { dir: string; fh: FileHandle; end: number } | null = null;
  private spillOpen: Promise<void> | null = null;

  constructor(private readonly dev: BlockDevice, private readonly chunkSize: number, private readonly needed: BitSet, private readonly memLimit = 16 * 1024 * 1024) {
    this.done = new BitSet(needed.size);
  }

  /** Reads made by takeInto(…, keep) (not in `pending`: their buffer is the caller's). */
  private readonly reading = new Map<number, Promise<unknown>>();

  readonly hook = async (offset: number, length: number): Promise<void> => {
    const k0 = Math.floor(offset / this.chunkSize);
    const k1 = Math.floor((offset + length - 1) / this.chunkSize);
    for (let k = k0; k <= k1; k++) {
      if (!this.needed.has(k) || this.done.has(k) || this.spilled.has(k)) continue;
      const r = this.reading.get(k);
      if (r) await r; // the change waits for a read of the old contents in flight…
      if (this.done.has(k) || this.spilled.has(k)) continue;
      const data = await this.obtain(k); // …and then keeps its own copy
      if (!this.done.has(k) && this.pending.has(k) && this.memBytes > this.memLimit) await this.spillChunk(k, data);
    }
  };

  private obtain(k: number): Promise<Buffer> {
    let p = this.pending.get(k);
    if (!p) {
      const off = k * this.chunkSize;
      p = this.dev.read(off, Math.min(this.chunkSize, this.dev.size - off));
      this.pending.set(k, p);
      void p.then((b) => (this.memBytes += b.length), () => undefined);
    }
    return p;
  }

  private async spillChunk(k: number, shared: Buffer): Promise<void> {
    // Copy first, synchronously: `shared` may be the backup's own batch buffer, about to go to a worker.
    const data = Buffer.from(shared);
    this.spillOpen ??= (async () => {
      const dir = await mkdtemp(join(tmpdir(), 'kscinc-frozen-'));
      this.spill = { dir, fh: await open(join(dir, 'stash'), 'w+'), end: 0 };
    })();
    await this.spillOpen;
    if (this.done.has(k) || !this.pending.has(k)) return;
    const s = this.spill!;
    const pos = s.end;
    s.end += data.length;
    await s.fh.write(data, 0, data.length, pos);
    if (this.done.has(k) || !this.pending.has(k)) return;
    this.spilled.set(k, { pos, len: data.length });
    this.pending.delete(k);
    this.memBytes -= data.length;
  }

  /**
   * Reads the chunk as it was at the freeze into `target`. With `keep`, the view goes on keeping the chunk
   * (a change still copies it first) until release(k) or a read without `keep`.
   */
  async takeInto(k: number, target: Buffer, keep = false): Promise<void> {
    if (keep) {
      const sp = this.spilled.get(k);
      if (sp) await this.spill!.fh.read(target, 0, sp.len, sp.pos);
      else if (this.pending.has(k)) (await this.pending.get(k)!).copy(target);
      else {
        const p = this.dev.readInto(k * this.chunkSize, target).then(() => undefined);
        this.reading.set(k, p.catch(() => undefined));
        try {
          await p;
        } finally {
          this.reading.delete(k);
        }
      }
      return;
    }
    const sp = this.spilled.get(k);
    if (sp || this.pending.has(k)) {
      (await this.take(k)).copy(target);
      return;
    }
    // Read straight into the target; a change arriving meanwhile waits for this read (and copies it if it spills).
    const p = this.dev.readInto(k * this.chunkSize, target).then(() => target);
    this.pending.set(k, p);
    try {
      await p;
    } finally {
      this.pending.delete(k);
      this.done.add(k);
    }
  }

  /** The chunk as it was at the freeze. */
  async take(k: number): Promise<Buffer> {
    const sp = this.spilled.get(k);
    if (sp) {
      const b = Buffer.allocUnsafe(sp.len);
      await this.spill!.fh.read(b, 0, sp.len, sp.pos);
      this.spilled.delete(k);
      this.done.add(k);
      return b;
    }
    const data = await this.obtain(k);
    if (this.pending.delete(k)) this.memBytes -= data.length;
    this.done.add(k);
    return data;
  }

  /** The backup is done with chunk `k`: a change no longer copies it, and any copy kept is dropped. */
  release(k: number): void {
    if (!this.needed.has(k) || this.done.has(k)) return;
    this.done.add(k);
    this.spilled.delete(k);
    const p = this.pending.get(k);
    if (p) {
      this.pending.delete(k);
      void p.then((b) => (this.memBytes -= b.length), () => undefined);
    }
  }

  async close(): Promise<void> {
    if (this.spillOpen) await this.spillOpen.catch(() => undefined);
    if (this.spill) {
      await this.spill.fh.close().catch(() => undefined);
      await rm(this.spill.dir, { recursive: true, force: true });
    }
  }
}

/** Bitmap bookkeeping on the image (§10). */
function tokenBitmaps(names: string[], bitmap: string): string[] {
  const prefix = bitmap + TOKEN_SEPARATOR;
  return names.filter((n) => n.startsWith(prefix) && /^[0-9a-f]{32}$/.test(n.slice(prefix.length)));
}

/** §10 step 4 for a crash: merges a leftover frozen bitmap back. Returns true when there was one. */
export async function recoverFrozenBitmap(img: KscImage, bitmap: string): Promise<boolean> {
  const frozen = bitmap + FROZEN_SUFFIX;
  if (!img.hasBitmap(frozen)) return false;
  if (img.hasBitmap(bitmap)) await img.mergeBitmap(frozen, bitmap);
  await img.removeBitmap(frozen);
  return true;
}

function chunkSetFromExtents(extents: { offset: number; length: number }[], chunkSize: number, into: BitSet): void {
  for (const e of extents) {
    if (e.length > 0) into.addRange(Math.floor(e.offset / chunkSize), Math.floor((e.offset + e.length - 1) / chunkSize));
  }
}

/** Runs of consecutive members of `set` as [first, last] pairs, in order. */
function* runsOf(set: BitSet): Generator<[number, number]> {
  let first = -1, last = -2;
  for (const k of set) {
    if (k !== last + 1) {
      if (first >= 0) yield [first, last];
      first = k;
    }
    last = k;
  }
  if (first >= 0) yield [first, last];
}

/** The numbers of `items` (a BitSet's in ascending order) in groups of up to `n`, made as they are taken. */
function* groupsOf(items: Iterable<number>, n: number): Generator<number[]> {
  let g: number[] = [];
  for (const k of items) {
    g.push(k);
    if (g.length === n) {
      yield g;
      g = [];
    }
  }
  if (g.length > 0) yield g;
}

/**
 * The repository's index as a backup sees it when it is too large to hold exactly (§9, "Deduplicating
 * against a large index"): a Bloom filter of the chunk ids and the set of packs the index names.
 */
class IndexFilter {
  readonly bloom: BloomFilter;
  private readonly packs = new ChunkIndex({ locations: false });
  private readonly scratch = Buffer.alloc(16);

  constructor(expected: number, bitsPerId?: number) {
    this.bloom = new BloomFilter(expected, bitsPerId);
  }

  /** From an exact index, for `more` ids still to come. */
  static of(index: ChunkIndex, more: number, bitsPerId?: number): IndexFilter {
    const f = new IndexFilter(index.size + more, bitsPerId);
    for (const p of index.packList()) f.addPack(p);
    for (let s = 0; s < index.slots; s++) if (index.packNumber(s) >= 0) f.bloom.addAt(index.idAt(s), 0);
    return f;
  }

  addAt(b: Buffer, at: number, pack: string): void {
    this.bloom.addAt(b, at);
    this.addPack(pack);
  }

  addPack(pack: string): void {
    this.scratch.write(pack, 'hex');
    if (!this.packs.hasAt(this.scratch, 0)) this.packs.addAt(this.scratch, 0, '', 0, 0, 0);
  }

  add(e: IndexEntry): void {
    this.addAt(e.id, 0, e.pack);
  }

  hasPack(pack: string): boolean {
    this.scratch.write(pack, 'hex');
    return this.packs.hasAt(this.scratch, 0);
  }

  /** The id may be in the index ("no" is certain). */
  mayHave(id: Buffer): boolean {
    return this.bloom.mayHaveAt(id, 0);
  }
}

/** Adopts packs an interrupted writer uploaded but never indexed (§9 rule 6). */
async function adoptOrphans(repo: Repository, index: ChunkIndex | IndexFilter, packs: Map<string, { size: number }>): Promise<IndexEntry[]> {
  const adopted: IndexEntry[] = [];
  const orphans = [...packs].filter(([id]) => !index.hasPack(id));
  await mapLimit(orphans, 4, async ([id, info]) => {
    try {
      for (const e of await repo.readPackFooter(id, info.size)) {
        const entry = { id: e.id, pack: id, offset: e.offset, length: e.length, rawLength: e.rawLength };
        adopted.push(entry);
        index.add(entry);
      }
    } catch (e) {
      if (!isKscError(e, 'KSC_E_CORRUPT') && !isKscError(e, 'KSC_E_NOT_FOUND')) throw e; // a damaged orphan is prune's business
    }
  });
  return adopted;
}

/** Backs up `dev` into `repo`. The device stays usable (and writable, for a KscImage) throughout. */
export async function backupDevice(dev: BlockDevice, repo: Repository, opts: BackupOptions = {}): Promise<BackupResult> {
  const now = opts.now ?? Date.now;
  const t0 = performance.now();
  const started = now();
  const id = backupId(started);
  const C = repo.chunkSize;
  const chunks = chunkCount(dev.size, C);
  const img = dev instanceof KscImage ? dev : null;
  const bitmap = img && !img.readOnly && opts.bitmap !== null ? (opts.bitmap ?? DEFAULT_BITMAP) : null;
  if (bitmap !== null && Buffer.byteLength(bitmap) > MAX_BACKUP_BITMAP_NAME) {
    throw new KscError('KSC_E_INVALID', `backup bitmap name "${bitmap}" is longer than ${MAX_BACKUP_BITMAP_NAME} bytes`);
  }
  if (bitmap !== null && (bitmap.includes(TOKEN_SEPARATOR) || bitmap.endsWith(FROZEN_SUFFIX))) {
    throw new KscError('KSC_E_INVALID', `"${bitmap}" cannot be a backup bitmap name (it may not contain "${TOKEN_SEPARATOR}" or end in "${FROZEN_SUFFIX}")`);
  }
  const exactIds = opts.exactIds ?? EXACT_IDS;
  for (const [name, v, min] of [['exactIds', opts.exactIds, 0], ['windowChunks', opts.windowChunks, 1], ['filterBitsPerId', opts.filterBitsPerId, 0]] as const) {
    if (v !== undefined && !(v >= min)) throw new KscError('KSC_E_INVALID', `backup option ${name} must be a number ≥ ${min}, not ${v}`);
  }
  await initHash();
  const disk = await diskUuidOf(dev);
  opts.progress?.({ phase: 'plan', doneBytes: 0, totalBytes: 0 });
  let handedOver = false;
  let view: FrozenView | null = null;
  let writer: ReturnType<Repository['packWriter']> | null = null;
  const held: { lock: Awaited<ReturnType<Repository['lock']>> | null } = { lock: null };
  let frozenAt = started;
  /** The new chunk list (its segment store, shared with the parent's list, is closed at the end). */
  let list: ChunkList | null = null;
  const newToken = bitmap !== null ? randomBytes(16).toString('hex') : null;

  /**
   * Freeze: a point in time, the bitmap handed over, the chunks to read found, copy-before-write installed
   * for them. `dirty`: the chunks the frozen bitmap marks (null for a full backup); `read`: the chunks to
   * read (every chunk holding data for a full backup; the dirty ones that may hold data otherwise).
   */
  type Frozen = { dirty: BitSet | null; read: BitSet };
  const freeze = async (incremental: boolean): Promise<Frozen> => {
    const run = async (): Promise<Frozen> => {
      frozenAt = now();
      let dirty: BitSet | null = null;
      if (img && bitmap !== null) {
        const frozen = bitmap + FROZEN_SUFFIX;
        handedOver = true; // from here on, a failure merges the frozen bits back
        await img.freezeBitmap(bitmap, frozen);
        if (incremental) chunkSetFromExtents(await img.bitmapExtents(frozen), C, (dirty = new BitSet(chunks)));
      }
      // Which chunks hold data: over the whole disk for a full backup, over the dirty chunks otherwise. A few
      // dirty chunks are simply read (a hole reads as zeros and gets the zero id): asking the map first
      // costs more than that, and it would be done while writes wait.
      const read = new BitSet(chunks);
      if (!dirty) chunkSetFromExtents((await dev.extents(0, dev.size)).filter((e) => e.state === 'data'), C, read);
      else if (dirty.count <= DIRECT_READ_CHUNKS) for (const k of dirty) read.add(k);
      else {
        const d = dirty;
        await mapLimit(runsOf(d), 8, async ([first, last]) => {
          const start = first * C, end = Math.min(dev.size, (last + 1) * C);
          const hasData = (await dev.extents(start, end - start)).filter((e) => e.state === 'data');
          for (const e of hasData) { // clipped to the run: an extent may reach into clean chunks
            const k0 = Math.max(first, Math.floor(e.offset / C)), k1 = Math.min(last, Math.floor((e.offset + e.length - 1) / C));
            if (e.length > 0) read.addRange(k0, k1);
          }
        });
      }
      if (img) {
        view = new FrozenView(dev, C, read);
        img.setBeforeChange(view.hook);
      }
      return { dirty, read };
    };
    return img && !img.readOnly ? img.quiesce(run) : run();
  };
  /** Ends the frozen view: writes no longer copy before changing. */
  const releaseView = async (): Promise<void> => {
    if (img) img.setBeforeChange(null);
    await (view as FrozenView | null)?.close();
    view = null;
  };
  /** Undoes a freeze (the frozen bits merge back into the bitmap). */
  const thaw = async (): Promise<void> => {
    await releaseView();
    if (img && bitmap !== null && handedOver) await recoverFrozenBitmap(img, bitmap);
    handedOver = false;
  };

  try {
    // Which backup of this disk is the bitmap's reference point (§10)? What the image alone can tell.
    let fullReason: string | null = opts.full ? 'a full backup was asked for' : null;
    let token: string | null = null;
    if (img && bitmap !== null) {
      await recoverFrozenBitmap(img, bitmap);
      const names = img.bitmapList.filter((b) => b !== null).map((b) => b!.name);
      const tokens = tokenBitmaps(names, bitmap);
      if (!img.hasBitmap(bitmap)) {
        await img.addBitmap(bitmap, { enabled: true });
        fullReason ??= `bitmap "${bitmap}" did not exist (created now: the next backup is incremental)`;
      } else {
        const st = img.bitmapInfo(bitmap)!;
        if (!st.consistent) fullReason ??= st.damage ? `bitmap "${bitmap}" is not consistent: ${st.damage}` : `bitmap "${bitmap}" is not consistent (image written by a writer that did not keep bitmaps)`;
        else if (!st.enabled) fullReason ??= `bitmap "${bitmap}" is disabled`;
        else if (st.granularity > C) fullReason ??= `bitmap "${bitmap}" granularity ${st.granularity} is above the chunk size ${C}`;
      }
      if (tokens.length === 1) token = tokens[0]!.slice(bitmap.length + 1);
      else fullReason ??= tokens.length === 0 ? 'no earlier backup of this disk through this bitmap' : 'the bitmap has several backup tokens';
    } else if (!fullReason) {
      fullReason = img ? (img.readOnly ? 'the image is open read-only, so no bitmap can be handed over' : 'no bitmap was asked for') : 'a raw disk has no dirty bitmap';
    }
    if (fullReason) warmPool(); // the workers start while the plan is made

    // The repository side (lock, index, orphans, the parent manifest) runs while the image is frozen for an
    // incremental, when the image allows one: most backups are. Should the repository then call for a full
    // backup, that freeze is undone (the bits merge back) and a full one made.
    const repoSide = (async () => {
      held.lock = await repo.lock('shared', `backup ${id} of ${opts.source ?? dev.name}`);
      // A damaged index object is skipped: the packs only it named are adopted below like orphans (§9 rule 6).
      // The listings run side by side (a pack landing in between is adopted twice at worst: harmless).
      const backupIds = !fullReason && token !== null ? repo.listBackupIds() : null;
      backupIds?.catch(() => undefined);
      // Ids only (dedupe needs no locations): 20 bytes a slot; a Bloom filter when even that is too large.
      let damagedIndex: string | null = null;
      const loadKnown = async (): Promise<ChunkIndex | IndexFilter> => {
        const objects = await repo.indexObjects();
        const entries = Repository.entriesIn(objects);
        if (entries <= exactIds) return repo.loadIndex(() => undefined, { locations: false });
        // A damaged object's ids may be in the filter already when its checksum fails (see below).
        const onDamage = (key: string): void => void (damagedIndex ??= key);
        const f = new IndexFilter(entries + chunks, opts.filterBitsPerId);
        // Objects in ranges (flat memory). Ids go in as seen (one from a damaged object only makes a false
        // "maybe"); packs once their object checks out (so a damaged object's packs are adopted as orphans).
        await repo.streamIndexIds(objects, () => {
          const packs = new Set<string>();
          return { visit: (b, at, pack) => (f.bloom.addAt(b, at), packs.add(pack)), done: () => packs.forEach((p) => f.addPack(p)) };
        }, onDamage);
        return f;
      };
      const [known, packs] = await Promise.all([loadKnown(), repo.listPacks()]);
      const adopted = await adoptOrphans(repo, known, packs);
      let parent: Manifest | null = null;
      let why: string | null = null;
      if (backupIds) {
        for (const bid of (await backupIds).reverse()) {
          const h = await repo.readManifestInfo(bid).catch(() => null); // the header says whether it is the one
          if (!h || h.disk !== disk || h.bitmapToken !== token || h.size !== dev.size) continue;
          parent = await repo.readManifest(bid).catch(() => null);
          if (parent) break;
        }
        if (!parent) why = `no backup in ${repo.name} matches bitmap "${bitmap}"'s state (backed up elsewhere, or the backup was pruned)`;
      }
      if (parent) {
        // Exact with the index in memory; through the filter, a missing chunk passes 1 time in 100 (it was
        // missing for the parent already: `verify` names it for both).
        let missing = false;
        parent.ids.forEachNonZero((_k, cid) => {
          if (known instanceof ChunkIndex ? known.hasAt(cid, 0) : known.mayHave(cid)) return true;
          missing = true;
          return false;
        });
        if (missing) {
          why = `backup ${parent.meta.id} refers to chunks the repository no longer holds`;
          parent = null;
        } else if (damagedIndex !== null && !(known instanceof ChunkIndex)) {
          // The filter took ids from that object before its checksum failed: it cannot vouch for the parent.
          why = `index object ${damagedIndex} is damaged, so backup ${parent.meta.id}'s chunks cannot be checked through the filter (verify names the damage; prune repairs the index)`;
          parent = null;
        }
      }
      return { known, adopted, parent, why };
    })();
    const imageSide = fullReason ? null : freeze(true);
    const [r, f] = await Promise.allSettled([repoSide, imageSide]);
    if (r.status === 'rejected') throw r.reason;
    if (f.status === 'rejected') throw f.reason;
    const { adopted } = r.value;
    const parent = r.value.parent;
    fullReason ??= r.value.why;
    const full = fullReason !== null;
    let frozen = f.value;
    if (full && frozen) {
      await thaw();
      frozen = null;
    }
    if (full) warmPool();
    frozen ??= await freeze(!full);

    // An incremental's list starts as its parent's (segments shared, copied only where a chunk changes);
    // only the chunks read change it (and dirty chunks without data become zero ids): O(dirty), not O(disk).
    // A large list keeps most of its segments in a temporary file (a clone shares its parent's).
    const ids = parent ? parent.ids.clone() : new ChunkList(chunks, storeForList(chunks));
    list = ids;
    const { dirty, read } = frozen;
    for (const k of dirty ?? []) if (!read.has(k)) ids.set(k, ZERO_ID);
    const lock = held.lock!;

    // Read → hash/zero-check/compress in workers → dedupe → pack → upload.
    let totalBytes = read.count * C - (read.has(chunks - 1) ? chunks * C - dev.size : 0);
    // A small increment is packed on this thread: starting the workers would cost more than the work.
    const inline = totalBytes <= (opts.inlineBytes ?? (poolStarted() ? 0 : INLINE_BYTES));
    if (!inline) warmPool();
    const perBatch = Math.max(1, Math.floor((opts.batchBytes ?? 4 * 1024 * 1024) / C));
    const window = Math.max(perBatch, Math.floor(opts.windowChunks ?? WINDOW_CHUNKS));
    // Dedupe exactly with the index in memory while it and this backup's new chunks fit the bound;
    // otherwise through a Bloom filter, in windows of the disk (§9, "Deduplicating against a large index").
    let known = r.value.known;
    if (known instanceof ChunkIndex && known.size + read.count > exactIds) known = IndexFilter.of(known, read.count, opts.filterBitsPerId);
    const index = known instanceof ChunkIndex ? known : null;
    const filter = known instanceof IndexFilter ? known : null;
    // The filter's "maybe" is settled by reading the index objects, adopted orphans' among them.
    if (filter && adopted.length > 0) await repo.putIndex(adopted);
    writer = repo.packWriter();
    let bytesRead = 0;
    let bytesNew = 0;
    let bytesStored = 0;
    let chunksNew = 0;
    let chunksReread = 0;
    let dirtyNonZeroBytes = 0;
    const w = writer;
    const v = view as FrozenView | null;
    /** Chunks the filter may know, kept in the frozen view until the index objects settle them. */
    const maybe = { ks: [] as number[], ids: Buffer.alloc(0) };
    const addMaybe = (k: number, cid: Buffer): void => {
      const at = maybe.ks.length * ID_BYTES;
      if (at + ID_BYTES > maybe.ids.length) {
        const grown = Buffer.allocUnsafe(Math.max(1024 * ID_BYTES, maybe.ids.length * 2));
        maybe.ids.copy(grown, 0, 0, at);
        maybe.ids = grown;
      }
      cid.copy(maybe.ids, at, 0, ID_BYTES);
      maybe.ks.push(k);
    };
    // Settling reads every index object, so it waits until this many maybes are kept (or the end).
    const maybeLimit = Math.min(MAYBE_LIMIT, window);
    const store = async (k: number, cid: Buffer, blob: Buffer, length: number): Promise<void> => {
      chunksNew++;
      bytesNew += length;
      bytesStored += blob.length;
      filter?.bloom.addAt(cid, 0);
      await w.add(cid, blob, length);
    };
    // Batch buffers go to a worker and come back (transferred both ways): no allocation or copy per batch.
    const spare: Buffer[] = [];
    /** `settled`: chunks known not to be in the index (read again after the filter's "maybe"). */
    const runBatch = async (batch: number[], settled: boolean): Promise<void> => {
      const buf = spare.pop() ?? Buffer.allocUnsafeSlow(perBatch * C);
      const lengths = batch.map((k) => Math.min(C, dev.size - k * C));
      const keep = filter !== null && !settled;
      let pos = 0;
      await Promise.all(batch.map((k, i) => {
        const target = buf.subarray(pos, pos + lengths[i]!);
        pos += lengths[i]!;
        return v ? v.takeInto(k, target, keep) : dev.readInto(k * C, target);
      }));
      for (const n of lengths) bytesRead += n;
      const { chunks: packed, input } = await packBatch(new Uint8Array(buf.buffer as ArrayBuffer, 0, buf.buffer.byteLength), lengths, true, { inline });
      spare.push(input);
      for (let i = 0; i < batch.length; i++) {
        const k = batch[i]!;
        const { id: cid, blob } = packed[i]!;
        if (settled) {
          if (!cid.equals(ids.view(k))) throw new KscError('KSC_E_IO', `${dev.name}: chunk ${k} read again differs from its first read at the freeze (the device changed during the backup; no backup was committed)`);
          if (!w.has(cid)) await store(k, cid, blob, lengths[i]!);
          continue;
        }
        ids.set(k, cid);
        if (blob.length > 0) { // not all zeros
          dirtyNonZeroBytes += lengths[i]!;
          if (index ? index.hasAt(cid, 0) : w.has(cid)) {
            // stored already, or earlier in this backup
          } else if (filter?.mayHave(cid)) {
            addMaybe(k, cid);
            continue; // kept in the view
          } else if (!w.has(cid)) await store(k, cid, blob, lengths[i]!);
        }
        if (keep) v?.release(k);
      }
      lock.check();
      opts.progress?.({ phase: 'read', doneBytes: bytesRead, totalBytes });
    };
    const runBatches = (ks: Iterable<number>, settled: boolean): Promise<void> =>
      mapLimit(groupsOf(ks, perBatch), opts.batches ?? 3, (batch) => runBatch(batch, settled));
    /**
     * Settling the filter's "maybe"s: the new chunks' packs land and an index object names them, then the
     * index objects say which maybes are stored; the others are read again from the frozen view and stored.
     */
    const settle = async (): Promise<void> => {
      await w.flushIndex();
      if (maybe.ks.length === 0) return;
      const asked = new ChunkIndex({ locations: false, expected: maybe.ks.length });
      for (let j = 0; j < maybe.ks.length; j++) asked.addAt(maybe.ids, j * ID_BYTES, '', 0, 0, 0);
      const found = new ChunkIndex({ locations: false });
      // A chunk counts as stored once an index object naming it has passed its checks (a damaged object's
      // chunks are stored again).
      await repo.streamIndexIds(await repo.indexObjects(), () => {
        const mine: Buffer[] = [];
        return {
          visit: (b, at) => void (asked.hasAt(b, at) && mine.push(Buffer.from(b.subarray(at, at + ID_BYTES)))),
          done: () => mine.forEach((id) => found.hasAt(id, 0) || found.addAt(id, 0, '', 0, 0, 0)),
        };
      }, () => undefined);
      const again: number[] = [];
      for (let j = 0; j < maybe.ks.length; j++) {
        const k = maybe.ks[j]!;
        if (found.hasAt(maybe.ids, j * ID_BYTES)) v?.release(k);
        else again.push(k);
      }
      maybe.ks = [];
      chunksReread += again.length;
      for (const k of again) totalBytes += Math.min(C, dev.size - k * C);
      await runBatches(again, true);
    };
    if (!filter) await runBatches(read, false);
    else {
      // Each window ends with the writer's chunks indexed (so it forgets them: its memory is one window's).
      for (const ks of groupsOf(read, window)) {
        await runBatches(ks, false);
        if (maybe.ks.length >= maybeLimit) await settle();
        else await w.flushIndex();
      }
      await settle();
    }
    await releaseView();
    opts.progress?.({ phase: 'commit', doneBytes: bytesRead, totalBytes });
    // §9 rules 1–3: packs landed; now the index naming them (and adopted orphans); the manifest last.
    await writer.flushIndex(filter ? [] : adopted);
    lock.check();
    const durationMs = Math.round(performance.now() - t0);
    const stats = { bytesRead, bytesNew, bytesStored, chunksDirty: read.count, durationMs };
    await repo.putManifest({
      full, disk, timeMs: frozenAt, size: dev.size, chunkSize: C, bitmapToken: newToken, ids,
      meta: { id, parent: parent?.meta.id ?? null, tags: opts.tags ?? [], source: opts.source ?? dev.name, bitmap, stats },
    });
    // §8 rule 4: a lock lost while the manifest went up (the process paused there) may have let a prune
    // delete what it names: take the manifest back and fail (the bitmap handover is undone below).
    try {
      lock.check();
    } catch (e) {
      await repo.deleteManifest(id).catch(() => undefined);
      throw e;
    }
    // §10 step 3: the new token, then drop the frozen bits.
    if (img && bitmap !== null) {
      const old = tokenBitmaps(img.bitmapList.filter((b) => b !== null).map((b) => b!.name), bitmap);
      await img.updateBitmaps([bitmap + TOKEN_SEPARATOR + newToken], [...old, bitmap + FROZEN_SUFFIX]);
      handedOver = false;
    }
    return {
      id, repository: repo.name, disk, parent: parent?.meta.id ?? null, full, fullReason, size: dev.size, chunks,
      chunksDirty: read.count, chunksNew, chunksReread, dedupe: filter ? 'filter' : 'exact', bytesRead, bytesNew, bytesStored, bytesUploaded: writer.bytesUploaded,
      dedupeRatio: bytesNew > 0 ? dirtyNonZeroBytes / bytesNew : 1, durationMs,
      throughput: durationMs > 0 ? (bytesRead / durationMs) * 1000 : 0,
    };
  } catch (e) {
    await releaseView();
    await writer?.abandon();
    // §10 step 4: nothing drops out of tracking.
    if (img && bitmap !== null && handedOver) {
      await recoverFrozenBitmap(img, bitmap).catch(() => undefined);
    }
    throw e;
  } finally {
    (list as ChunkList | null)?.store?.close();
    await held.lock?.release();
  }
}
