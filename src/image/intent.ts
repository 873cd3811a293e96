/**
 * The write-intent log (formats/ksc_inc.md §7, §9 rules 2 and 5), like Linux md's write-intent bitmap.
 * Before any change to a region reaches the disk, the region's intent bit is durable; so after a crash
 * the set bits name every region that may hold changes the bitmaps and checksums do not know about, and
 * recovery needs no scan. Setting costs one sync the first time a clean region is written; concurrent
 * requests share it. Bits are cleared lazily, only for regions idle for a whole flush cycle.
 */
import { corrupt } from '../errors.js';
import type { HostFile } from '../io/file.js';
import { TAG_INTENT } from '../format/constants.js';
import { fillEmpty16, seal, sealOk, sealOkAt } from '../format/seal.js';

/** log2 of the bytes of a group of regions that want() sets together (the former default region, 4 MiB). */
const GROUP_BITS = 22;

/**
 * Escalation budget: besides the half rule, a group goes whole at a first touch while the regions set (and
 * on their way) stay within this many times the bytes changed in this flush cycle and the previous one.
 * Scattered writes then pay about half the syncs, and after a crash the bitmaps overstate what changed by
 * at most about this factor (issue 12 asks ≤ 8×; bench/crash-overmark.mjs measures 7.0–7.2×).
 */
const ESCALATION_BUDGET = 7;

export class IntentLog {
  /** Durable state of each region's bit (what the file says). */
  private readonly persisted: Uint8Array;
  /** The regions whose bit is set, so clearing scans only those, whatever the disk size. */
  private readonly setList = new Set<number>();
  /** Epoch in which the last write to each region completed. */
  private readonly lastTouch: Uint32Array;
  private readonly inflight = new Map<number, number>();
  private readonly wanted = new Set<number>();
  private chain: Promise<void> = Promise.resolve();
  private batch: Promise<void> | null = null;
  /** Regions of the set-batch being written now, and that batch (begin() for them awaits it, not the next). */
  private flying: Set<number> | null = null;
  private flyingDone: Promise<void> | null = null;
  /** Counts syncs spent on intent bits, for the benchmark. */
  syncs = 0;
  /** Counts whole groups set at once (see want). */
  escalations = 0;
  /** Bytes of changes begun in this flush cycle, and in the previous one (the escalation budget's base). */
  private changedNow = 0;
  private changedBefore = 0;
  /** Bytes per region (2^regionBits). */
  private readonly regionSize: number;
  /** Regions per group: 4 MiB of regions (at most 64, one intent word), set together once half are set. */
  private readonly groupRegions: number;

  constructor(
    private readonly file: HostFile,
    private readonly offset: number,
    private readonly raw: Buffer,
    readonly regionBits: number,
    readonly regions: number,
  ) {
    this.persisted = new Uint8Array(regions);
    this.lastTouch = new Uint32Array(regions);
    this.regionSize = 2 ** regionBits;
    this.groupRegions = Math.min(64, 2 ** Math.max(0, GROUP_BITS - regionBits));
  }

  static empty(words: number): Buffer {
    const buf = Buffer.alloc(words * 16);
    fillEmpty16(buf, TAG_INTENT, 0);
    return buf;
  }

  /**
   * Verifies every word and returns the regions that were set. A word that fails its check (§7) is
   * `damaged`: when the image was not closed cleanly (`dirty`) every region it covers counts as set (its bits
   * are unknown, and a superset only costs dirty bits); on a clean image intent words mean nothing and it
   * counts as clear. Either way the word is rewritten in `raw` as that value, sealed, so the next write of
   * its span repairs it on disk.
   */
  static decode(file: string, offset: number, raw: Buffer, regions: number, dirty: boolean): { set: number[]; damaged: string[]; damagedWords: number[] } {
    const set: number[] = [];
    const damaged: string[] = [];
    const damagedWords: number[] = [];
    for (let w = 0; w < raw.length / 16; w++) {
      // The common word, sealed and all clear, is checked in place: a 16 TiB disk has 65 536 words, and a
      // view per word cost a crash restart hundreds of milliseconds of allocation and GC (bench/README).
      const at = w * 16;
      const clear = raw.readUInt32LE(at) === 0 && raw.readUInt32LE(at + 4) === 0 && raw.readUInt32LE(at + 8) === 0;
      if (clear && sealOkAt(raw, at, 16, TAG_INTENT, w)) continue;
      const rec = raw.subarray(at, at + 16);
      let bad: string | null = null;
      if (!sealOk(rec, TAG_INTENT, w) || rec.readUInt32LE(8) !== 0) bad = 'checksum mismatch';
      else if (w * 64 + 64 > regions && rec.readBigUInt64LE(0) >> BigInt(Math.max(0, regions - w * 64)) !== 0n) bad = 'has a bit past the end of the disk';
      if (bad !== null) {
        damaged.push(corrupt(file, 'intent words', `word ${w} at offset 0x${(offset + w * 16).toString(16)} ${bad}`).message);
        damagedWords.push(w);
        rec.fill(0);
        for (let r = w * 64; r < Math.min(regions, w * 64 + 64) && dirty; r++) {
          const half = r % 64 >= 32 ? 4 : 0;
          rec.writeUInt32LE((rec.readUInt32LE(half) | (1 << (r % 32))) >>> 0, half);
        }
        seal(rec, TAG_INTENT, w);
      }
      for (let half = 0; half < 2; half++) {
        let v = rec.readUInt32LE(half * 4);
        while (v !== 0) {
          const bit = 31 - Math.clz32(v);
          v &= ~(1 << bit);
          set.push(w * 64 + half * 32 + bit);
        }
      }
    }
    return { set: set.sort((a, b) => a - b), damaged, damagedWords };
  }

  /** Writes the 4 KiB spans holding these words from memory, durably (repairs damaged words, see decode). */
  async rewriteWords(words: number[]): Promise<void> {
    if (words.length === 0) return;
    await this.enqueue(() =>
      this.writeWords(
        words.map((w) => w * 64),
        true,
      ),
    );
  }

  adoptSet(regions: number[]): void {
    for (const r of regions) this.mark(r, true);
  }

  private mark(r: number, on: boolean): void {
    this.persisted[r] = on ? 1 : 0;
    if (on) this.setList.add(r);
    else this.setList.delete(r);
  }

  regionsOf(offset: number, length: number): [number, number] {
    return [Math.floor(offset / this.regionSize), Math.floor((offset + Math.max(length, 1) - 1) / this.regionSize)];
  }

  /**
   * begin() for when every region of [offset, offset+length) already has its bit durable (the common case
   * once a region is busy): registers the change like begin() and returns true, without a promise. Returns
   * false, changing nothing, when some bit is not durable yet: call begin() then.
   */
  tryBegin(offset: number, length: number): boolean {
    const [r0, r1] = this.regionsOf(offset, length);
    for (let r = r0; r <= r1; r++) if (!this.persisted[r]) return false;
    this.changedNow += length;
    for (let r = r0; r <= r1; r++) this.inflight.set(r, (this.inflight.get(r) ?? 0) + 1);
    return true;
  }

  /**
   * Call before changing [offset, offset+length): resolves once the intent bits are durable. `coarse`: the
   * bits protect nothing a crash would overmark (no bitmap is enabled, only checksums of data changed in
   * place), so a region's whole group is set at its first touch: one sync per 4 MiB, as with 4 MiB regions.
   */
  async begin(offset: number, length: number, coarse = false): Promise<void> {
    const [r0, r1] = this.regionsOf(offset, length);
    this.changedNow += length;
    for (let r = r0; r <= r1; r++) this.inflight.set(r, (this.inflight.get(r) ?? 0) + 1);
    for (;;) {
      // Bits already on their way to the disk (in the batch being written) need only that batch; the others
      // go into the next one, which is written after it.
      let next = false;
      let flying = false;
      for (let r = r0; r <= r1; r++) {
        if (this.persisted[r]) continue;
        if (this.flying?.has(r)) flying = true;
        else {
          this.want(r, coarse);
          next = true;
        }
      }
      if (next) await this.kick();
      else if (flying) await this.flyingDone;
      else return;
    }
  }

  /**
   * Adds region r to the next batch; when r's group already has at least half of its regions set or on
   * their way, the whole group goes with it (same sync). Setting more bits is always safe (a superset);
   * this keeps scattered writes that crowd into a few groups from paying a sync per small region, while
   * sparse scattered writes keep the small regions' precision after a crash (§7). `coarse`: the whole
   * group at once (see begin).
   */
  private want(r: number, coarse: boolean): void {
    this.wanted.add(r);
    if (this.groupRegions === 1) return;
    const g0 = r - (r % this.groupRegions);
    const g1 = Math.min(this.regions, g0 + this.groupRegions);
    let on = 0;
    for (let q = g0; q < g1; q++) if (this.persisted[q] || this.wanted.has(q) || this.flying?.has(q)) on++;
    if (!coarse && on * 2 < g1 - g0) {
      // Scattered writes: the group goes whole only while the budget allows (see ESCALATION_BUDGET).
      const setOrComing = this.setList.size + this.wanted.size + (this.flying?.size ?? 0);
      if ((setOrComing + (g1 - g0 - on)) * this.regionSize > ESCALATION_BUDGET * (this.changedNow + this.changedBefore)) return;
    }
    for (let q = g0; q < g1; q++) if (!this.persisted[q] && !this.flying?.has(q)) this.wanted.add(q);
    this.escalations++;
  }

  /** Call when the change has completed (or failed) in epoch `epoch`. */
  end(offset: number, length: number, epoch: number): void {
    const [r0, r1] = this.regionsOf(offset, length);
    for (let r = r0; r <= r1; r++) {
      const n = (this.inflight.get(r) ?? 1) - 1;
      if (n === 0) this.inflight.delete(r);
      else this.inflight.set(r, n);
      this.lastTouch[r] = epoch;
    }
  }

  private kick(): Promise<void> {
    if (this.batch) return this.batch;
    const run: Promise<void> = this.enqueue(async () => {
      this.batch = null;
      const regions = [...this.wanted];
      this.wanted.clear();
      if (regions.length === 0) return;
      this.flying = new Set(regions);
      this.flyingDone = run;
      try {
        for (const r of regions) this.setRawBit(r, true);
        await this.writeWords(regions, true);
        this.syncs++;
        for (const r of regions) this.mark(r, true);
      } finally {
        this.flying = null;
        this.flyingDone = null;
      }
    });
    this.batch = run;
    return run;
  }

  private enqueue(fn: () => Promise<void>): Promise<void> {
    const run = this.chain.then(fn);
    this.chain = run.catch(() => undefined);
    return run;
  }

  /**
   * After flush number `epoch` completed: clears regions with nothing in flight whose last write completed
   * before the previous flush's snapshot (so both flushes cover it). No sync needed: a clear that lands
   * early only drops a region whose changes are already durable.
   */
  clearIdle(epoch: number): Promise<void> {
    this.changedBefore = this.changedNow;
    this.changedNow = 0;
    const cleared: number[] = [];
    for (const r of this.setList) {
      if (!this.inflight.has(r) && this.lastTouch[r]! + 1 < epoch) cleared.push(r);
    }
    for (const r of cleared) this.mark(r, false);
    if (cleared.length === 0) return Promise.resolve();
    return this.enqueue(async () => {
      for (const r of cleared) if (!this.persisted[r]) this.setRawBit(r, false);
      await this.writeWords(cleared);
    });
  }

  /** Clears every bit (clean close, after a final flush) and syncs. */
  clearAll(): Promise<void> {
    return this.enqueue(async () => {
      const all = [...this.setList];
      for (const r of all) {
        this.mark(r, false);
        this.setRawBit(r, false);
      }
      if (all.length === 0) return;
      await this.writeWords(all);
      await this.file.sync();
    });
  }

  setRegions(): number[] {
    return [...this.setList].sort((a, b) => a - b);
  }

  private setRawBit(r: number, on: boolean): void {
    const w = Math.floor(r / 64);
    const rec = this.raw.subarray(w * 16, w * 16 + 16);
    const half = r % 64 >= 32 ? 4 : 0;
    const bit = 1 << (r % 32);
    const v = rec.readUInt32LE(half);
    rec.writeUInt32LE((on ? v | bit : v & ~bit) >>> 0, half);
    seal(rec, TAG_INTENT, w);
  }

  /** Writes the 4 KiB spans holding these regions' words; `durable`: resolved only once they are on disk. */
  private async writeWords(regions: number[], durable = false): Promise<void> {
    const words = [...new Set(regions.map((r) => Math.floor(r / 64)))].sort((a, b) => a - b);
    // Write whole 4 KiB spans of words: few syscalls, and every record stays whole.
    const spans = [...new Set(words.map((w) => Math.floor((w * 16) / 4096)))];
    const writes = spans.map((s) => {
      const start = s * 4096;
      return { data: Buffer.from(this.raw.subarray(start, Math.min(start + 4096, this.raw.length))), at: this.offset + start };
    });
    if (durable && this.file.writeDurable) {
      await Promise.all(writes.map((w) => this.file.writeDurable!(w.data, w.at)));
      return;
    }
    await Promise.all(writes.map((w) => this.file.write(w.data, w.at)));
    if (durable) await this.file.sync();
  }
}
