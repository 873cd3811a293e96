/**
 * A ksc_inc image as a BlockDevice (formats/ksc_inc.md). The public face of this folder: each method
 * checks nothing itself and hands its KscCore (core.ts) to the module that owns the concern:
 *  - create.ts, open.ts: create; open with recovery (rule 1: a durable DIRTY header before anything else);
 *  - read.ts: read; datapath.ts: write, zero, discard (rule 2: intent bits durable first, then data, then
 *    map and bitmaps in memory); core.ts holds the in-flight gate (quiesce);
 *  - flush.ts: flush (rule 3: new pages, sync, records in place, sync; rule 4: freed clusters wait for the
 *    flush that unlinks them) and close (rule 7: flush, free list, clear intent, clean header);
 *  - extents.ts: allocation view; bitmaps.ts: bitmap management (rule 6); check.ts: the checker.
 */
import type { LocalBaseRef } from '../../format/local-base.js';
import { type FileOpener, type FileStamp, type HostFile, openHostFile } from '../../io/file.js';
import { BackingFormat, type BlockState, COMPAT_FROZEN, INCOMPAT_DIRTY, INCOMPAT_MIGRATED_AWAY } from '../../format/constants.js';
import { KscError } from '../../errors.js';
import type { BackupRef, Header } from '../../format/header.js';
import type { SparseBitmap } from '../sparse-bitmap.js';
import type { HostSpans, WritesNow } from '../capabilities.js';
import { type BlockDevice, type Extent, type WriteOptions, type ZeroOptions, assertRange } from '../types.js';
import * as bitmaps from './bitmaps.js';
import type { KscCore } from './core.js';
import { createKscFile } from './create.js';
import * as data from './datapath.js';
import * as reads from './read.js';
import { type BlockInfo, allocatedBlocks, blockState, dropBlocks, extents } from './extents.js';
import { close, flush } from './flush.js';
import { openCore, readHeader } from './open.js';
import { type HandoverRecord, handOver, prepareHandOver } from './handover.js';
import { type OriginView, dropOriginFor, originView, setOrigin } from './origin.js';
import type { OriginRecord } from '../../format/origin.js';
import { paceCalls, paceUnlessPaced } from '../../util/turns.js';

export type { BitmapStatus } from './bitmaps.js';

export interface CreateKscOptions {
  size: number;
  blockSize?: number;
  /** Backing file name as stored in the header (relative to the image's folder, or absolute). */
  backingName?: string;
  backingFormat?: 'raw' | 'ksc_inc';
  /** §4.2: the backing is this backup, in the repository whose location is `backingName` (a live restore). */
  backup?: BackupRef;
  /** §4.2 rule 9: with `backup`, the local copy of the disk's raw base that base chunks read through to. */
  localBase?: LocalBaseRef;
  diskUuid?: Buffer;
  /** Bytes per intent region (§7), a power of two ≥ the block size; default: defaultIntentBits (256 KiB up to 1 TiB). */
  intentRegion?: number;
  opener?: FileOpener;
}

export interface OpenKscOptions {
  write?: boolean;
  /** The opened backing device (the chain is resolved by src/image/open.ts). */
  backing?: BlockDevice | null;
  /** Allow changes to a frozen image (§4.1 FROZEN: the backing of a snapshot overlay). */
  force?: boolean;
  /** Open for writing even an image marked migrated away (§4.1 MIGRATED_AWAY: a stale copy); `serve --force`. */
  migratedAway?: boolean;
  opener?: FileOpener;
  /** The record of the writer that handed this image over (§9 rule 11); ignored unless it still matches. */
  handover?: HandoverRecord;
  /** Run the leak sweep of a crashed image (§8.1) in the background instead of before open returns. */
  deferSweep?: boolean;
}

/** KSC_E_MIGRATED: a writer's refusal of an image marked migrated away (§4.1). */
export function migratedAwayError(path: string): KscError {
  return new KscError(
    'KSC_E_MIGRATED',
    `image ${path} was migrated away to another host (formats/ksc_inc.md §4.1 MIGRATED_AWAY): this copy is stale; open it for writing (option force) only if the migrated disk is lost`,
  );
}

/** The state behind an image, for the modules of this folder (the checker) and white-box tests only. */
export let coreOf: (img: KscImage) => KscCore;

export class KscImage implements BlockDevice {
  readonly format = 'ksc_inc' as const;
  readonly blockSize: number;
  readonly size: number;
  readonly readOnly: boolean;

  static {
    coreOf = (img) => img.core;
  }

  private constructor(private readonly core: KscCore) {
    this.blockSize = core.blockSize;
    this.size = core.size;
    this.readOnly = core.readOnly;
  }

  get name(): string {
    return this.core.name;
  }

  get diskUuid(): Buffer {
    return Buffer.from(this.core.header.diskUuid);
  }

  get backing(): BlockDevice | null {
    return this.core.backingDev;
  }

  get backingName(): string | null {
    const h = this.core.header;
    return h.backingFormat === BackingFormat.None ? null : h.backingName;
  }

  get backingFormat(): 'raw' | 'ksc_inc' | null {
    const f = this.core.header.backingFormat;
    return f === BackingFormat.Raw ? 'raw' : f === BackingFormat.Ksc ? 'ksc_inc' : null;
  }

  /** True when the image was not closed cleanly (or another writer has it open, or a header slot is damaged). */
  get wasDirty(): boolean {
    return this.core.openedDirty || (this.core.header.incompatible & INCOMPAT_DIRTY) !== 0n;
  }

  /**
   * Damage outside the data found when the image was opened (§6.4): header slots, intent words, free list.
   * A writer has already repaired the header slot and the intent words. Damaged bitmaps: see listBitmaps().
   */
  get damageFound(): readonly string[] {
    return this.core.openDamage;
  }

  /**
   * What the leak sweep at this open did (§8.1); null when it did not run (clean image or read-only) or,
   * deferred, has not finished (see swept()).
   */
  get sweep(): { reclaimed: number; reclaimedPieces?: number; skipped: string | null } | null {
    return this.core.sweep;
  }

  /** Resolves when a deferred leak sweep has finished (at once when none runs); never rejects. */
  async swept(): Promise<{ reclaimed: number; reclaimedPieces?: number; skipped: string | null } | null> {
    if (this.core.sweepDone) await this.core.sweepDone;
    return this.core.sweep;
  }

  get intentSyncs(): number {
    return this.core.intent.syncs;
  }

  get intentRegions(): number[] {
    return this.core.intent.setRegions();
  }

  // ---------------------------------------------------------------- create and open

  /** Creates a new, empty image file (fails if the path exists). */
  static create(path: string, opts: CreateKscOptions): Promise<void> {
    return createKscFile(path, opts);
  }

  /** Reads the current header of a ksc_inc file (for probing and `info`). */
  static readHeader(file: HostFile): Promise<{ header: Header; slot: number; damagedSlots: string[] }> {
    return readHeader(file);
  }

  /** Opens a ksc_inc file; the caller resolves and passes the backing device (see src/image/open.ts). */
  static async open(path: string, opts: OpenKscOptions = {}): Promise<KscImage> {
    const write = !!opts.write;
    const file = await (opts.opener ?? openHostFile)(path, { write });
    try {
      if (write) await file.lockExclusive();
      // §4.1 MIGRATED_AWAY: refused before the writable open changes anything (DIRTY header, recovery).
      if (write && !opts.migratedAway && (await readHeader(file)).header.incompatible & INCOMPAT_MIGRATED_AWAY) throw migratedAwayError(path);
      const img = new KscImage(await openCore(file, write, opts.backing ?? null, opts.handover, !!opts.deferSweep));
      img.core.refuseChanges = write && img.frozen && !opts.force;
      return img;
    } catch (e) {
      await file.close().catch(() => undefined);
      throw e;
    }
  }

  // ---------------------------------------------------------------- data path

  /** Told of every read before it is served, local or not (a live restore's readahead follows its reader: open.ts). */
  onRead: ((offset: number, length: number) => void) | null = null;

  async read(offset: number, length: number): Promise<Buffer> {
    this.core.live();
    assertRange(this, offset, length);
    this.onRead?.(offset, length);
    const buf = Buffer.allocUnsafe(length);
    const mark = paceCalls();
    await reads.readInto(this.core, offset, buf);
    const turn = paceUnlessPaced(mark); // holes and zero clusters: no file read below paced it (util/turns.ts)
    if (turn) await turn;
    return buf;
  }

  async readInto(offset: number, target: Buffer): Promise<void> {
    this.onRead?.(offset, target.length);
    const mark = paceCalls();
    await reads.readInto(this.core, offset, target);
    const turn = paceUnlessPaced(mark);
    if (turn) await turn;
  }

  write(offset: number, buf: Buffer, opts: WriteOptions = {}): Promise<void> {
    return data.write(this.core, offset, buf, opts);
  }

  writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return data.writeZeroes(this.core, offset, length, opts);
  }

  discard(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    return data.discard(this.core, offset, length, opts);
  }

  /**
   * Copy-on-read (formats/ksc_inc.md §4.2 rule 3): stores bytes the backing holds at `offset` into the
   * whole blocks of the range that are still UNALLOCATED. Marks no bitmap. Returns the blocks filled.
   */
  fillFromBacking(offset: number, buf: Buffer): Promise<number> {
    return data.fillFromBacking(this.core, offset, buf);
  }

  /** §4.2: the backup this image reads through to (backing_format 3), or null. */
  get backupBacking(): { location: string; id: string; disk: Buffer; root: Buffer; chunkSize: number } | null {
    const h = this.core.header;
    return h.backingFormat === BackingFormat.Backup && h.backup ? { location: h.backingName, ...h.backup } : null;
  }

  /** §4.2 rule 9: the local raw base this live restore's base chunks read through to, or null. */
  get localBase(): LocalBaseRef | null {
    return this.core.header.localBase ?? null;
  }

  /**
   * Runs `fn` with no change in flight and new changes held until it finishes: a point in time for
   * bitmap handovers and frozen views (the backup engine). Reads continue meanwhile.
   */
  quiesce<T>(fn: () => Promise<T>): Promise<T> {
    return this.core.quiesce(fn);
  }

  /**
   * Installs (or removes, with null) a hook awaited before every change touches the image, with the
   * range it is about to change: copy-before-write for a frozen view. Install it inside quiesce().
   */
  setBeforeChange(hook: ((offset: number, length: number) => Promise<void>) | null): void {
    this.core.beforeChange = hook;
  }

  /** §9 rule 3 and 8. Concurrent callers share a flush that starts after their call. */
  flush(): Promise<void> {
    return flush(this.core);
  }

  /** §9 rule 7. Closes the backing chain too. Idempotent. */
  close(): Promise<void> {
    return close(this.core);
  }

  /**
   * §9 rule 11: closes the image for the next writer (a hot upgrade): flushes, leaves the DIRTY header and the
   * intent bits in place and returns the record to open it with (`handover` of open()). Null when read-only
   * or unflushable (then closed as close() does). A crash after it is recovered like any other (§10).
   */
  handOver(): Promise<HandoverRecord | null> {
    return handOver(this.core, () => close(this.core));
  }

  /**
   * §9 rule 11: the flush before a handover, made while still serving (the handover's own flush then has
   * little left to write); from now on no flush clears an intent bit, so the next writer keeps them all.
   */
  prepareHandOver(): Promise<void> {
    return prepareHandOver(this.core, () => flush(this.core));
  }

  // ---------------------------------------------------------------- allocation view

  extents(offset: number, length: number): Promise<Extent[]> {
    return extents(this.core, offset, length);
  }

  /** Per-block view of this layer only (no backing), for commit, check and convert. */
  blockState(block: number): Promise<BlockInfo> {
    return blockState(this.core, block);
  }

  /** Blocks whose state in this layer is not UNALLOCATED, skipping absent pages. */
  allocatedBlocks(): AsyncGenerator<{ block: number; state: BlockState; host: number; csum: number; csumValid: boolean }> {
    return allocatedBlocks(this.core);
  }

  /** Makes the given blocks of this layer UNALLOCATED (after commit); see extents.ts. */
  dropBlocks(which: Set<number>): Promise<void> {
    return dropBlocks(this.core, which);
  }

  /** Bytes this file occupies on the host. */
  allocatedBytes(): Promise<number> {
    return this.core.file.allocatedBytes();
  }

  /** fstat of this file (the backing chain not counted), null when the host cannot say. */
  async fileStamp(): Promise<FileStamp | null> {
    return (await this.core.file.stamp?.()) ?? null;
  }

  // ---------------------------------------------------------------- bitmaps

  hasBitmap(name: string): boolean {
    return bitmaps.hasBitmap(this.core, name);
  }

  /** Bitmaps with their dirty byte counts (loads their pages). */
  listBitmaps(): Promise<bitmaps.BitmapStatus[]> {
    return bitmaps.listBitmaps(this.core);
  }

  /** Dirty extents of bitmap `name` within [offset, offset+length), merged. */
  bitmapExtents(name: string, offset = 0, length = this.size - offset): Promise<{ offset: number; length: number }[]> {
    return bitmaps.bitmapExtents(this.core, name, offset, length);
  }

  /** A bitmap's settings without loading its pages (listBitmaps() also counts dirty bytes); null when absent. */
  bitmapInfo(name: string): { name: string; granularity: number; enabled: boolean; consistent: boolean; damage: string | null } | null {
    return bitmaps.bitmapInfo(this.core, name);
  }

  get bitmapList(): readonly (SparseBitmap | null)[] {
    return this.core.bitmapSlots;
  }

  bitmapNames(): string[] {
    return this.core.bitmapSlots.flatMap((b) => (b ? [b.name] : []));
  }

  addBitmap(name: string, opts: { granularity?: number; enabled?: boolean } = {}): Promise<void> {
    return bitmaps.addBitmap(this.core, name, opts);
  }

  async removeBitmap(name: string): Promise<void> {
    await dropOriginFor(this.core, name); // §4.3 rule 3, here and below
    return bitmaps.removeBitmap(this.core, name);
  }

  async setBitmapEnabled(name: string, enabled: boolean): Promise<void> {
    if (!enabled) await dropOriginFor(this.core, name);
    return bitmaps.setBitmapEnabled(this.core, name, enabled);
  }

  async clearBitmap(name: string): Promise<void> {
    await dropOriginFor(this.core, name);
    return bitmaps.clearBitmap(this.core, name);
  }

  /** ORs bitmap `src` into `dst` (granularities may differ: each dirty byte range of src is marked in dst). */
  mergeBitmap(src: string, dst: string): Promise<void> {
    return bitmaps.mergeBitmap(this.core, src, dst);
  }

  /**
   * Moves the bits of bitmap `name` into a new, disabled bitmap `frozenName` (same granularity) and clears
   * `name`, in one management step (one flush; each slot write is atomic, and a crash between them leaves
   * the bits in both: a superset). The backup engine's handover (formats/repository.md §10). Atomic with
   * respect to changes: each is in the frozen bitmap or marked in `name` (the backup calls it inside
   * quiesce() for its own point in time).
   */
  async freezeBitmap(name: string, frozenName: string): Promise<void> {
    await dropOriginFor(this.core, name);
    return bitmaps.freezeBitmap(this.core, name, frozenName);
  }

  /**
   * Adds empty, disabled bitmaps named `add` (default granularity) and removes the bitmaps named `remove`,
   * in one management step; each slot write is atomic on its own.
   */
  async updateBitmaps(add: string[], remove: string[]): Promise<void> {
    for (const n of remove) await dropOriginFor(this.core, n);
    return bitmaps.updateBitmaps(this.core, add, remove);
  }

  /** Copies bitmap definitions and bits into `dst` (used by snapshot). */
  copyBitmapsTo(dst: KscImage): Promise<void> {
    return bitmaps.copyBitmaps(this.core, dst.core);
  }

  /**
   * Loads every bitmap page and lists all damage outside the data (§6.4): what open found (intent words,
   * free list) and damaged bitmaps. For check.
   */
  findDamage(): Promise<string[]> {
    return bitmaps.findDamage(this.core);
  }

  /**
   * check --repair (§6.4): drops bitmaps with a damaged directory slot, rebuilds those with damaged pages
   * (wholly dirty there). The writable open has already rewritten damaged intent words and a damaged
   * header slot; the next close writes a new free list. Returns what was done, one sentence each.
   */
  repairDamage(): Promise<string[]> {
    return bitmaps.repairDamage(this.core);
  }

  // ---------------------------------------------------------------- header changes

  /** True when the image is the backing of a snapshot overlay (§4.1 FROZEN). */
  get frozen(): boolean {
    return (this.core.header.compatible & COMPAT_FROZEN) !== 0n;
  }

  /** True when the disk was migrated to another host and this copy is stale (§4.1 MIGRATED_AWAY). */
  get migratedAway(): boolean {
    return (this.core.header.incompatible & INCOMPAT_MIGRATED_AWAY) !== 0n;
  }

  /**
   * Marks the image MIGRATED_AWAY, durable before returning (one header write and sync; formats/migrate.md
   * §4 step 5). The data is not flushed: the destination holds it. From the next open on, writers refuse the
   * image unless forced; this open's changes are refused by the caller (the migration's change hook).
   */
  async markMigratedAway(): Promise<void> {
    const c = this.core;
    c.writable();
    await c.flushMutex.run(() => c.writeHeader({ ...c.header, incompatible: c.header.incompatible | INCOMPAT_MIGRATED_AWAY }));
  }

  /** Marks the image FROZEN (durable before returning); later writers refuse data changes unless forced. */
  async freeze(): Promise<void> {
    const c = this.core;
    c.writable();
    await flush(c);
    await c.flushMutex.run(() => c.writeHeader({ ...c.header, compatible: c.header.compatible | COMPAT_FROZEN }));
  }

  /** Points the image at a different backing file (no data changes: callers do safe rebase). */
  async setBacking(name: string | null, format: 'raw' | 'ksc_inc' | null, dev: BlockDevice | null): Promise<void> {
    const c = this.core;
    c.writable();
    await flush(c);
    await c.flushMutex.run(() =>
      c.writeHeader({
        ...c.header,
        backingName: name ?? '',
        backingFormat: name === null ? BackingFormat.None : format === 'raw' ? BackingFormat.Raw : BackingFormat.Ksc,
        backup: null,
        localBase: null,
        origin: { state: 'none' }, // §4.3 rule 3: an unsafe rebase changes the content without marking any bitmap
      }),
    );
    c.backingDev = dev;
  }

  /** §4.3: the backup this image is a copy of (with its origin bitmap), why the record is not trusted, or null. */
  get origin(): OriginView | null {
    return originView(this.core);
  }

  /** §4.3 rule 1: after a restore (every byte flushed), records the backup; returns the origin bitmap's name. */
  setOrigin(r: Omit<OriginRecord, 'bitmapSuffix'>): Promise<string> {
    return setOrigin(this.core, r, Math.max(64 * 1024, this.blockSize));
  }

  // ---------------------------------------------------------------- capabilities (../capabilities.ts)
  // The image offers each capability itself: its members above implement them.

  get dirtyBitmaps(): this {
    return this;
  }

  get changeGate(): this {
    return this;
  }

  get layers(): this {
    return this;
  }

  get allocation(): this {
    return this;
  }

  get identity(): this {
    return this;
  }

  /** Callback writes (an NBD WRITE's path): datapath.ts writeCb. */
  readonly writesNow: WritesNow = { writeNow: (o, b, fua, done) => data.writeCb(this.core, o, b, fua, done) };

  /** Host spans (zero-copy NBD replies): where [offset, offset+length) lies now, or null (read.ts). */
  get readsFrom(): HostSpans | undefined {
    if (!this.core.file.readFd) return undefined;
    return {
      hostSpans: (o, n) => {
        this.onRead?.(o, n);
        return reads.hostSpans(this.core, o, n);
      },
    };
  }

  /** Allocation.clusterSize: the image's block size (its map allocates whole blocks). */
  get clusterSize(): number {
    return this.blockSize;
  }
}
