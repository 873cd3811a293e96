/**
 * Persistent dirty bitmaps (formats/ksc_inc.md §6): a directory of 128-byte sealed slots, each bitmap a
 * dense table of sealed entries pointing at 4 KiB pages of 256 sealed 64-bit words. Pages load on first use
 * and stay in memory; bits are set in memory and written by the image's flush, in the same two phases as
 * the block map. Clearing and merging build a complete new table and switch the slot atomically (§9 rule 6).
 *
 * Damage degrades instead of failing (§6.4): a table entry or page that fails its seal makes that page
 * "failed": it reads as wholly dirty, is never marked, loaded or rewritten (so the damage stays visible on
 * disk and is never laundered into a valid record with lost bits), and the bitmap reports `damage`. A
 * damaged directory slot or table makes every page failed. Writing a new table (clear, merge, freeze)
 * ends the damage.
 */
import { corrupt, isKscError } from '../errors.js';
import type { HostFile } from '../io/file.js';
import { BITMAP_PAGE_BYTES, BITS_PER_PAGE, WORDS_PER_PAGE, tagBitmapTable, tagBitmapWord } from '../format/constants.js';
import { bitmapTableEntries } from '../format/bitmap-slot.js';
import { fillEmpty16, seal, sealOk, sealWords } from '../format/seal.js';
import type { MapWrite } from './maptable.js';
import { nativeOps } from '../io/native.js';

/**
 * Moves whenever a bitmap is enabled or disabled, or an image's bitmap slots change (ksc/bitmaps.ts
 * setSlot): a list of the enabled bitmaps cached with an older value is stale (ksc/partial.ts).
 */
export const bitmapsGeneration = { n: 0 };

export interface BitmapInfo {
  name: string;
  granularity: number;
  enabled: boolean;
}

interface BitmapPage {
  hostOffset: number; // 0 = not on disk yet
  bits: Uint32Array; // BITS_PER_PAGE bits
  dirty: boolean;
}

/** Sets bits [first, last] (inclusive) of a page's Uint32Array. */
function setBitRange(words: Uint32Array, first: number, last: number): void {
  let i = first;
  for (; i <= last && (i & 31) !== 0; i++) words[i >>> 5]! |= 1 << (i & 31);
  for (; i + 31 <= last; i += 32) words[i >>> 5] = 0xffffffff;
  for (; i <= last; i++) words[i >>> 5]! |= 1 << (i & 31);
}

/** A page with every bit set (what a failed page reads as). */
const ALL_SET = new Uint32Array(BITS_PER_PAGE / 32).fill(0xffffffff);

export class SparseBitmap {
  /** Why this bitmap's on-disk bits are partly unknown (first damage found), or null. */
  damage: string | null = null;
  /** The directory slot itself is damaged: name and settings are guesses, the table is unknown. */
  slotDamaged = false;
  /** Every page failed (slot or table damaged). */
  private allFailed = false;
  /** Pages whose table entry or page failed its check. */
  private readonly failed = new Set<number>();
  private table: Buffer | null = null;
  private tableLoading: Promise<void> | null = null;
  readonly pages = new Map<number, BitmapPage>();
  private dirtyTable = new Set<number>();
  readonly bits: number;

  constructor(
    private readonly file: HostFile,
    readonly slot: number,
    public name: string,
    readonly granularityBits: number,
    enabled: boolean,
    public tableOffset: number,
    readonly tableEntries: number,
    virtualSize: number,
    private readonly fileEnd: () => number = () => Number.MAX_SAFE_INTEGER,
  ) {
    this.bits = Math.ceil(virtualSize / 2 ** granularityBits);
    this.gran = 2 ** granularityBits;
    this.on = enabled;
  }

  private on: boolean;

  /** Whether writes mark this bitmap; a change moves bitmapsGeneration (the writers' cached lists). */
  get enabled(): boolean {
    return this.on;
  }

  set enabled(v: boolean) {
    this.on = v;
    bitmapsGeneration.n++;
  }

  private readonly gran: number;

  get granularity(): number {
    return this.gran;
  }

  static tableEntriesFor(virtualSize: number, granularityBits: number): number {
    return bitmapTableEntries(virtualSize, granularityBits);
  }

  static tableBytes(entries: number): number {
    return Math.ceil((entries * 16) / 4096) * 4096;
  }

  private where(): string {
    return `bitmap "${this.name}"`;
  }

  /** A bitmap whose directory slot failed its check: every bit reads as set; only a new table ends it. */
  static damagedSlot(file: HostFile, slot: number, guess: { name: string; granularityBits: number; enabled: boolean }, virtualSize: number, reason: string): SparseBitmap {
    const b = new SparseBitmap(file, slot, guess.name, guess.granularityBits, guess.enabled, 0, SparseBitmap.tableEntriesFor(virtualSize, guess.granularityBits), virtualSize);
    b.slotDamaged = true;
    b.allFailed = true;
    b.damage = reason;
    return b;
  }

  /** True when page p's bits are unknown (they read as set). */
  private isFailed(p: number): boolean {
    return this.allFailed || this.failed.has(p);
  }

  private fail(p: number | null, e: unknown): void {
    if (!isKscError(e, 'KSC_E_CORRUPT')) throw e;
    this.damage ??= e.message;
    if (p === null) this.allFailed = true;
    else this.failed.add(p);
  }

  private async loadTable(): Promise<void> {
    if (this.table || this.allFailed) return;
    const gen = this.tableGen;
    this.tableLoading ??= (async () => {
      const buf = Buffer.alloc(this.tableEntries * 16);
      if ((await this.file.read(buf, this.tableOffset)) < buf.length) throw corrupt(this.file.path, this.where(), 'table is truncated');
      if (gen === this.tableGen) this.table = buf;
    })().catch((e: unknown) => {
      if (gen === this.tableGen) this.fail(null, e);
    });
    await this.tableLoading;
  }

  private pageOffset(p: number): number {
    const rec = this.table!.subarray(p * 16, p * 16 + 16);
    if (!sealOk(rec, tagBitmapTable(this.slot), p)) {
      throw corrupt(this.file.path, this.where(), `table entry ${p} at offset 0x${(this.tableOffset + p * 16).toString(16)} checksum mismatch`);
    }
    const off = Number(rec.readBigUInt64LE(0));
    if (off % 4096 !== 0 || (off !== 0 && (off < 8192 || off + BITMAP_PAGE_BYTES > this.fileEnd())) || rec.readUInt32LE(8) !== 0) {
      throw corrupt(this.file.path, this.where(), `table entry ${p} points at 0x${off.toString(16)}, outside the file or misaligned`);
    }
    return off;
  }

  private readonly loading = new Map<number, Promise<BitmapPage | null>>();

  /**
   * Loads page p once: concurrent callers share the read, and a page already in memory is never replaced.
   * A page that fails its check becomes failed (null), not an error.
   */
  private loadPage(p: number): Promise<BitmapPage | null> {
    const have = this.pages.get(p);
    if (have) return Promise.resolve(have);
    if (this.isFailed(p)) return Promise.resolve(null);
    let pending = this.loading.get(p);
    if (!pending) {
      pending = this.readChecked(p).finally(() => this.loading.delete(p));
      this.loading.set(p, pending);
    }
    return pending;
  }

  /** readPage; a failed check marks the page failed, unless the table was switched meanwhile (then it retries). */
  private async readChecked(p: number): Promise<BitmapPage | null> {
    for (;;) {
      const gen = this.tableGen;
      try {
        return await this.readPage(p);
      } catch (e) {
        if (gen !== this.tableGen) continue;
        this.fail(p, e);
        return null;
      }
    }
  }

  /** Bumped when the bitmap switches to a new table, so a read of the old table's page is not adopted. */
  private tableGen = 0;

  private async readPage(p: number): Promise<BitmapPage | null> {
    const gen = this.tableGen;
    await this.loadTable();
    if (this.allFailed) return null;
    const off = this.pageOffset(p);
    const page: BitmapPage = { hostOffset: off, bits: new Uint32Array(BITS_PER_PAGE / 32), dirty: false };
    if (off !== 0) {
      const raw = Buffer.alloc(BITMAP_PAGE_BYTES);
      if ((await this.file.read(raw, off)) < raw.length) throw corrupt(this.file.path, this.where(), `page ${p} at 0x${off.toString(16)} is truncated`);
      const tag = tagBitmapWord(this.slot);
      // In C with the addon (native/kscinc_pages.c); else each record's words read once, through a DataView
      // (as the map table's pages: maptable.ts decode). The first record that fails is reported as below.
      const native = nativeOps()?.bitmapPageDecode;
      const from = native ? native(raw, p * WORDS_PER_PAGE, tag, page.bits) : 0;
      const words = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
      for (let w = from; w >= 0 && w < WORDS_PER_PAGE; w++) {
        const o = w * 16;
        const lo = words.getUint32(o, true);
        const hi = words.getUint32(o + 4, true);
        const zero = words.getUint32(o + 8, true);
        if (zero !== 0 || words.getUint32(o + 12, true) !== sealWords(tag, p * WORDS_PER_PAGE + w, lo, hi, zero)) {
          throw corrupt(this.file.path, this.where(), `word ${p * WORDS_PER_PAGE + w} at offset 0x${(off + o).toString(16)} checksum mismatch`);
        }
        page.bits[2 * w] = lo;
        page.bits[2 * w + 1] = hi;
      }
    }
    if (gen !== this.tableGen) return this.readPage(p); // cleared or merged meanwhile: read the new table
    const raced = this.pages.get(p); // created by mark() meanwhile (only for pages the table says are empty)
    if (raced) return raced;
    this.pages.set(p, page);
    return page;
  }

  /** Loads the table and the pages covering [offset, offset+length) so `mark` needs no I/O. */
  async prepare(offset: number, length: number): Promise<void> {
    await this.loadTable();
    if (length === 0) return;
    const p0 = Math.floor(Math.floor(offset / this.granularity) / BITS_PER_PAGE);
    const p1 = Math.floor(Math.floor((offset + length - 1) / this.granularity) / BITS_PER_PAGE);
    for (let p = p0; p <= p1; p++) if (!this.pages.has(p)) await this.loadPage(p);
  }

  /** True when `prepare(offset, length)` would have nothing to load (so `mark` may be used right away). */
  prepared(offset: number, length: number): boolean {
    if (!this.table && !this.allFailed) return false;
    if (length === 0) return true;
    const p0 = Math.floor(Math.floor(offset / this.granularity) / BITS_PER_PAGE);
    const p1 = Math.floor(Math.floor((offset + length - 1) / this.granularity) / BITS_PER_PAGE);
    for (let p = p0; p <= p1; p++) if (!this.pages.has(p) && !this.isFailed(p)) return false;
    return true;
  }

  async loadAll(): Promise<void> {
    await this.loadTable();
    for (let p = 0; p < this.tableEntries; p++) if (!this.pages.has(p)) await this.loadPage(p);
  }

  /**
   * Marks made since startRecording(), replayed by adoptTable(): a management operation builds a new table
   * from the bits as they were when it started, and the marks of changes landing meanwhile carry over into
   * it, so none is dropped by the switch (§9 rule 6).
   */
  private recorded: number[] | null = null;

  /** Starts recording marks (call in the same synchronous step that snapshots the bits). */
  startRecording(): void {
    this.recorded = [];
  }

  /** Stops recording without replaying (the operation failed and the old table stays). */
  stopRecording(): void {
    this.recorded = null;
  }

  /** Sets the bits covering [offset, offset+length); the pages must have been prepared. */
  mark(offset: number, length: number): void {
    if (length === 0) return;
    if (this.recorded) this.recorded.push(offset, length);
    if (this.allFailed) return;
    const k0 = Math.floor(offset / this.granularity);
    const k1 = Math.min(Math.floor((offset + length - 1) / this.granularity), this.bits - 1);
    for (let p = Math.floor(k0 / BITS_PER_PAGE); p * BITS_PER_PAGE <= k1; p++) {
      if (this.failed.has(p)) continue; // reads as set; creating it would hide the damage
      let page = this.pages.get(p);
      if (!page) {
        // Only reachable for pages the table says are empty (prepare loads the others).
        page = { hostOffset: 0, bits: new Uint32Array(BITS_PER_PAGE / 32), dirty: false };
        this.pages.set(p, page);
      }
      const first = Math.max(k0 - p * BITS_PER_PAGE, 0);
      const last = Math.min(k1 - p * BITS_PER_PAGE, BITS_PER_PAGE - 1);
      setBitRange(page.bits, first, last);
      page.dirty = true;
    }
  }

  isSet(bit: number): boolean {
    if (this.isFailed(Math.floor(bit / BITS_PER_PAGE))) return true;
    const page = this.pages.get(Math.floor(bit / BITS_PER_PAGE));
    if (!page) return false;
    const i = bit % BITS_PER_PAGE;
    return (page.bits[i >>> 5]! & (1 << (i & 31))) !== 0;
  }

  encodePage(p: number, page: BitmapPage): Buffer {
    const raw = Buffer.alloc(BITMAP_PAGE_BYTES);
    const tag = tagBitmapWord(this.slot);
    for (let w = 0; w < WORDS_PER_PAGE; w++) {
      const rec = raw.subarray(w * 16, w * 16 + 16);
      rec.writeUInt32LE(page.bits[2 * w]!, 0);
      rec.writeUInt32LE(page.bits[2 * w + 1]!, 4);
      seal(rec, tag, p * WORDS_PER_PAGE + w);
    }
    return raw;
  }

  private setTableEntry(p: number, offset: number): void {
    const rec = this.table!.subarray(p * 16, p * 16 + 16);
    rec.fill(0);
    rec.writeBigUInt64LE(BigInt(offset), 0);
    seal(rec, tagBitmapTable(this.slot), p);
    this.dirtyTable.add(Math.floor((p * 16) / 4096));
  }

  /** Dirty pages and table records for a flush (see MapTable.snapshot). */
  snapshot(allocMeta: (bytes: number) => number, fresh: MapWrite[], inPlace: MapWrite[]): void {
    for (const [p, page] of this.pages) {
      if (!page.dirty) continue;
      page.dirty = false;
      if (page.hostOffset === 0) {
        page.hostOffset = allocMeta(BITMAP_PAGE_BYTES);
        fresh.push({ offset: page.hostOffset, data: this.encodePage(p, page) });
        this.setTableEntry(p, page.hostOffset);
      } else {
        inPlace.push({ offset: page.hostOffset, data: this.encodePage(p, page) });
      }
    }
    for (const sp of this.dirtyTable) {
      const start = sp * 4096;
      inPlace.push({ offset: this.tableOffset + start, data: Buffer.from(this.table!.subarray(start, Math.min(start + 4096, this.table!.length))) });
    }
    this.dirtyTable.clear();
  }

  /** Dirty extents of [offset, offset+length), merged. Loads the pages it needs. */
  async dirtyExtents(offset = 0, length = Number.MAX_SAFE_INTEGER, virtualSize = Number.MAX_SAFE_INTEGER): Promise<{ offset: number; length: number }[]> {
    await this.loadTable();
    const end = Math.min(offset + length, virtualSize, this.bits * this.granularity);
    const out: { offset: number; length: number }[] = [];
    if (end <= offset) return out;
    const k0 = Math.floor(offset / this.granularity);
    const k1 = Math.floor((end - 1) / this.granularity);
    for (let p = Math.floor(k0 / BITS_PER_PAGE); p * BITS_PER_PAGE <= k1; p++) {
      let bits: Uint32Array | undefined = this.pages.get(p)?.bits;
      if (!bits && !this.isFailed(p)) {
        let empty = false;
        try {
          empty = this.pageOffset(p) === 0;
        } catch (e) {
          this.fail(p, e);
        }
        if (empty) continue;
        bits = (await this.loadPage(p))?.bits;
      }
      const page = { bits: bits ?? ALL_SET };
      const from = Math.max(k0, p * BITS_PER_PAGE);
      const to = Math.min(k1, p * BITS_PER_PAGE + BITS_PER_PAGE - 1);
      for (let k = from; k <= to; k++) {
        const i = k - p * BITS_PER_PAGE;
        if (page.bits[i >>> 5] === 0 && (i & 31) === 0 && k + 31 <= to) {
          k += 31;
          continue;
        }
        if ((page.bits[i >>> 5]! & (1 << (i & 31))) === 0) continue;
        const s = Math.max(k * this.granularity, offset);
        const e = Math.min((k + 1) * this.granularity, end);
        const last = out[out.length - 1];
        if (last && last.offset + last.length === s) last.length += e - s;
        else out.push({ offset: s, length: e - s });
      }
    }
    return out;
  }

  /** Writes a complete new, empty table for this bitmap at `offset` (not yet referenced). */
  static emptyTable(slot: number, entries: number): Buffer {
    const buf = Buffer.alloc(SparseBitmap.tableBytes(entries));
    fillEmpty16(buf.subarray(0, entries * 16), tagBitmapTable(slot), 0);
    return buf;
  }

  /** Replaces the in-memory state after the slot was switched to a new table. */
  adoptTable(offset: number, table: Buffer, pages: Map<number, Uint32Array>, pageOffsets: Map<number, number>): void {
    this.tableGen++;
    this.damage = null;
    this.slotDamaged = false;
    this.allFailed = false;
    this.failed.clear();
    this.tableOffset = offset;
    this.table = table.subarray(0, this.tableEntries * 16);
    this.tableLoading = null;
    this.pages.clear();
    this.dirtyTable.clear();
    for (const [p, bits] of pages) this.pages.set(p, { hostOffset: pageOffsets.get(p) ?? 0, bits, dirty: false });
    const replay = this.recorded;
    this.recorded = null;
    // Marks made since the bits were snapshotted: the next flush writes them (their intent bits are still set).
    if (replay) for (let i = 0; i < replay.length; i += 2) this.mark(replay[i]!, replay[i + 1]!);
  }

  /** A copy of the bits of every page in memory (loadAll() first for all of them), failed pages wholly set. Synchronous. */
  copyBits(): Map<number, Uint32Array> {
    const out = new Map([...this.pages].map(([p, page]) => [p, new Uint32Array(page.bits)]));
    for (let p = 0; p < this.tableEntries; p++) {
      if (!this.isFailed(p)) continue;
      const bits = new Uint32Array(BITS_PER_PAGE / 32);
      setBitRange(bits, 0, Math.min(BITS_PER_PAGE, this.bits - p * BITS_PER_PAGE) - 1);
      out.set(p, bits);
    }
    return out;
  }

  /** Pages that failed their check (for check and repair reports). */
  failedPages(): number[] {
    return this.allFailed ? Array.from({ length: this.tableEntries }, (_, i) => i) : [...this.failed].sort((a, b) => a - b);
  }

  /** Set bit ranges as byte extents, from the pages in memory only (synchronous: call after loadAll()). */
  loadedExtents(virtualSize: number): { offset: number; length: number }[] {
    const out: { offset: number; length: number }[] = [];
    const g = this.granularity;
    const all = this.copyBits();
    for (const p of [...all.keys()].sort((a, b) => a - b)) {
      const bits = all.get(p)!;
      for (let w = 0; w < bits.length; w++) {
        let v = bits[w]!;
        while (v !== 0) {
          const i = 31 - Math.clz32(v & -v);
          v &= v - 1;
          const k = p * BITS_PER_PAGE + w * 32 + i;
          const s = k * g;
          const e = Math.min(s + g, virtualSize);
          if (e <= s) continue;
          const last = out[out.length - 1];
          if (last && last.offset + last.length === s) last.length += e - s;
          else out.push({ offset: s, length: e - s });
        }
      }
    }
    return out;
  }

  /** Host ranges this bitmap occupies (table and pages), for leak checks and punching. */
  async hostRanges(): Promise<{ offset: number; length: number }[]> {
    await this.loadTable();
    // A damaged slot or table names nothing trustworthy: its space stays leaked (check --repair reclaims it).
    if (this.allFailed) return [];
    const out = [{ offset: this.tableOffset, length: SparseBitmap.tableBytes(this.tableEntries) }];
    for (let p = 0; p < this.tableEntries; p++) {
      let off = this.pages.get(p)?.hostOffset ?? 0;
      if (!off) {
        try {
          off = this.pageOffset(p);
        } catch (e) {
          this.fail(p, e);
        }
      }
      if (off) out.push({ offset: off, length: BITMAP_PAGE_BYTES });
    }
    return out;
  }
}
