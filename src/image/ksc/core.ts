/**
 * The state of one open ksc_inc image (formats/ksc_inc.md), shared by the modules of this folder: the
 * host file and header, the map, allocator, intent log and bitmap slots, and the session's counters.
 * KscImage (image.ts) is the public face; open.ts, read.ts, datapath.ts, flush.ts, extents.ts, bitmaps.ts
 * and check.ts are functions over a KscCore. Only modules of this folder (and white-box tests) see it.
 *
 * It also owns the in-flight gate: every change (write, zero, discard) enters and leaves it, and
 * quiesce() closes it to run something at a point in time with no change in flight.
 */
import { KscError } from '../../errors.js';
import type { HostFile } from '../../io/file.js';
import { HEADER_SLOTS } from '../../format/constants.js';
import { type Header, encodeHeader } from '../../format/header.js';
import { Mutex, RangeLock } from '../../util/concurrency.js';
import type { Allocator } from '../allocator.js';
import type { SparseBitmap } from '../sparse-bitmap.js';
import type { IntentLog } from '../intent.js';
import type { MapTable } from '../maptable.js';
import type { BlockDevice } from '../types.js';

/** One piece of a request inside one block. */
export interface Seg {
  block: number;
  /** Offset of this piece inside the caller's buffer / request. */
  at: number;
  /** Offset inside the block. */
  inBlock: number;
  length: number;
}

export class KscCore {
  readonly blockSize: number;
  readonly blockBits: number;
  readonly size: number;
  readonly blocks: number;
  readonly locks = new RangeLock();
  readonly flushMutex = new Mutex();
  pendingFlush: Promise<void> | null = null;
  /** Number of flush snapshots taken (§9 rules 4 and 5 count in these). */
  epoch = 0;
  closed = false;
  /** Set when a flush failed: the session refuses further changes (reopening recovers). */
  broken: KscError | null = null;
  currentSlot: number;
  /** Changes (write, zero, discard) in progress, and the gate quiesce() closes to hold new ones. */
  changesInFlight = 0;
  changesDrained: (() => void) | null = null;
  gate: Promise<void> | null = null;
  beforeChange: ((offset: number, length: number) => Promise<void>) | null = null;
  /** Copy-on-read fills in progress (§4.2 rule 3): close waits for them, and none starts once it began. */
  readonly fills = new Set<Promise<unknown>>();
  closing = false;
  /** Frozen (§4.1) and opened without force: data changes are refused. */
  refuseChanges = false;
  /** Opened as not cleanly closed (DIRTY, or a damaged header slot: §10 step 1). */
  openedDirty = false;
  openDamage: string[] = [];
  /** What the leak sweep at this open did (§8.1); null when it did not run (clean image or read-only). */
  sweep: { reclaimed: number; reclaimedPieces?: number; skipped: string | null } | null = null;
  /** A deferred leak sweep still running (§8.1, leak-sweep.ts); close waits for it. */
  sweepDone: Promise<void> | null = null;
  /** Set by a handover: a deferred sweep still running hands nothing over. */
  sweepCancelled = false;
  /** Set once a handover is being prepared (§9 rule 11): flushes clear no intent bit from then on. */
  keepIntent = false;

  constructor(
    readonly file: HostFile,
    public header: Header,
    slot: number,
    readonly readOnly: boolean,
    readonly map: MapTable,
    readonly alloc: Allocator,
    readonly intent: IntentLog,
    readonly bitmapSlots: (SparseBitmap | null)[],
    readonly bitmapsConsistent: boolean,
    public backingDev: BlockDevice | null,
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

  // ---------------------------------------------------------------- guards

  live(): void {
    if (this.closed) throw new KscError('KSC_E_CLOSED', `image ${this.name}: closed`);
  }

  writable(): void {
    this.live();
    if (this.readOnly) throw new KscError('KSC_E_READ_ONLY', `image ${this.name}: opened read-only`);
    if (this.broken) throw this.broken;
  }

  // ---------------------------------------------------------------- header

  /** Writes `h` with the next generation into the other header slot, synced (§5). */
  async writeHeader(h: Header): Promise<void> {
    const next = { ...h, generation: this.header.generation + 1, backingNameLength: Buffer.byteLength(h.backingName) };
    const target = 1 - this.currentSlot;
    await this.file.write(encodeHeader(next), HEADER_SLOTS[target]!);
    await this.file.sync();
    this.header = next;
    this.currentSlot = target;
  }

  // ---------------------------------------------------------------- blocks

  enabledBitmaps(): SparseBitmap[] {
    const out: SparseBitmap[] = [];
    for (const b of this.bitmapSlots) if (b && b.enabled) out.push(b);
    return out;
  }

  segments(offset: number, length: number): Seg[] {
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

  lockBlocks(offset: number, length: number, exclusive: boolean): Promise<() => void> {
    const b0 = Math.floor(offset / this.blockSize);
    const b1 = Math.floor((offset + Math.max(length, 1) - 1) / this.blockSize);
    return this.locks.acquire(b0, b1, exclusive);
  }

  // ---------------------------------------------------------------- the in-flight gate

  // A change waits while quiesce() holds the gate (`while (c.gate) await c.gate`, inline in the change so
  // that with the gate open it counts itself and queues for its block locks in the caller's synchronous
  // step: requests to one block keep their issue order), then counts itself in changesInFlight.

  /** Counts a change in flight out again (the last one out wakes a waiting quiesce). */
  leaveChange(): void {
    if (--this.changesInFlight === 0 && this.changesDrained) this.changesDrained();
  }

  /** Runs `fn` with no change in flight and new changes held until it finishes (reads continue). */
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

  // ---------------------------------------------------------------- space

  /** Frees metadata space nothing references any more: punched, or zeroed where the host cannot punch. */
  async punchRanges(ranges: { offset: number; length: number }[]): Promise<void> {
    for (const r of ranges) {
      await punchOrZero(this.file, r.offset, r.length);
      this.alloc.releaseMeta(r.offset, r.length);
    }
  }
}

/**
 * Punches [offset, offset+length) out of the file or, where the host cannot punch, writes zeros there: a
 * freed range must not keep old data that a metadata piece carved out of it, or check's leak scan (which
 * looks for non-zero pages), would meet again.
 */
export async function punchOrZero(file: HostFile, offset: number, length: number): Promise<void> {
  if (await file.punchHole(offset, length)) return;
  const zeros = Buffer.alloc(Math.min(length, 1 << 20));
  for (let o = 0; o < length; o += zeros.length) await file.write(zeros.subarray(0, Math.min(zeros.length, length - o)), offset + o);
}

/** Punches cluster offsets as runs of adjacent clusters (one call per run), see punchOrZero. */
export async function punchRuns(file: HostFile, clusters: number[], clusterSize: number): Promise<void> {
  const sorted = [...clusters].sort((a, b) => a - b);
  for (let i = 0; i < sorted.length;) {
    let j = i + 1;
    while (j < sorted.length && sorted[j] === sorted[j - 1]! + clusterSize) j++;
    await punchOrZero(file, sorted[i]!, (j - i) * clusterSize);
    i = j;
  }
}
