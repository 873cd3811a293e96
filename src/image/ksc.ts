/**
 * A ksc_inc image as a BlockDevice (formats/ksc_inc.md). Owns the ordering rules of §9:
 *  - open for writing: lock, then a durable DIRTY header before anything else (rule 1);
 *  - every change: intent bits durable first (rule 2, IntentLog), then data, then in-memory map/bitmaps;
 *  - flush: snapshot dirty metadata, write new pages, sync, rewrite records in place, sync (rule 3);
 *  - freed clusters wait for the flush that unlinks them (rule 4, Allocator);
 *  - close: flush, free list, clear intent, clean header (rule 7).
 * Block-range locks (shared for reads, exclusive for changes) keep copy-on-write invisible to readers.
 */
import { crc32 } from 'node:zlib';
import { KscError, corrupt, ioError, isKscError } from '../errors.js';
import type { HostFile, FileOpener } from '../io/file.js';
import { openHostFile, writeThenCrcs } from '../io/file.js';
import {
  AUTOCLEAR_BITMAPS, BackingFormat, BITMAP_DIR_ENTRY_SIZE, BITMAP_SLOTS, BlockState, COMPAT_DATA_CSUM, COMPAT_FROZEN,
  DEFAULT_BLOCK_BITS, FIRST_FREE_OFFSET, HEADER_SIZE, HEADER_SLOTS, INCOMPAT_DIRTY,
  KNOWN_AUTOCLEAR, MAX_BLOCK_BITS, MAX_DIRECTORY_ENTRIES, MAX_INTENT_BITS, MAX_INTENT_REGIONS, MAX_VIRTUAL_SIZE, MIN_BLOCK_BITS,
  MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS,
} from '../format/constants.js';
import { type Header, decodeHeaderSlot, defaultIntentBits, directoryEntriesFor, encodeHeader, intentWordsFor, validateHeader } from '../format/header.js';
import { FREE_ENTRY_SIZE, decodeFreeList, encodeFreeList, freeListBytes } from '../format/freelist.js';
import { seal } from '../format/seal.js';
import { Mutex, RangeLock } from '../util/rangelock.js';
import { isPowerOfTwo, log2 } from '../util/size.js';
import { newUuidBytes } from '../util/uuid.js';
import { Allocator, alignUp } from './allocator.js';
import { type BitmapInfo, SparseBitmap, decodeBitmapSlot, encodeBitmapSlot, guessBitmapSlot, validateBitmapName } from './bitmapstore.js';
import { IntentLog } from './intent.js';
import { findLeakedClusters } from './sweep.js';
import { DAMAGED, MapTable, type MapWrite } from './maptable.js';
import { type BlockDevice, type Extent, type WriteOptions, type ZeroOptions, checkRange, mergeExtents } from './types.js';

export interface CreateKscOptions {
  size: number;
  blockSize?: number;
  /** Backing file name as stored in the header (relative to the image's folder, or absolute). */
  backingName?: string;
  backingFormat?: 'raw' | 'ksc_inc';
  diskUuid?: Buffer;
  /** Bytes per intent region (§7), a power of two ≥ the block size; default: defaultIntentBits (256 KiB up to 1 TiB). */
  intentRegion?: number;
  opener?: FileOpener;
}

export interface OpenKscOptions {
  write?: boolean;
  /** The opened backing device (the chain is resolved by open.ts). */
  backing?: BlockDevice | null;
  /** Allow changes to a frozen image (§4.1 FROZEN: the backing of a snapshot overlay). */
  force?: boolean;
  opener?: FileOpener;
}

export interface BitmapStatus extends BitmapInfo {
  dirtyBytes: number;
  /**
   * false when a writer that does not maintain bitmaps touched the image (autoclear bit cleared), or the
   * bitmap's directory slot is damaged (§6.4): every bit counts as set and backups through it are full.
   */
  consistent: boolean;
  /** Damage found in this bitmap's metadata (§6.4), or null. Damaged pages read as wholly dirty. */
  damage: string | null;
}

interface Seg {
  block: number;
  /** Offset of this piece inside the caller's buffer / request. */
  at: number;
  /** Offset inside the block. */
  inBlock: number;
  length: number;
}

const ZERO_BLOCK_CRC = new Map<number, number>();
function zeroCrc(blockSize: number): number {
  let c = ZERO_BLOCK_CRC.get(blockSize);
  if (c === undefined) ZERO_BLOCK_CRC.set(blockSize, (c = crc32(Buffer.alloc(blockSize))));
  return c;
}

/** One piece of a write: where it goes, the bytes, and (for whole blocks) where its CRC-32 goes. */
interface PieceWrite {
  host: number;
  buf: Buffer;
  crc: ((c: number) => void) | null;
}

export class KscImage implements BlockDevice {
  readonly format = 'ksc_inc' as const;
  readonly blockSize: number;
  readonly size: number;
  private readonly blockBits: number;
  private readonly blocks: number;
  private readonly locks = new RangeLock();
  private readonly flushMutex = new Mutex();
  private pendingFlush: Promise<void> | null = null;
  /** Number of flush snapshots taken (§9 rules 4 and 5 count in these). */
  private epoch = 0;
  private closed = false;
  private broken: KscError | null = null;
  private currentSlot: number;
  /** Changes (write, zero, discard) in progress, and the gate quiesce() closes to hold new ones. */
  private changesInFlight = 0;
  private changesDrained: (() => void) | null = null;
  private gate: Promise<void> | null = null;
  private beforeChange: ((offset: number, length: number) => Promise<void>) | null = null;
  /** Frozen (§4.1) and opened without force: data changes are refused. */
  private refuseChanges = false;
  /** Opened as not cleanly closed (DIRTY, or a damaged header slot: §10 step 1). */
  private openedDirty = false;
  private openDamage: string[] = [];
  /** What the leak sweep at this open did (§8.1); null when it did not run (clean image or read-only). */
  sweep: { reclaimed: number; skipped: string | null } | null = null;

  private constructor(
    private readonly file: HostFile,
    private header: Header,
    slot: number,
    readonly readOnly: boolean,
    private readonly map: MapTable,
    private readonly alloc: Allocator,
    private readonly intent: IntentLog,
    private readonly bitmapSlots: (SparseBitmap | null)[],
    private readonly bitmapsConsistent: boolean,
    private backingDev: BlockDevice | null,
  ) {
    this.currentSlot = slot;
    this.blockBits = header.blockBits;
    this.blockSize = 2 ** header.blockBits;
    this.size = header.virtualSize;
    this.blocks = Math.ceil(this.size / this.blockSize);
  }

  get name(): string {
    return this.file.path;
  }

  get diskUuid(): Buffer {
    return Buffer.from(this.header.diskUuid);
  }

  get backing(): BlockDevice | null {
    return this.backingDev;
  }

  get backingName(): string | null {
    return this.header.backingFormat === BackingFormat.None ? null : this.header.backingName;
  }

  get backingFormat(): 'raw' | 'ksc_inc' | null {
    return this.header.backingFormat === BackingFormat.Raw ? 'raw' : this.header.backingFormat === BackingFormat.Ksc ? 'ksc_inc' : null;
  }

  /** True when the image was not closed cleanly (or another writer has it open, or a header slot is damaged). */
  get wasDirty(): boolean {
    return this.openedDirty || (this.header.incompatible & INCOMPAT_DIRTY) !== 0n;
  }

  /**
   * Damage outside the data found when the image was opened (§6.4): header slots, intent words, free list.
   * A writer has already repaired the header slot and the intent words. Damaged bitmaps: see listBitmaps().
   */
  get damageFound(): readonly string[] {
    return this.openDamage;
  }

  get intentSyncs(): number {
    return this.intent.syncs;
  }

  // ---------------------------------------------------------------- create and open

  /** Creates a new, empty image file (fails if the path exists). */
  static async create(path: string, opts: CreateKscOptions): Promise<void> {
    try {
      await KscImage.createFile(path, opts);
    } catch (e) {
      if (e instanceof KscError && !e.message.includes(path)) throw new KscError(e.code, `${path}: ${e.message}`, { cause: e });
      throw e;
    }
  }

  private static async createFile(path: string, opts: CreateKscOptions): Promise<void> {
    const blockSize = opts.blockSize ?? 2 ** DEFAULT_BLOCK_BITS;
    if (!isPowerOfTwo(blockSize) || log2(blockSize) < MIN_BLOCK_BITS || log2(blockSize) > MAX_BLOCK_BITS) {
      throw new KscError('KSC_E_INVALID', `block size ${blockSize} must be a power of two from 4 KiB to 2 MiB`);
    }
    const blockBits = log2(blockSize);
    if (!Number.isSafeInteger(opts.size) || opts.size < 1 || opts.size > MAX_VIRTUAL_SIZE) {
      throw new KscError('KSC_E_RANGE', `virtual size ${opts.size} must be 1 byte … 1 PiB`);
    }
    const dirEntries = directoryEntriesFor(opts.size, blockBits);
    if (dirEntries > MAX_DIRECTORY_ENTRIES) {
      throw new KscError('KSC_E_RANGE', `virtual size ${opts.size} is too large for block size ${blockSize}: use a larger block size`);
    }
    const intentBits = opts.intentRegion ? Math.max(blockBits, log2(opts.intentRegion)) : defaultIntentBits(opts.size, blockBits);
    if (intentBits > MAX_INTENT_BITS || (opts.intentRegion !== undefined && !isPowerOfTwo(opts.intentRegion))) {
      throw new KscError('KSC_E_INVALID', `intent region must be a power of two up to 1 GiB`);
    }
    if (Math.ceil(opts.size / 2 ** intentBits) > MAX_INTENT_REGIONS) {
      throw new KscError('KSC_E_INVALID', `intent region ${2 ** intentBits} is too small for virtual size ${opts.size}: at most ${MAX_INTENT_REGIONS} regions (§7)`);
    }
    const intentWords = intentWordsFor(opts.size, intentBits);
    let pos = FIRST_FREE_OFFSET;
    const place = (bytes: number): number => {
      const at = pos;
      pos = alignUp(pos + bytes, 4096);
      return at;
    };
    const directoryOffset = place(dirEntries * 16);
    const bitmapDirOffset = place(BITMAP_SLOTS * BITMAP_DIR_ENTRY_SIZE);
    const intentOffset = place(intentWords * 16);
    const backingName = opts.backingName ?? '';
    const header: Header = {
      version: 1,
      mapPageBits: 12,
      backingNameLength: Buffer.byteLength(opts.backingName ?? ''),
      generation: 1,
      incompatible: 0n,
      compatible: COMPAT_DATA_CSUM,
      autoclear: AUTOCLEAR_BITMAPS,
      diskUuid: opts.diskUuid ?? newUuidBytes(),
      virtualSize: opts.size,
      blockBits,
      directoryOffset,
      directoryEntries: dirEntries,
      intentBits,
      intentOffset,
      intentWords,
      bitmapSlots: BITMAP_SLOTS,
      bitmapDirOffset,
      freeListOffset: 0,
      freeListEntries: 0,
      backingFormat: backingName === '' ? BackingFormat.None : opts.backingFormat === 'raw' ? BackingFormat.Raw : BackingFormat.Ksc,
      backingName,
    };
    const headerBuf = encodeHeader(header); // validates the backing name before the file exists
    const file = await (opts.opener ?? openHostFile)(path, { write: true, create: true });
    try {
      const slots = Buffer.alloc(BITMAP_SLOTS * BITMAP_DIR_ENTRY_SIZE);
      for (let s = 0; s < BITMAP_SLOTS; s++) encodeBitmapSlot(s, null).copy(slots, s * BITMAP_DIR_ENTRY_SIZE);
      await file.write(MapTable.emptyDirectory(dirEntries), directoryOffset);
      await file.write(slots, bitmapDirOffset);
      await file.write(IntentLog.empty(intentWords), intentOffset);
      await file.truncate(pos);
      await file.sync();
      // Slot A holds the only header; slot B stays zero (invalid) until the first header update.
      await file.write(headerBuf, HEADER_SLOTS[0]);
      await file.sync();
    } finally {
      await file.close();
    }
  }

  /** Reads the current header of a ksc_inc file (for probing and `info`). */
  static async readHeader(file: HostFile): Promise<{ header: Header; slot: number; damagedSlots: string[] }> {
    const size = await file.size();
    const damaged: string[] = [];
    let best: { header: Header; slot: number } | null = null;
    let anyMagic = false;
    for (let s = 0; s < 2; s++) {
      const buf = Buffer.alloc(HEADER_SIZE);
      const n = await file.read(buf, HEADER_SLOTS[s]!);
      const r = decodeHeaderSlot(buf.subarray(0, n));
      if (r.ok) {
        anyMagic = true;
        if (!best || r.header.generation > best.header.generation) best = { header: r.header, slot: s };
      } else {
        anyMagic ||= r.hasMagic;
        if (!(s === 1 && n === HEADER_SIZE && buf.every((x) => x === 0))) damaged.push(`header slot ${'AB'[s]}: ${r.reason}`);
      }
    }
    if (!best) {
      if (!anyMagic) throw new KscError('KSC_E_FORMAT', `${file.path}: not a ksc_inc image (bad magic)`);
      throw corrupt(file.path, 'header', `has no valid copy (${damaged.join('; ')})`);
    }
    validateHeader(best.header, file.path, size);
    return { ...best, damagedSlots: damaged };
  }

  /** Opens a ksc_inc file; the caller resolves and passes the backing device (see open.ts). */
  static async open(path: string, opts: OpenKscOptions = {}): Promise<KscImage> {
    const write = !!opts.write;
    const file = await (opts.opener ?? openHostFile)(path, { write });
    try {
      if (write) await file.lockExclusive();
      const img = await KscImage.openFile(file, write, opts.backing ?? null);
      img.refuseChanges = write && img.frozen && !opts.force;
      return img;
    } catch (e) {
      await file.close().catch(() => undefined);
      throw e;
    }
  }

  private static async openFile(file: HostFile, write: boolean, backing: BlockDevice | null): Promise<KscImage> {
    const { header, slot, damagedSlots } = await KscImage.readHeader(file);
    // §10 step 1: a damaged header slot may have been the newer one (its generation is unreadable), e.g. a
    // DIRTY header torn or damaged after a crash: the image counts as not closed cleanly.
    const dirty = (header.incompatible & INCOMPAT_DIRTY) !== 0n || damagedSlots.length > 0;
    const damage: string[] = [];
    const fileSize = await file.size();
    const alloc = new Allocator(alignUp(fileSize, 4096), 2 ** header.blockBits);
    const dir = Buffer.alloc(header.directoryEntries * 16);
    if ((await file.read(dir, header.directoryOffset)) < dir.length) throw corrupt(file.path, 'directory', 'is truncated');
    const blocks = Math.ceil(header.virtualSize / 2 ** header.blockBits);
    const map = new MapTable(file, dir, header.directoryOffset, 2 ** header.blockBits, blocks, () => alloc.fileEnd);

    const slotsBuf = Buffer.alloc(header.bitmapSlots * BITMAP_DIR_ENTRY_SIZE);
    if ((await file.read(slotsBuf, header.bitmapDirOffset)) < slotsBuf.length) throw corrupt(file.path, 'bitmap directory', 'is truncated');
    const bitmaps: (SparseBitmap | null)[] = [];
    for (let s = 0; s < header.bitmapSlots; s++) {
      const rec = slotsBuf.subarray(s * BITMAP_DIR_ENTRY_SIZE, (s + 1) * BITMAP_DIR_ENTRY_SIZE);
      try {
        const d = decodeBitmapSlot(rec, s, file.path, header.virtualSize, fileSize);
        bitmaps.push(d ? new SparseBitmap(file, s, d.name, d.granularityBits, d.enabled, d.tableOffset, d.tableEntries, header.virtualSize, () => alloc.fileEnd) : null);
      } catch (e) {
        // §6.4: a damaged slot is a bitmap whose bits are all unknown (listed inconsistent), not a refusal.
        if (!isKscError(e, 'KSC_E_CORRUPT')) throw e;
        bitmaps.push(SparseBitmap.damagedSlot(file, s, guessBitmapSlot(rec, s, header.blockBits), header.virtualSize, e.message));
      }
    }
    for (const b of bitmaps) {
      if (b?.slotDamaged && bitmaps.some((o) => o !== b && o?.name === b.name)) b.name = `damaged-slot-${b.slot}`;
    }
    const intentRaw = Buffer.alloc(header.intentWords * 16);
    if ((await file.read(intentRaw, header.intentOffset)) < intentRaw.length) throw corrupt(file.path, 'intent words', 'are truncated');
    const regions = Math.ceil(header.virtualSize / 2 ** header.intentBits);
    // §7: damaged intent words count as wholly set after a crash, as clear on a clean image.
    const decoded = IntentLog.decode(file.path, header.intentOffset, intentRaw, regions, dirty);
    damage.push(...decoded.damaged);
    const setRegions = decoded.set;
    const intent = new IntentLog(file, header.intentOffset, intentRaw, header.intentBits, regions);
    intent.adoptSet(setRegions);

    const consistent = (header.autoclear & AUTOCLEAR_BITMAPS) !== 0n || bitmaps.every((b) => b === null);
    if (!dirty && header.freeListOffset !== 0 && header.freeListEntries > 0) {
      try {
        alloc.addFree(await KscImage.readFreeList(file, header, fileSize));
      } catch (e) {
        // §8: a damaged free list is ignored; the clusters it listed are leaked (check --repair reclaims them).
        if (!isKscError(e, 'KSC_E_CORRUPT')) throw e;
        damage.push(e.message);
      }
    }
    const img = new KscImage(file, header, slot, !write, map, alloc, intent, bitmaps, consistent, backing);
    img.openedDirty = dirty;
    img.openDamage = damage;
    if (write) {
      // §9 rule 1: DIRTY durable before any change; unknown autoclear bits dropped (§4.1). The header goes
      // into the other slot, which rewrites a damaged one.
      await img.writeHeader({ ...header, incompatible: header.incompatible | INCOMPAT_DIRTY, autoclear: header.autoclear & KNOWN_AUTOCLEAR });
      await intent.rewriteWords(decoded.damagedWords);
    }
    if (dirty && setRegions.length > 0) await img.recover(setRegions);
    if (write && dirty) await img.sweepLeaks();
    return img;
  }

  private static async readFreeList(file: HostFile, header: Header, fileSize: number): Promise<number[]> {
    const buf = Buffer.alloc(header.freeListEntries * FREE_ENTRY_SIZE);
    const n = await file.read(buf, header.freeListOffset);
    return decodeFreeList(buf.subarray(0, n), header.freeListEntries, 2 ** header.blockBits, fileSize, file.path);
  }

  /**
   * §10 step 3: after a crash, every region with its intent bit set may hold changes that the bitmaps and
   * checksums do not record. OR them into every enabled bitmap and distrust the checksums there. In memory
   * only: a writer persists it with its next flush; the intent bits stay until then.
   */
  private async recover(regions: number[]): Promise<void> {
    const regionSize = 2 ** this.header.intentBits;
    for (const r of regions) {
      const off = r * regionSize;
      const len = Math.min(regionSize, this.size - off);
      for (const b of this.enabledBitmaps()) {
        await b.prepare(off, len);
        b.mark(off, len);
      }
      const b0 = Math.floor(off / this.blockSize);
      const b1 = Math.floor((off + len - 1) / this.blockSize);
      const p0 = Math.floor(b0 / 4096);
      for (let p = p0; p <= Math.floor(b1 / 4096); p++) {
        if (this.map.pageAbsent(p)) continue;
        await this.map.ensure(p * 4096, p * 4096);
        const page = this.map.page(p)!;
        for (let b = Math.max(b0, p * 4096); b <= Math.min(b1, p * 4096 + 4095); b++) {
          const i = b - p * 4096;
          if (page.csumValid[i]) this.map.set(b, page.state[i]!, page.host[i]!, 0, false);
        }
      }
    }
  }

  /**
   * §8.1: a writer opening a crashed image (after its DIRTY header sync, before any change) reuses the
   * clusters nothing references. Skipped, leaving them to `check --repair`, when anything that may
   * reference a cluster is damaged or the map is too large to read at open.
   */
  private async sweepLeaks(): Promise<void> {
    // Damage found at open (§6.4, §10: a header slot, the free list, intent words, a bitmap's slot, table or
    // pages) means something may point at clusters this cannot see: leave them to check --repair.
    const damaged = this.openDamage.length > 0 || this.bitmapSlots.some((b) => b?.damage);
    if (damaged) {
      this.sweep = { reclaimed: 0, skipped: 'damaged metadata was found at open' };
      return;
    }
    const r = await findLeakedClusters({ header: this.header, map: this.map, bitmaps: this.bitmapSlots, clusterSize: this.blockSize, fileEnd: this.alloc.fileEnd });
    this.sweep = { reclaimed: r.clusters.length, skipped: r.skipped };
    if (r.clusters.length === 0) return;
    await punchRuns(this.file, r.clusters, this.blockSize).catch(() => undefined); // space only
    this.alloc.addFree(r.clusters);
  }

  private async writeHeader(h: Header): Promise<void> {
    const next = { ...h, generation: this.header.generation + 1, backingNameLength: Buffer.byteLength(h.backingName) };
    const target = 1 - this.currentSlot;
    await this.file.write(encodeHeader(next), HEADER_SLOTS[target]!);
    await this.file.sync();
    this.header = next;
    this.currentSlot = target;
  }

  // ---------------------------------------------------------------- guards

  private live(): void {
    if (this.closed) throw new KscError('KSC_E_CLOSED', `image ${this.name}: closed`);
  }

  private writable(): void {
    this.live();
    if (this.readOnly) throw new KscError('KSC_E_READ_ONLY', `image ${this.name}: opened read-only`);
    if (this.broken) throw this.broken;
  }

  private enabledBitmaps(): SparseBitmap[] {
    const out: SparseBitmap[] = [];
    for (const b of this.bitmapSlots) if (b && b.enabled) out.push(b);
    return out;
  }

  private segments(offset: number, length: number): Seg[] {
    const segs: Seg[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const block = Math.floor(pos / this.blockSize);
      const inBlock = pos - block * this.blockSize;
      const n = Math.min(this.blockSize - inBlock, end - pos);
      segs.push({ block, at: pos - offset, inBlock, length: n });
      pos += n;
    }
    return segs;
  }

  private lockBlocks(offset: number, length: number, exclusive: boolean): Promise<() => void> {
    const b0 = Math.floor(offset / this.blockSize);
    const b1 = Math.floor((offset + Math.max(length, 1) - 1) / this.blockSize);
    return this.locks.acquire(b0, b1, exclusive);
  }

  // ---------------------------------------------------------------- reads

  async read(offset: number, length: number): Promise<Buffer> {
    this.live();
    checkRange(this, offset, length);
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(offset, buf);
    return buf;
  }

  async readInto(offset: number, target: Buffer): Promise<void> {
    this.live();
    checkRange(this, offset, target.length);
    if (target.length === 0) return;
    const release = await this.lockBlocks(offset, target.length, false);
    try {
      await this.readLocked(offset, target);
    } finally {
      release();
    }
  }

  /** Reads with the caller holding at least shared locks on the blocks. Coalesces adjacent I/O. */
  private async readLocked(offset: number, target: Buffer): Promise<void> {
    const segs = this.segments(offset, target.length);
    await this.map.ensure(segs[0]!.block, segs[segs.length - 1]!.block);
    const io: Promise<void>[] = [];
    let run: { kind: 'data' | 'backing'; at: number; host: number; length: number } | null = null;
    const flushRun = (): void => {
      if (!run) return;
      const r = run;
      run = null;
      const dst = target.subarray(r.at, r.at + r.length);
      io.push(r.kind === 'data' ? this.readHost(r.host, dst) : this.readBacking(offset + r.at, dst));
    };
    for (const s of segs) {
      const page = this.map.page(Math.floor(s.block / 4096))!;
      const i = s.block % 4096;
      const state = page.state[i]!;
      if (state === DAMAGED) throw this.map.damagedError(s.block);
      if (state === BlockState.Data) {
        const host = page.host[i]! + s.inBlock;
        if (run?.kind === 'data' && run.host + run.length === host && run.at + run.length === s.at) run.length += s.length;
        else flushRun(), (run = { kind: 'data', at: s.at, host, length: s.length });
      } else if (state === BlockState.Unallocated && this.backingDev) {
        if (run?.kind === 'backing' && run.at + run.length === s.at) run.length += s.length;
        else flushRun(), (run = { kind: 'backing', at: s.at, host: 0, length: s.length });
      } else {
        flushRun();
        target.fill(0, s.at, s.at + s.length);
      }
    }
    flushRun();
    await Promise.all(io);
  }

  private async readHost(host: number, dst: Buffer): Promise<void> {
    const n = await this.file.read(dst, host);
    if (n < dst.length) throw corrupt(this.name, 'data', `cluster at 0x${host.toString(16)} is past the end of the file (truncated image)`);
  }

  /** Reads [offset, offset+dst.length) of the backing; past its end reads zeros. */
  private async readBacking(offset: number, dst: Buffer): Promise<void> {
    const b = this.backingDev;
    const avail = b ? Math.max(0, Math.min(dst.length, b.size - offset)) : 0;
    if (avail > 0) await b!.readInto(offset, dst.subarray(0, avail));
    if (avail < dst.length) dst.fill(0, avail);
  }

  // ---------------------------------------------------------------- changes

  /**
   * Runs a change of [offset, offset+length) under the §9 protocol: exclusive block locks, intent bits
   * durable, bitmap pages loaded; then `fn`; then the bitmaps marked; FUA flushes before returning.
   */
  private async change(offset: number, length: number, fua: boolean | undefined, fn: () => Promise<void>): Promise<void> {
    this.writable();
    if (this.refuseChanges) {
      throw new KscError('KSC_E_READ_ONLY', `image ${this.name}: frozen as the backing of a snapshot overlay (its changes would show through the overlay); force to write anyway`);
    }
    checkRange(this, offset, length);
    if (length > 0) {
      while (this.gate) await this.gate;
      this.changesInFlight++;
      try {
        if (this.beforeChange) await this.beforeChange(offset, length);
        await this.changeLocked(offset, length, fn);
      } finally {
        if (--this.changesInFlight === 0 && this.changesDrained) this.changesDrained();
      }
    }
    if (fua) await this.flush();
  }

  /**
   * Runs `fn` with no change in flight and new changes held until it finishes: a point in time for
   * bitmap handovers and frozen views (the backup engine). Reads continue meanwhile.
   */
  async quiesce<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise<void>((r) => (open = r));
    try {
      if (this.changesInFlight > 0) await new Promise<void>((r) => (this.changesDrained = r));
      this.changesDrained = null;
      return await fn();
    } finally {
      this.gate = null;
      open();
    }
  }

  /**
   * Installs (or removes, with null) a hook awaited before every change touches the image, with the
   * range it is about to change: copy-before-write for a frozen view. Install it inside quiesce().
   */
  setBeforeChange(hook: ((offset: number, length: number) => Promise<void>) | null): void {
    this.beforeChange = hook;
  }

  private async changeLocked(offset: number, length: number, fn: () => Promise<void>): Promise<void> {
    {
      const release = await this.lockBlocks(offset, length, true);
      try {
        const bitmaps = this.enabledBitmaps();
        const b0 = Math.floor(offset / this.blockSize);
        const b1 = Math.floor((offset + length - 1) / this.blockSize);
        await this.map.ensure(b0, b1);
        // Intent protects bitmaps and the checksums of data changed in place. A change that only fills
        // unallocated blocks of an image without enabled bitmaps needs none: its new clusters are referenced
        // only after they are durable (§9 rule 3), so a crash leaves the old state or the new, both checksummed.
        const intent = bitmaps.length > 0 || this.rangeHoldsData(b0, b1);
        if (intent) await this.intent.begin(offset, length);
        try {
          for (const b of bitmaps) await b.prepare(offset, length);
          await fn();
          for (const b of bitmaps) b.mark(offset, length);
        } finally {
          if (intent) this.intent.end(offset, length, this.epoch);
        }
      } finally {
        release();
      }
    }
  }

  /** Whether any block in [b0, b1] holds data (or is damaged) in this layer; the pages must be loaded. */
  private rangeHoldsData(b0: number, b1: number): boolean {
    for (let b = b0; b <= b1; b++) {
      const state = this.map.page(Math.floor(b / 4096))!.state[b % 4096];
      if (state === BlockState.Data || state === DAMAGED) return true;
    }
    return false;
  }

  write(offset: number, data: Buffer, opts: WriteOptions = {}): Promise<void> {
    let now: Promise<void> | null;
    try {
      now = this.overwriteNow(offset, data, opts.fua);
    } catch (e) {
      return Promise.reject(e);
    }
    return now ?? this.change(offset, data.length, opts.fua, () => this.writeLocked(offset, data));
  }

  /**
   * The common overwrite without a promise hop before the I/O: whole blocks that all hold data in this
   * layer, host-contiguous, with their map page loaded, their intent bits already durable and the pages of
   * every enabled bitmap loaded, and the block lock free now. It keeps change()'s protocol step for step
   * (exclusive lock, intent registered, data, then map entries and bitmap bits, intent end, release), only
   * synchronously. Returns null, having changed nothing, whenever any of that does not hold: the caller
   * takes the general path (which also produces every error).
   */
  private overwriteNow(offset: number, data: Buffer, fua: boolean | undefined): Promise<void> | null {
    const length = data.length;
    const B = this.blockSize;
    if (this.closed || this.readOnly || this.broken || this.gate || this.beforeChange || this.refuseChanges) return null;
    if (!(length > 0 && offset >= 0 && offset % B === 0 && length % B === 0 && Number.isSafeInteger(offset) && offset + length <= this.size)) return null;
    const b0 = offset / B;
    const n = length / B;
    const p = Math.floor(b0 / 4096);
    if (n > 1024 || Math.floor((b0 + n - 1) / 4096) !== p) return null;
    const page = this.map.page(p);
    if (!page) return null;
    const i0 = b0 - p * 4096;
    const host = page.host[i0]!;
    for (let k = 0; k < n; k++) {
      if (page.state[i0 + k] !== BlockState.Data || page.host[i0 + k] !== host + k * B) return null;
    }
    let bitmaps: SparseBitmap[] | null = null;
    for (const b of this.bitmapSlots) {
      if (!b || !b.enabled) continue;
      if (!b.prepared(offset, length)) return null;
      (bitmaps ??= []).push(b);
    }
    const release = this.locks.tryAcquire(b0, b0 + n - 1, true);
    if (!release) return null;
    if (!this.intent.tryBegin(offset, length)) {
      release();
      return null;
    }
    // From here on, as in change(): registered in flight, intent held, lock held, all undone by finish().
    this.changesInFlight++;
    const finish = (): void => {
      this.intent.end(offset, length, this.epoch);
      release();
      if (--this.changesInFlight === 0 && this.changesDrained) this.changesDrained();
    };
    let io: Promise<number[]>;
    try {
      io = this.file.writeWithCrcs ? this.file.writeWithCrcs(data, host, B) : writeThenCrcs(this.file, data, host, B);
    } catch (e) {
      io = Promise.reject(e);
    }
    return io.then((crcs) => {
      try {
        for (let k = 0; k < n; k++) this.map.set(b0 + k, BlockState.Data, host + k * B, crcs[k]!, true);
        if (bitmaps) for (const b of bitmaps) b.mark(offset, length);
      } finally {
        finish();
      }
      if (fua) return this.flush();
      return undefined;
    }, (e: unknown) => {
      finish();
      throw e;
    });
  }

  private async writeLocked(offset: number, data: Buffer): Promise<void> {
    const segs = this.segments(offset, data.length);
    // change() has loaded the map pages of the whole range.
    const B = this.blockSize;
    const inPlace: { seg: Seg; host: number; full: boolean; wasValid: boolean }[] = [];
    const fresh: { seg: Seg; buf: Buffer }[] = [];
    for (const s of segs) {
      const page = this.map.page(Math.floor(s.block / 4096))!;
      const i = s.block % 4096;
      const piece = data.subarray(s.at, s.at + s.length);
      if (page.state[i] === DAMAGED) throw this.map.damagedError(s.block);
      if (page.state[i] === BlockState.Data) {
        inPlace.push({ seg: s, host: page.host[i]!, full: s.length === B, wasValid: page.csumValid[i] === 1 });
      } else if (s.length === B) {
        fresh.push({ seg: s, buf: piece });
      } else {
        // Copy-on-write: assemble the whole block from what it reads as now, then the new bytes.
        const blk = Buffer.alloc(B);
        if (page.state[i] === BlockState.Unallocated && this.backingDev) {
          const start = s.block * B;
          await this.readBacking(start, blk.subarray(0, Math.min(B, this.size - start)));
        }
        piece.copy(blk, s.inBlock);
        fresh.push({ seg: s, buf: blk });
      }
    }
    const hosts = this.alloc.allocClusters(fresh.length);
    const writes: PieceWrite[] = [];
    const inPlaceCrc: number[] = new Array(inPlace.length);
    const freshCrc: number[] = new Array(fresh.length);
    inPlace.forEach((p, k) => writes.push({ host: p.host + p.seg.inBlock, buf: data.subarray(p.seg.at, p.seg.at + p.seg.length), crc: p.full ? (c) => (inPlaceCrc[k] = c) : null }));
    fresh.forEach((f, k) => writes.push({ host: hosts[k]!, buf: f.buf, crc: (c) => (freshCrc[k] = c) }));
    try {
      await this.writeCoalesced(writes);
    } catch (e) {
      this.alloc.unusedAgain(hosts);
      throw e;
    }
    inPlace.forEach((p, k) => {
      if (p.full) this.map.set(p.seg.block, BlockState.Data, p.host, inPlaceCrc[k]!, true);
      else if (p.wasValid) this.map.set(p.seg.block, BlockState.Data, p.host, 0, false);
    });
    fresh.forEach((f, k) => this.map.set(f.seg.block, BlockState.Data, hosts[k]!, freshCrc[k]!, true));
  }

  /**
   * Writes (host, buffer) pieces, merging host-contiguous neighbours into one write. Pieces that are also
   * adjacent in memory (a caller's buffer of whole blocks) merge into one view without copying. Pieces with
   * a `crc` callback are whole blocks and get their CRC-32: computed with the write on a pool thread when
   * the group is one buffer of whole blocks and the host file can (HostFile.writeWithCrcs), else here.
   */
  private async writeCoalesced(writes: PieceWrite[]): Promise<void> {
    writes.sort((a, b) => a.host - b.host);
    const groups: { host: number; bufs: Buffer[]; len: number; items: PieceWrite[] }[] = [];
    for (const w of writes) {
      const g = groups[groups.length - 1];
      if (g && g.host + g.len === w.host && g.bufs.length < 1024) {
        const last = g.bufs[g.bufs.length - 1]!;
        if (last.buffer === w.buf.buffer && last.byteOffset + last.length === w.buf.byteOffset) {
          g.bufs[g.bufs.length - 1] = Buffer.from(last.buffer, last.byteOffset, last.length + w.buf.length);
        } else g.bufs.push(w.buf);
        g.len += w.buf.length;
        g.items.push(w);
      } else groups.push({ host: w.host, bufs: [w.buf], len: w.buf.length, items: [w] });
    }
    const B = this.blockSize;
    await Promise.all(groups.map(async (g) => {
      if (g.bufs.length === 1 && this.file.writeWithCrcs && g.items.every((it) => it.crc && it.buf.length === B)) {
        const crcs = await this.file.writeWithCrcs(g.bufs[0]!, g.host, B);
        g.items.forEach((it, i) => it.crc!(crcs[i]!));
        return;
      }
      await (g.bufs.length === 1 ? this.file.write(g.bufs[0]!, g.host) : this.file.writev(g.bufs, g.host));
      for (const it of g.items) if (it.crc) it.crc(crc32(it.buf));
    }));
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    await this.change(offset, length, opts.fua, () => this.zeroLocked(offset, length, opts.mayTrim ?? true, false));
  }

  async discard(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    await this.change(offset, length, opts.fua, () => this.zeroLocked(offset, length, true, true));
  }

  /**
   * Whole blocks become ZERO (their clusters freed) or, when trimming is not allowed, are zeroed in place.
   * Partial blocks are written with zeros, except for discard, which leaves them as they are.
   */
  private async zeroLocked(offset: number, length: number, mayTrim: boolean, discard: boolean): Promise<void> {
    const segs = this.segments(offset, length);
    // change() has loaded the map pages of the whole range.
    const B = this.blockSize;
    for (const s of segs) {
      const start = s.block * B;
      const whole = s.inBlock === 0 && (s.length === B || start + s.length === this.size);
      const page = this.map.page(Math.floor(s.block / 4096))!;
      const i = s.block % 4096;
      const state = page.state[i]!;
      if (state === DAMAGED) throw this.map.damagedError(s.block);
      if (!whole) {
        if (discard || state === BlockState.Zero || (state === BlockState.Unallocated && !this.backingDev)) continue;
        await this.writeLocked(start + s.inBlock, Buffer.alloc(s.length));
        continue;
      }
      if (state === BlockState.Data && !mayTrim) {
        await this.file.write(Buffer.alloc(B), page.host[i]!);
        this.map.set(s.block, BlockState.Data, page.host[i]!, zeroCrc(B), true);
      } else if (state === BlockState.Data) {
        // The cluster is punched and reused only after the flush that makes this entry durable (§9 rule 4):
        // until then the entry on disk still points at it and a crash must find the old data there.
        const host = page.host[i]!;
        this.map.set(s.block, this.backingDev ? BlockState.Zero : BlockState.Unallocated, 0, 0, false);
        this.alloc.freeAfterFlush(host, this.epoch);
      } else if (state === BlockState.Unallocated && this.backingDev) {
        this.map.set(s.block, BlockState.Zero, 0, 0, false);
      }
    }
  }

  // ---------------------------------------------------------------- flush

  /** §9 rule 3 and 8. Concurrent callers share a flush that starts after their call. */
  flush(): Promise<void> {
    this.live();
    if (this.readOnly) return Promise.resolve();
    if (this.broken) return Promise.reject(this.broken);
    this.pendingFlush ??= this.flushMutex.run(async () => {
      this.pendingFlush = null;
      await this.flushNow();
    });
    return this.pendingFlush;
  }

  private async flushNow(): Promise<void> {
    const fresh: MapWrite[] = [];
    const inPlace: MapWrite[] = [];
    const allocMeta = (n: number): number => this.alloc.allocMeta(n);
    this.map.snapshot(allocMeta, fresh, inPlace);
    for (const b of this.bitmapSlots) b?.snapshot(allocMeta, fresh, inPlace);
    const epoch = ++this.epoch;
    try {
      await Promise.all(fresh.map((w) => this.file.write(w.data, w.offset)));
      await this.file.sync(); // data and new pages durable before anything points at them
      if (inPlace.length > 0) {
        await Promise.all(inPlace.map((w) => this.file.write(w.data, w.offset)));
        await this.file.sync();
      }
    } catch (e) {
      // Records that did not reach the disk are lost to this session: refuse further changes rather than
      // guess. Reopening the image recovers from the intent bits.
      this.broken = ioError(this.name, 'flush', e);
      throw this.broken;
    }
    await this.releaseClusters(this.alloc.released(epoch - 1));
    await this.intent.clearIdle(epoch);
  }

  /**
   * §9 rule 4: clusters whose unlinking map change is now durable are punched out of the file, then become
   * reusable. Never earlier: until the map change is durable a crash brings back the entry that points at
   * the cluster, and it must still hold the block's data. Punching only returns space to the host, so a
   * failed punch leaves the cluster as it is and it is reused all the same.
   */
  private async releaseClusters(clusters: number[]): Promise<void> {
    if (clusters.length === 0) return;
    try {
      await punchRuns(this.file, clusters, this.blockSize);
    } catch {
      // Space only: the map no longer references these clusters on disk, whatever they hold.
    } finally {
      this.alloc.addFree(clusters);
    }
  }

  // ---------------------------------------------------------------- extents

  async extents(offset: number, length: number): Promise<Extent[]> {
    this.live();
    checkRange(this, offset, length);
    const out: Extent[] = [];
    const end = offset + length;
    const B = this.blockSize;
    let pos = offset;
    let unallocStart = -1;
    const flushUnalloc = async (upto: number): Promise<void> => {
      if (unallocStart < 0) return;
      out.push(...(await this.backingExtents(unallocStart, upto - unallocStart)));
      unallocStart = -1;
    };
    while (pos < end) {
      const block = Math.floor(pos / B);
      const p = Math.floor(block / 4096);
      if (this.map.pageAbsent(p)) {
        const pageEnd = Math.min(end, (p + 1) * 4096 * B);
        if (unallocStart < 0) unallocStart = pos;
        pos = pageEnd;
        continue;
      }
      await this.map.ensure(block, block);
      const page = this.map.page(p)!;
      const state = page.state[block % 4096]!;
      if (state === DAMAGED) throw this.map.damagedError(block);
      const next = Math.min(end, (block + 1) * B);
      if (state === BlockState.Unallocated) {
        if (unallocStart < 0) unallocStart = pos;
      } else {
        await flushUnalloc(pos);
        out.push({ offset: pos, length: next - pos, state: state === BlockState.Data ? 'data' : 'zero', depth: 0 });
      }
      pos = next;
    }
    await flushUnalloc(end);
    return mergeExtents(out);
  }

  private async backingExtents(offset: number, length: number): Promise<Extent[]> {
    const b = this.backingDev;
    const inside = b ? Math.max(0, Math.min(length, b.size - offset)) : 0;
    const out: Extent[] = [];
    if (inside > 0) {
      for (const e of await b!.extents(offset, inside)) out.push({ ...e, depth: e.depth === null ? null : e.depth + 1 });
    }
    if (inside < length) out.push({ offset: offset + inside, length: length - inside, state: 'unallocated', depth: null });
    return out;
  }

  /** Per-block view of this layer only (no backing), for commit, check and convert. */
  async blockState(block: number): Promise<{ state: BlockState; host: number; csum: number; csumValid: boolean }> {
    await this.map.ensure(block, block);
    const page = this.map.page(Math.floor(block / 4096))!;
    const i = block % 4096;
    return { state: page.state[i]!, host: page.host[i]!, csum: page.csum[i]!, csumValid: page.csumValid[i] === 1 };
  }

  /** Blocks whose state in this layer is not UNALLOCATED, as [first, count] runs, skipping absent pages. */
  async *allocatedBlocks(): AsyncGenerator<{ block: number; state: BlockState; host: number; csum: number; csumValid: boolean }> {
    for (let p = 0; p < this.map.directoryEntries; p++) {
      if (this.map.pageAbsent(p)) continue;
      await this.map.ensure(p * 4096, p * 4096);
      const page = this.map.page(p)!;
      for (let i = 0; i < 4096; i++) {
        if (page.state[i] === DAMAGED) throw this.map.damagedError(p * 4096 + i);
        if (page.state[i] !== BlockState.Unallocated) {
          yield { block: p * 4096 + i, state: page.state[i]!, host: page.host[i]!, csum: page.csum[i]!, csumValid: page.csumValid[i] === 1 };
        }
      }
    }
  }

  /**
   * Makes the given blocks of this layer UNALLOCATED (after commit). Their clusters are punched and become
   * reusable only once the flush at the end has made the new entries durable (§9 rule 4): a crash before
   * leaves every entry pointing at its intact data, a crash after leaves the clusters leaked (§8.1).
   */
  async dropBlocks(which: Set<number>): Promise<void> {
    this.writable();
    const release = await this.locks.acquire(0, this.blocks, true);
    try {
      const held: { block: number; state: BlockState; host: number }[] = [];
      for await (const b of this.allocatedBlocks()) if (which.has(b.block)) held.push(b);
      // One intent region at a time (not the whole disk: a 16 TiB disk has millions of regions).
      const regionBlocks = 2 ** (this.header.intentBits - this.blockBits);
      for (let i = 0; i < held.length;) {
        const region = Math.floor(held[i]!.block / regionBlocks);
        const start = region * regionBlocks * this.blockSize;
        const len = Math.min(regionBlocks * this.blockSize, this.size - start);
        await this.intent.begin(start, len);
        try {
          for (; i < held.length && Math.floor(held[i]!.block / regionBlocks) === region; i++) {
            const b = held[i]!;
            this.map.set(b.block, BlockState.Unallocated, 0, 0, false);
            if (b.state === BlockState.Data) this.alloc.freeAfterFlush(b.host, this.epoch);
          }
        } finally {
          this.intent.end(start, len, this.epoch);
        }
      }
    } finally {
      release();
    }
    await this.flush();
  }

  // ---------------------------------------------------------------- bitmaps

  private findBitmap(name: string): SparseBitmap {
    const b = this.bitmapSlots.find((x) => x?.name === name);
    if (!b) throw new KscError('KSC_E_NOT_FOUND', `image ${this.name}: no bitmap named "${name}"`);
    return b;
  }

  hasBitmap(name: string): boolean {
    return this.bitmapSlots.some((x) => x?.name === name);
  }

  /** Bitmaps with their dirty byte counts (loads their pages). */
  async listBitmaps(): Promise<BitmapStatus[]> {
    this.live();
    const out: BitmapStatus[] = [];
    for (const b of this.bitmapSlots) {
      if (!b) continue;
      const ext = this.bitmapsConsistent ? await b.dirtyExtents(0, this.size, this.size) : [{ offset: 0, length: this.size }];
      out.push({ name: b.name, granularity: b.granularity, enabled: b.enabled, dirtyBytes: ext.reduce((s, e) => s + e.length, 0), consistent: this.bitmapConsistent(b), damage: b.damage });
    }
    return out;
  }

  private bitmapConsistent(b: SparseBitmap): boolean {
    return this.bitmapsConsistent && !b.slotDamaged;
  }

  /** Dirty extents of bitmap `name` within [offset, offset+length), merged. */
  async bitmapExtents(name: string, offset = 0, length = this.size - offset): Promise<{ offset: number; length: number }[]> {
    this.live();
    checkRange(this, offset, length);
    if (!this.bitmapsConsistent) return length > 0 ? [{ offset, length }] : [];
    return this.findBitmap(name).dirtyExtents(offset, length, this.size);
  }

  /** Runs a bitmap management change: after a full flush, serialized with flushes (§9 rule 6). */
  private manage<T>(fn: () => Promise<T>): Promise<T> {
    this.writable();
    return this.flush().then(() => this.flushMutex.run(async () => {
      await this.flushNow();
      return fn();
    }));
  }

  private async writeSlot(slot: number, b: SparseBitmap | null): Promise<void> {
    const rec = encodeBitmapSlot(slot, b && { name: b.name, granularityBits: b.granularityBits, enabled: b.enabled, tableEntries: b.tableEntries, tableOffset: b.tableOffset });
    await this.file.write(rec, this.header.bitmapDirOffset + slot * BITMAP_DIR_ENTRY_SIZE);
    await this.file.sync();
  }

  /** Writes a complete new table (and pages for `pages`) for a bitmap, synced, not yet referenced. */
  private async writeFreshTable(slot: number, tableEntries: number, pages: Map<number, Uint32Array>): Promise<{ offset: number; table: Buffer; pageOffsets: Map<number, number> }> {
    const table = SparseBitmap.emptyTable(slot, tableEntries);
    const offset = this.alloc.allocMeta(table.length);
    const pageOffsets = new Map<number, number>();
    const tmp = new SparseBitmap(this.file, slot, '', MIN_GRANULARITY_BITS, false, offset, tableEntries, 1);
    for (const [p, bits] of pages) {
      if (bits.every((w) => w === 0)) continue;
      const at = this.alloc.allocMeta(4096);
      pageOffsets.set(p, at);
      await this.file.write(tmp.encodePage(p, { hostOffset: at, bits, dirty: false }), at);
      const rec = table.subarray(p * 16, p * 16 + 16);
      rec.fill(0);
      rec.writeBigUInt64LE(BigInt(at), 0);
      seal(rec, 4 + 256 * slot, p);
    }
    await this.file.write(table, offset);
    await this.file.sync();
    return { offset, table, pageOffsets };
  }

  /** Frees metadata space nothing references any more: punched, or zeroed where the host cannot punch. */
  private async punchRanges(ranges: { offset: number; length: number }[]): Promise<void> {
    for (const r of ranges) {
      if (!(await this.file.punchHole(r.offset, r.length))) await this.file.write(Buffer.alloc(r.length), r.offset);
      this.alloc.releaseMeta(r.offset, r.length);
    }
  }

  async addBitmap(name: string, opts: { granularity?: number; enabled?: boolean } = {}): Promise<void> {
    validateBitmapName(name);
    const granularity = opts.granularity ?? this.blockSize;
    const g = log2(granularity);
    if (!isPowerOfTwo(granularity) || g < MIN_GRANULARITY_BITS || g > MAX_GRANULARITY_BITS) {
      throw new KscError('KSC_E_INVALID', `bitmap granularity ${granularity} must be a power of two from 4 KiB to 64 MiB`);
    }
    await this.manage(async () => {
      if (this.hasBitmap(name)) throw new KscError('KSC_E_EXISTS', `image ${this.name}: bitmap "${name}" already exists`);
      const slot = this.bitmapSlots.indexOf(null);
      if (slot < 0) throw new KscError('KSC_E_RANGE', `image ${this.name}: all ${this.bitmapSlots.length} bitmap slots are in use`);
      const entries = SparseBitmap.tableEntriesFor(this.size, g);
      const fresh = await this.writeFreshTable(slot, entries, new Map());
      const b = new SparseBitmap(this.file, slot, name, g, opts.enabled ?? true, fresh.offset, entries, this.size, () => this.alloc.fileEnd);
      b.adoptTable(fresh.offset, fresh.table, new Map(), new Map());
      await this.writeSlot(slot, b);
      this.bitmapSlots[slot] = b;
    });
  }

  async removeBitmap(name: string): Promise<void> {
    await this.manage(async () => {
      const b = this.findBitmap(name);
      const ranges = await b.hostRanges();
      await this.writeSlot(b.slot, null);
      this.bitmapSlots[b.slot] = null;
      await this.punchRanges(ranges);
    });
  }

  async setBitmapEnabled(name: string, enabled: boolean): Promise<void> {
    await this.manage(async () => {
      const b = this.findBitmap(name);
      if (b.slotDamaged) throw new KscError('KSC_E_CORRUPT', `image ${this.name}: bitmap "${name}" has a damaged directory slot (${b.damage}): clear or remove it`);
      if (b.enabled === enabled) return;
      b.enabled = enabled;
      await this.writeSlot(b.slot, b);
    });
  }

  async clearBitmap(name: string): Promise<void> {
    await this.replaceBits(name, async () => undefined, () => new Map());
  }

  /** ORs bitmap `src` into `dst` (granularities may differ: each dirty byte range of src is marked in dst). */
  async mergeBitmap(src: string, dst: string): Promise<void> {
    this.findBitmap(src);
    this.findBitmap(dst);
    await this.replaceBits(dst, async () => {
      await this.findBitmap(src).loadAll();
      await this.findBitmap(dst).loadAll();
    }, (d) => this.withExtents(d, this.findBitmap(src).loadedExtents(this.size)));
  }

  /** `d`'s bits (all pages loaded) with `extents` marked as well, as a new page map. Synchronous. */
  private withExtents(d: SparseBitmap, extents: { offset: number; length: number }[]): Map<number, Uint32Array> {
    const copy = new SparseBitmap(this.file, d.slot, d.name, d.granularityBits, true, 0, d.tableEntries, this.size);
    for (const [p, bits] of d.copyBits()) copy.pages.set(p, { hostOffset: 0, bits, dirty: false });
    for (const e of extents) copy.mark(e.offset, e.length);
    return new Map([...copy.pages].map(([p, page]) => [p, page.bits]));
  }

  /**
   * Gives bitmap `name` a new table holding `build()`'s bits, atomically with respect to changes (§9 rule 6):
   * `build` runs in the same synchronous step that starts recording the bitmap's marks, and the marks made
   * until the new table is adopted are replayed into it. `load` runs first (inside the management step).
   */
  private async replaceBits(name: string, load: () => Promise<void>, build: (b: SparseBitmap) => Map<number, Uint32Array>): Promise<void> {
    await this.manage(async () => {
      const b = this.findBitmap(name);
      const old = await b.hostRanges();
      await load();
      b.startRecording();
      try {
        const pages = build(b);
        const fresh = await this.writeFreshTable(b.slot, b.tableEntries, pages);
        const next = new SparseBitmap(this.file, b.slot, b.name, b.granularityBits, b.enabled, fresh.offset, b.tableEntries, this.size);
        await this.writeSlot(b.slot, next);
        b.adoptTable(fresh.offset, fresh.table, pages, fresh.pageOffsets);
      } finally {
        b.stopRecording();
      }
      await this.punchRanges(old);
    });
  }

  /**
   * Moves the bits of bitmap `name` into a new, disabled bitmap `frozenName` (same granularity) and clears
   * `name`, in one management step (one flush; each slot write is atomic, and a crash between them leaves
   * the bits in both: a superset). The backup engine's handover (formats/repository.md §10). Atomic with
   * respect to changes: each is in the frozen bitmap or marked in `name` (the backup calls it inside
   * quiesce() for its own point in time).
   */
  async freezeBitmap(name: string, frozenName: string): Promise<void> {
    validateBitmapName(frozenName);
    await this.manage(async () => {
      const b = this.findBitmap(name);
      if (this.hasBitmap(frozenName)) throw new KscError('KSC_E_EXISTS', `image ${this.name}: bitmap "${frozenName}" already exists`);
      const slot = this.bitmapSlots.indexOf(null);
      if (slot < 0) throw new KscError('KSC_E_RANGE', `image ${this.name}: all ${this.bitmapSlots.length} bitmap slots are in use`);
      await b.loadAll();
      const old = await b.hostRanges();
      // The frozen copy is the bits of this instant; marks from here on are replayed into the emptied
      // bitmap, so every change is in one of the two (§9 rule 6).
      const bits = b.copyBits();
      b.startRecording();
      try {
        const copy = await this.writeFreshTable(slot, b.tableEntries, bits);
        const f = new SparseBitmap(this.file, slot, frozenName, b.granularityBits, false, copy.offset, b.tableEntries, this.size, () => this.alloc.fileEnd);
        f.adoptTable(copy.offset, copy.table, bits, copy.pageOffsets);
        await this.writeSlot(slot, f);
        this.bitmapSlots[slot] = f;
        const empty = await this.writeFreshTable(b.slot, b.tableEntries, new Map());
        await this.writeSlot(b.slot, new SparseBitmap(this.file, b.slot, b.name, b.granularityBits, b.enabled, empty.offset, b.tableEntries, this.size));
        b.adoptTable(empty.offset, empty.table, new Map(), empty.pageOffsets);
      } finally {
        b.stopRecording();
      }
      await this.punchRanges(old);
    });
  }

  /**
   * Adds empty, disabled bitmaps named `add` (default granularity) and removes the bitmaps named `remove`,
   * in one management step; each slot write is atomic on its own.
   */
  async updateBitmaps(add: string[], remove: string[]): Promise<void> {
    for (const n of add) validateBitmapName(n);
    await this.manage(async () => {
      for (const n of add) if (this.hasBitmap(n)) throw new KscError('KSC_E_EXISTS', `image ${this.name}: bitmap "${n}" already exists`);
      const gone = remove.map((n) => this.findBitmap(n));
      const g = log2(this.blockSize);
      for (const n of add) {
        const slot = this.bitmapSlots.indexOf(null);
        if (slot < 0) throw new KscError('KSC_E_RANGE', `image ${this.name}: all ${this.bitmapSlots.length} bitmap slots are in use`);
        const entries = SparseBitmap.tableEntriesFor(this.size, g);
        const fresh = await this.writeFreshTable(slot, entries, new Map());
        const b = new SparseBitmap(this.file, slot, n, g, false, fresh.offset, entries, this.size, () => this.alloc.fileEnd);
        b.adoptTable(fresh.offset, fresh.table, new Map(), new Map());
        await this.writeSlot(slot, b);
        this.bitmapSlots[slot] = b;
      }
      for (const b of gone) {
        const ranges = await b.hostRanges();
        await this.writeSlot(b.slot, null);
        this.bitmapSlots[b.slot] = null;
        await this.punchRanges(ranges);
      }
    });
  }

  /** Copies bitmap definitions and bits into `dst` (used by snapshot). */
  async copyBitmapsTo(dst: KscImage): Promise<void> {
    for (const b of this.bitmapSlots) {
      if (!b) continue;
      await dst.addBitmap(b.name, { granularity: b.granularity, enabled: b.enabled });
      const extents = await this.bitmapExtents(b.name);
      // OR'ed into what dst's bitmap holds by then: changes to dst made since the add stay marked.
      await dst.replaceBits(b.name, () => dst.findBitmap(b.name).loadAll(), (d) => dst.withExtents(d, extents));
    }
  }

  /**
   * Loads every bitmap page and lists all damage outside the data (§6.4): what open found (intent words,
   * free list) and damaged bitmaps. For check.
   */
  async findDamage(): Promise<string[]> {
    this.live();
    const out = [...this.openDamage];
    for (const b of this.bitmapSlots) {
      if (!b) continue;
      await b.loadAll();
      if (b.damage) out.push(b.slotDamaged ? b.damage : `${b.damage} (pages ${b.failedPages().join(', ')} read as wholly dirty)`);
    }
    return out;
  }

  /**
   * check --repair (§6.4): a bitmap with a damaged directory slot is dropped (its name and settings are
   * unknown); one with damaged table entries or pages is rebuilt with the damaged pages wholly dirty. The
   * writable open has already rewritten damaged intent words and a damaged header slot; the next close
   * writes a new free list. Returns what was done, one sentence each.
   */
  async repairDamage(): Promise<string[]> {
    this.writable();
    const done = this.openDamage.map((d) => d.includes('intent words') ? `rewrote the damaged intent words (${d})` : `dropped the damaged free list (${d}); a new one is written at close`);
    for (const b of this.bitmapSlots) {
      if (!b) continue;
      await b.loadAll();
      if (!b.damage) continue;
      const why = b.damage;
      if (b.slotDamaged) {
        await this.manage(async () => {
          await this.writeSlot(b.slot, null);
          this.bitmapSlots[b.slot] = null;
        });
        done.push(`dropped bitmap slot ${b.slot} ("${b.name}"): ${why}; its space is reclaimed as leaked`);
      } else {
        const failed = b.failedPages();
        await this.replaceBits(b.name, () => b.loadAll(), (x) => x.copyBits());
        done.push(`rebuilt bitmap "${b.name}": ${why}; pages ${failed.join(', ')} are now wholly dirty`);
      }
    }
    return done;
  }

  // ---------------------------------------------------------------- header changes

  /** True when the image is the backing of a snapshot overlay (§4.1 FROZEN). */
  get frozen(): boolean {
    return (this.header.compatible & COMPAT_FROZEN) !== 0n;
  }

  /** Marks the image FROZEN (durable before returning); later writers refuse data changes unless forced. */
  async freeze(): Promise<void> {
    this.writable();
    await this.flush();
    await this.flushMutex.run(() => this.writeHeader({ ...this.header, compatible: this.header.compatible | COMPAT_FROZEN }));
  }

  /** Points the image at a different backing file (no data changes: callers do safe rebase). */
  async setBacking(name: string | null, format: 'raw' | 'ksc_inc' | null, dev: BlockDevice | null): Promise<void> {
    this.writable();
    await this.flush();
    await this.flushMutex.run(async () => {
      await this.writeHeader({
        ...this.header,
        backingName: name ?? '',
        backingFormat: name === null ? BackingFormat.None : format === 'raw' ? BackingFormat.Raw : BackingFormat.Ksc,
      });
    });
    this.backingDev = dev;
  }

  /** Bytes this file occupies on the host. */
  allocatedBytes(): Promise<number> {
    return this.file.allocatedBytes();
  }

  get headerInfo(): Readonly<Header> {
    return this.header;
  }

  get hostFile(): HostFile {
    return this.file;
  }

  get mapTable(): MapTable {
    return this.map;
  }

  /** A bitmap's settings without loading its pages (listBitmaps() also counts dirty bytes); null when absent. */
  bitmapInfo(name: string): { name: string; granularity: number; enabled: boolean; consistent: boolean; damage: string | null } | null {
    const b = this.bitmapSlots.find((x) => x?.name === name);
    return b ? { name: b.name, granularity: b.granularity, enabled: b.enabled, consistent: this.bitmapConsistent(b), damage: b.damage } : null;
  }

  get bitmapList(): readonly (SparseBitmap | null)[] {
    return this.bitmapSlots;
  }

  get intentRegions(): number[] {
    return this.intent.setRegions();
  }

  /** Clusters on the free list (reusable now or after the next flush). */
  freeClusters(): number[] {
    return this.alloc.freeRuns().flatMap((r) => Array.from({ length: r.count }, (_, i) => r.offset + i * this.blockSize));
  }

  /**
   * check --repair: punches leaked ranges (writes zeros where the host cannot punch) and puts whole leaked clusters on the free list. Returns bytes
   * reclaimed. Only call with ranges no structure references (check.ts computes them).
   */
  async reclaim(leaks: { offset: number; length: number }[]): Promise<number> {
    this.writable();
    let bytes = 0;
    const B = this.blockSize;
    for (const l of leaks) {
      // Where the host cannot punch, zeros are written: the space is then unused to check too (its leak scan
      // looks for non-zero pages), as after a punch.
      if (!(await this.file.punchHole(l.offset, l.length))) {
        const zeros = Buffer.alloc(Math.min(l.length, 1 << 20));
        for (let o = 0; o < l.length; o += zeros.length) await this.file.write(zeros.subarray(0, Math.min(zeros.length, l.length - o)), l.offset + o);
      }
      bytes += l.length;
      for (let c = alignUp(l.offset, B); c + B <= l.offset + l.length; c += B) {
        if (c >= FIRST_FREE_OFFSET) this.alloc.unusedAgain([c]);
      }
    }
    return bytes;
  }

  // ---------------------------------------------------------------- close

  /** §9 rule 7. Closes the backing chain too. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.readOnly && !this.broken) {
        let punchAfterHeader: { offset: number; length: number } | null = null;
        await this.flush();
        await this.flushMutex.run(async () => {
          const runs = this.alloc.freeRuns();
          const oldOffset = this.header.freeListOffset;
          const oldBytes = freeListBytes(this.header.freeListEntries);
          const bytes = freeListBytes(runs.length);
          // The list fills whole 4 KiB pages (zero-padded), so no stale record outlives a shorter list.
          const reuse = oldOffset !== 0 && runs.length > 0 && oldBytes >= bytes;
          const freeOffset = runs.length === 0 ? 0 : reuse ? oldOffset : this.alloc.allocMeta(bytes, true); // at the end: `runs` must not list its own space
          if (runs.length > 0) {
            await this.file.write(encodeFreeList(runs, reuse ? oldBytes : bytes), freeOffset);
            await this.file.sync();
          }
          if (oldOffset !== 0 && !reuse) punchAfterHeader = { offset: oldOffset, length: oldBytes };
          await this.intent.clearAll();
          await this.writeHeader({
            ...this.header,
            incompatible: this.header.incompatible & ~INCOMPAT_DIRTY,
            freeListOffset: freeOffset,
            freeListEntries: runs.length,
          });
          if (punchAfterHeader) await this.punchRanges([punchAfterHeader]);
        });
      }
    } finally {
      this.closed = true;
      await this.file.close();
      await this.backingDev?.close();
    }
  }

  /** BlockDevice.dirtyBitmaps (a DirtyBitmapCapability): the image answers for its own bitmaps. */
  get dirtyBitmaps(): this {
    return this;
  }

  bitmapNames(): string[] {
    return this.bitmapSlots.flatMap((b) => (b ? [b.name] : []));
  }
}

/** Punches cluster offsets as runs of adjacent clusters (one call per run), or zeroes them where the host cannot punch. */
async function punchRuns(file: HostFile, clusters: number[], clusterSize: number): Promise<void> {
  const sorted = [...clusters].sort((a, b) => a - b);
  for (let i = 0; i < sorted.length;) {
    let j = i + 1;
    while (j < sorted.length && sorted[j] === sorted[j - 1]! + clusterSize) j++;
    // Where the host cannot punch, zeros are written instead (as punchRanges does): a freed cluster must not
    // keep old data that a metadata piece carved out of it, or check's leak scan, would meet again.
    const at = sorted[i]!;
    const len = (j - i) * clusterSize;
    if (!(await file.punchHole(at, len))) {
      const zeros = Buffer.alloc(Math.min(len, 1 << 20));
      for (let o = 0; o < len; o += zeros.length) await file.write(zeros.subarray(0, Math.min(zeros.length, len - o)), at + o);
    }
    i = j;
  }
}
