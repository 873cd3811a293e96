/**
 * The block map of a ksc_inc image (formats/ksc_inc.md §5): a dense directory of sealed entries pointing at
 * map pages of 4096 sealed map entries. Pages load on first use and stay in memory; every change re-seals
 * the entry in the page's raw buffer at once and marks its 4 KiB sub-page dirty, so a flush only copies
 * bytes (see `snapshot`).
 */
import { corrupt } from '../errors.js';
import type { HostFile } from '../io/file.js';
import { BlockState, DESC_CSUM_VALID, DESC_RESERVED_MASK, DESC_STATE_MASK, MAP_PAGE_BYTES, MAP_PAGE_ENTRIES, TAG_DIR, TAG_MAP } from '../format/constants.js';
import { fillEmpty16, seal, sealOk, sealWords } from '../format/seal.js';
import { nativeOps } from '../io/native.js';

const SUBPAGE = 4096;
/** In-memory state of an entry that failed its checks (never written: it is 3, invalid on disk too). */
export const DAMAGED = 3;

/** Runs one step of a scan (e.g. under a lock). */
export type Guard = <T>(fn: () => Promise<T>) => Promise<T>;
const SUBPAGES = MAP_PAGE_BYTES / SUBPAGE;
const ENTRIES_PER_SUBPAGE = SUBPAGE / 16;

/** The host offset a map entry's descriptor words hold (bits 12..52; §5.2). */
function hostOf(lo: number, hi: number): number {
  return hi * 0x100000000 + (((lo >>> 12) << 12) >>> 0);
}

export class MapPage {
  readonly state = new Uint8Array(MAP_PAGE_ENTRIES);
  readonly host = new Float64Array(MAP_PAGE_ENTRIES);
  readonly csum = new Uint32Array(MAP_PAGE_ENTRIES);
  readonly csumValid = new Uint8Array(MAP_PAGE_ENTRIES);
  /** Dirty 4 KiB sub-pages. */
  readonly dirty = new Uint8Array(SUBPAGES);
  /** Entries that failed their checks (state DAMAGED): what was wrong with each. */
  damaged: Map<number, string> | null = null;
  dirtyCount = 0;

  constructor(
    readonly index: number,
    public hostOffset: number,
    readonly raw: Buffer,
  ) {}
}

export interface MapWrite {
  offset: number;
  data: Buffer;
}

export class MapTable {
  private pages = new Map<number, MapPage>();
  private loading = new Map<number, Promise<MapPage>>();
  private dirtyDir = new Set<number>();
  private newPages = new Set<MapPage>();
  private readonly pageEntries = MAP_PAGE_ENTRIES;

  constructor(
    private readonly file: HostFile,
    private readonly dir: Buffer,
    private readonly dirOffset: number,
    private readonly blockSize: number,
    private readonly blocks: number,
    private readonly fileEnd: () => number,
  ) {}

  /** Builds a fresh, empty directory buffer for `entries` pages. */
  static emptyDirectory(entries: number): Buffer {
    const buf = Buffer.alloc(entries * 16);
    fillEmpty16(buf, TAG_DIR, 0);
    return buf;
  }

  get loadedPages(): Iterable<MapPage> {
    return this.pages.values();
  }

  get directoryEntries(): number {
    return this.dir.length / 16;
  }

  /** Host offset of map page `p` from its directory entry, verified; 0 = no page. */
  pageOffset(p: number): number {
    const rec = this.dir.subarray(p * 16, p * 16 + 16);
    if (!sealOk(rec, TAG_DIR, p)) {
      throw corrupt(this.file.path, 'directory', `entry ${p} at offset 0x${(this.dirOffset + p * 16).toString(16)} checksum mismatch`);
    }
    const off = Number(rec.readBigUInt64LE(0));
    if (off !== 0 && (off % 4096 !== 0 || off < 8192 || off + MAP_PAGE_BYTES > this.fileEnd() || rec.readUInt32LE(8) !== 0)) {
      throw corrupt(this.file.path, 'directory', `entry ${p} points at 0x${off.toString(16)}, outside the file or misaligned`);
    }
    return off;
  }

  /** Makes sure the pages holding blocks first..last are in memory. */
  async ensure(first: number, last: number): Promise<void> {
    const p0 = Math.floor(first / this.pageEntries);
    const p1 = Math.floor(last / this.pageEntries);
    for (let p = p0; p <= p1; p++) if (!this.pages.has(p)) await this.load(p);
  }

  page(p: number): MapPage | undefined {
    return this.pages.get(p);
  }

  /** True when page p has no page on disk and none in memory (every block unallocated), without loading. */
  pageAbsent(p: number): boolean {
    return !this.pages.has(p) && this.pageOffset(p) === 0;
  }

  private load(p: number): Promise<MapPage> {
    let pending = this.loading.get(p);
    if (!pending) {
      pending = this.read(p).finally(() => this.loading.delete(p));
      this.loading.set(p, pending);
    }
    return pending;
  }

  private async read(p: number): Promise<MapPage> {
    const off = this.pageOffset(p);
    const raw = Buffer.alloc(MAP_PAGE_BYTES);
    let page: MapPage;
    if (off === 0) {
      fillEmpty16(raw, TAG_MAP, p * this.pageEntries);
      page = new MapPage(p, 0, raw);
    } else {
      const n = await this.file.read(raw, off);
      if (n < MAP_PAGE_BYTES) throw corrupt(this.file.path, `map page ${p}`, `at 0x${off.toString(16)} is truncated`);
      page = new MapPage(p, off, raw);
      this.decode(page);
    }
    this.pages.set(p, page);
    return page;
  }

  private decode(page: MapPage): void {
    const base = page.index * this.pageEntries;
    const raw = page.raw;
    const native = nativeOps()?.mapPageDecode;
    if (native) {
      // In C (a fresh process decodes a whole page to read one block of it); the entries it suspects are
      // judged here, by the same checks as the loop below.
      const suspects = new Uint32Array(this.pageEntries);
      const limits = new Float64Array([this.blocks, this.blockSize, this.fileEnd()]);
      const n = native(raw, base, TAG_MAP, limits, page.state, page.host, page.csum, page.csumValid, suspects);
      const words = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
      for (let s = 0; s < n; s++) this.decodeEntry(page, words, suspects[s]!, limits[2]!);
      return;
    }
    // Each entry's four words read once, through a DataView (a builtin: no per-read call into Buffer's checks,
    // which a first decode in a fresh process pays in full).
    const words = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    const end = this.fileEnd();
    for (let i = 0; i < this.pageEntries; i++) this.decodeEntry(page, words, i, end);
  }

  /** Entry `i` of `page` checked and decoded into the page's arrays (DAMAGED when a check fails). */
  private decodeEntry(page: MapPage, words: DataView, i: number, end: number): void {
    const o = i * 16;
    const block = page.index * this.pageEntries + i;
    const lo = words.getUint32(o, true);
    const hi = words.getUint32(o + 4, true);
    const csum = words.getUint32(o + 8, true);
    const problem = this.entryProblem(lo, hi, csum, words.getUint32(o + 12, true), block, end);
    if (problem) {
      // Damage stays local: this block refuses I/O, its 4095 neighbours keep working.
      page.state[i] = DAMAGED;
      page.host[i] = page.csum[i] = page.csumValid[i] = 0; // as a fresh page's (the C decode set them)
      (page.damaged ??= new Map()).set(i, `entry for block ${block} (map page ${page.index} at 0x${(page.hostOffset + o).toString(16)}) ${problem}`);
      return;
    }
    page.state[i] = lo & DESC_STATE_MASK;
    page.host[i] = hostOf(lo, hi);
    page.csum[i] = csum;
    page.csumValid[i] = (lo & DESC_CSUM_VALID) !== 0 ? 1 : 0;
  }

  /**
   * What is wrong with the map entry of `block`, given as its four words (the descriptor's two, the data
   * checksum, the seal), or null when it is sound (§5.2).
   */
  private entryProblem(lo: number, hi: number, csum: number, stored: number, block: number, end: number): string | null {
    if (stored !== sealWords(TAG_MAP, block, lo, hi, csum)) return 'checksum mismatch';
    const state = lo & DESC_STATE_MASK;
    const hostOff = hostOf(lo, hi);
    if (state === 3 || (lo & DESC_RESERVED_MASK) !== 0 || hi >= 0x200000) return 'has an invalid descriptor';
    if (block >= this.blocks && state !== BlockState.Unallocated) return 'is past the end of the disk but allocated';
    if (state === BlockState.Data) {
      if (hostOff % this.blockSize !== 0 || hostOff < 8192 || hostOff + this.blockSize > end) {
        return `points at cluster 0x${hostOff.toString(16)}, outside the file or misaligned`;
      }
    } else if (hostOff !== 0 || (lo & DESC_CSUM_VALID) !== 0) {
      return 'has an offset or checksum flag without data';
    }
    return null;
  }

  /** Throws the corruption error of a DAMAGED entry (call when a block's state reads DAMAGED). */
  damagedError(block: number): Error {
    const page = this.pages.get(Math.floor(block / this.pageEntries));
    return corrupt(this.file.path, 'map', page?.damaged?.get(block % this.pageEntries) ?? `entry for block ${block} is damaged`);
  }

  /** Sets the entry of `block` (its page must be loaded) and re-seals it. */
  set(block: number, state: BlockState, host: number, csum: number, csumValid: boolean): void {
    const p = Math.floor(block / this.pageEntries);
    const i = block - p * this.pageEntries;
    const page = this.pages.get(p)!;
    page.state[i] = state;
    page.host[i] = host;
    page.csum[i] = csum;
    page.csumValid[i] = csumValid ? 1 : 0;
    const o = i * 16;
    const rec = page.raw.subarray(o, o + 16);
    const desc = host + state + (csumValid ? DESC_CSUM_VALID : 0);
    rec.writeUInt32LE(desc % 0x100000000, 0);
    rec.writeUInt32LE(Math.floor(desc / 0x100000000), 4);
    rec.writeUInt32LE(csum >>> 0, 8);
    seal(rec, TAG_MAP, block);
    const sp = Math.floor(i / ENTRIES_PER_SUBPAGE);
    if (!page.dirty[sp]) {
      page.dirty[sp] = 1;
      page.dirtyCount++;
    }
    if (page.hostOffset === 0) this.newPages.add(page);
  }

  /**
   * Collects what a flush must write (formats/ksc_inc.md §9 rule 3) and clears the dirty marks: `fresh`
   * are new pages (written, then synced, before anything points at them), `inPlace` are sealed records
   * rewritten where they are. Copies the bytes, so later changes do not race the writes.
   */
  snapshot(allocMeta: (bytes: number) => number, fresh: MapWrite[], inPlace: MapWrite[]): void {
    for (const page of this.newPages) {
      page.hostOffset = allocMeta(MAP_PAGE_BYTES);
      fresh.push({ offset: page.hostOffset, data: Buffer.from(page.raw) });
      page.dirty.fill(0);
      page.dirtyCount = 0;
      const rec = this.dir.subarray(page.index * 16, page.index * 16 + 16);
      rec.fill(0);
      rec.writeBigUInt64LE(BigInt(page.hostOffset), 0);
      seal(rec, TAG_DIR, page.index);
      this.dirtyDir.add(Math.floor((page.index * 16) / SUBPAGE));
    }
    this.newPages.clear();
    for (const page of this.pages.values()) {
      if (page.dirtyCount === 0) continue;
      // One write per run of consecutive dirty sub-pages (whole sealed records either way).
      for (let sp = 0; sp < SUBPAGES; sp++) {
        if (!page.dirty[sp]) continue;
        let end = sp;
        while (end < SUBPAGES && page.dirty[end]) page.dirty[end++] = 0;
        inPlace.push({ offset: page.hostOffset + sp * SUBPAGE, data: Buffer.from(page.raw.subarray(sp * SUBPAGE, end * SUBPAGE)) });
        sp = end;
      }
      page.dirtyCount = 0;
    }
    for (const sp of this.dirtyDir) {
      const start = sp * SUBPAGE;
      inPlace.push({ offset: this.dirOffset + start, data: Buffer.from(this.dir.subarray(start, Math.min(start + SUBPAGE, this.dir.length))) });
    }
    this.dirtyDir.clear();
  }

  /**
   * Calls `visit` with the host offset of every DATA entry and of every map page, reading pages that are not
   * in memory into one reused buffer without keeping them (memory stays flat however large the map).
   * Returns false, having stopped, when any directory entry or map entry is damaged: then the caller
   * cannot know every cluster in use and MUST NOT free anything on the strength of this scan. `eachPage`
   * runs the scan of each page (a deferred sweep holds the flush mutex there, so no flush writes the page
   * while it is read).
   */
  async scanReferences(visit: (host: number, bytes: number) => void, eachPage: Guard = (fn) => fn()): Promise<boolean> {
    const raw = Buffer.alloc(MAP_PAGE_BYTES);
    const words = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    for (let p = 0; p < this.directoryEntries; p++) {
      if (!(await eachPage(() => this.scanPage(p, raw, words, visit)))) return false;
    }
    return true;
  }

  /** scanReferences for page `p` (read into `raw`, whose words are `words`): false when its directory entry or one of its entries is damaged. */
  private async scanPage(p: number, raw: Buffer, words: DataView, visit: (host: number, bytes: number) => void): Promise<boolean> {
    let off: number;
    try {
      off = this.pageOffset(p);
    } catch {
      return false;
    }
    const loaded = this.pages.get(p);
    if (loaded) {
      if (loaded.damaged) return false;
      if (loaded.hostOffset !== 0) visit(loaded.hostOffset, MAP_PAGE_BYTES);
      for (let i = 0; i < this.pageEntries; i++) if (loaded.state[i] === BlockState.Data) visit(loaded.host[i]!, this.blockSize);
      return true;
    }
    if (off === 0) return true;
    if ((await this.file.read(raw, off)) < MAP_PAGE_BYTES) return false;
    visit(off, MAP_PAGE_BYTES);
    const end = this.fileEnd();
    for (let i = 0; i < this.pageEntries; i++) {
      const o = i * 16;
      const lo = words.getUint32(o, true);
      const hi = words.getUint32(o + 4, true);
      if (this.entryProblem(lo, hi, words.getUint32(o + 8, true), words.getUint32(o + 12, true), p * this.pageEntries + i, end)) return false;
      if ((lo & DESC_STATE_MASK) === BlockState.Data) visit(hostOf(lo, hi), this.blockSize);
    }
    return true;
  }

  /** Loads every page that exists on disk (for check, commit and full scans). */
  async loadAll(): Promise<void> {
    for (let p = 0; p < this.directoryEntries; p++) {
      if (!this.pages.has(p) && this.pageOffset(p) !== 0) await this.load(p);
    }
  }
}
