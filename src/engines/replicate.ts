/**
 * Continuous replication of a served image (formats/migrate.md §11): cycles of the migration's machinery
 * (first pass, rounds, the persistent `kscinc-migrate` state and its resume cursor) without a switch-over.
 * Each cycle ends with a *fence*: inside the image's quiesce (new changes held, never failed) the last bits
 * are frozen and sent, so that once the destination acknowledged them and, after the fence, a FLUSH, the
 * replica is the source as it was at that instant (the consistent point). Only then is the point recorded
 * and the round's frozen bits dropped. The source image is never written except for its bitmaps and records;
 * a failed cycle keeps the state for the next one (§10 rule 3).
 */
import { KscError, isKscError, type KscErrorCode } from '../errors.js';
import { bitmapsOf, changeGateOf, type ChangeGate, type DirtyBitmaps } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import { migrateKillPoint } from '../util/killpoint.js';
import { baseOf } from './migrate-base.js';
import { checkpoint, fromCursor, sendPass, type PassContext, type Range } from './migrate-pass.js';
import { Sender, type MigrationTarget } from './migrate-send.js';
import { MIGRATE_BITMAP, MIGRATE_FROZEN, removeState, resumable, setProgress, type Progress } from './migrate-state.js';
import { CYCLE_BITS, consistentPoint, mergeCycleBits, recordConsistent, removeConsistent } from './replicate-state.js';

const GRANULARITY = 64 * 1024;
/** Rounds while writing before the fence, at most (§11.2 step 3). */
export const MAX_ROUNDS = 8;
/** The fence goal: what is left may be sent in this long at the measured throughput (§3's pause goal)… */
const FENCE_GOAL_MS = 100;
/** …and at least this many bytes. */
const MIN_FENCE_BYTES = 1024 * 1024;
/** `--every` bounds (§11.3). */
export const MIN_EVERY_MS = 1000;
export const MAX_EVERY_MS = 7 * 86_400_000;

export type ReplicateState = 'running' | 'stopping' | 'stopped';

/** A destination that may keep a cycle apart until it is committed (formats/migrate.md §11.7: src/nbd/migrate-target.ts). */
export interface ReplicaTarget extends MigrationTarget {
  staged?: boolean;
  beginCycle?(): Promise<void>;
  commitCycle?(): Promise<void>;
}

export interface CycleReport {
  startedAt: string;
  endedAt: string;
  firstPass: boolean;
  resumed: boolean;
  bytesSent: number;
  bytesZeroed: number;
  rounds: number;
  fenceMs: number | null;
  consistentAt: string | null;
  /** The cycle went to the destination's cycle log and was committed there at once (formats/migrate.md §11.7). */
  staged: boolean;
  error: { code: KscErrorCode; message: string } | null;
}

export interface ReplicateStatus {
  state: ReplicateState;
  to: string;
  everyMs: number | null;
  startedAt: string;
  cycles: number;
  inCycle: boolean;
  lastConsistentAt: string | null;
  lagMs: number | null;
  nextCycleAt: string | null;
  bytesSent: number;
  bytesZeroed: number;
  lastCycle: CycleReport | null;
  error: { code: KscErrorCode; message: string } | null;
}

export interface ReplicateOptions {
  /** The destination's URI, for status and messages. */
  to: string;
  /** The period between cycle starts; null: one cycle (`--once`). */
  everyMs: number | null;
  bandwidth?: number;
  /** Connects to the destination (a new set of connections per cycle), its size and base checked. */
  connect: () => Promise<ReplicaTarget>;
  log?: (line: string) => void;
  /** The server's clock (tests may pass another). */
  now?: () => number;
}

const bytesOf = (list: { length: number }[]): number => list.reduce((s, e) => s + e.length, 0);
const iso = (t: number | null): string | null => (t === null ? null : new Date(t).toISOString());
const asKsc = (e: unknown): KscError => (isKscError(e) ? e : new KscError('KSC_E_IO', (e as Error).message, { cause: e }));

/** What one cycle learnt, kept for the next: the destination it went to and whether its state is set up. */
interface Known {
  id: string | null;
  /** A cycle of this run completed the first pass to this destination. */
  ready: boolean;
}

export class Replication {
  state: ReplicateState = 'running';
  private readonly startedAt: number;
  private cycles = 0;
  private inCycle = false;
  private lastConsistent: number | null = null;
  private nextAt: number | null = null;
  private bytesSent = 0;
  private bytesZeroed = 0;
  private last: CycleReport | null = null;
  private known: Known | null = null;
  /** The running cycle's sender (its bytes count in status while it runs). */
  private sender: Sender | null = null;
  private loop: Promise<void> = Promise.resolve();
  private wake: (() => void) | null = null;
  private readonly now: () => number;
  private readonly log: (line: string) => void;

  private constructor(
    private readonly dev: BlockDevice,
    private readonly bitmaps: DirtyBitmaps,
    private readonly gate: ChangeGate,
    private readonly opts: ReplicateOptions,
  ) {
    this.now = opts.now ?? Date.now;
    this.log = opts.log ?? (() => undefined);
    this.startedAt = this.now();
  }

  private static make(dev: BlockDevice, opts: ReplicateOptions): Replication {
    const bitmaps = bitmapsOf(dev);
    const gate = changeGateOf(dev);
    if (!bitmaps || !gate || dev.readOnly) throw new KscError('KSC_E_INVALID', `${dev.name}: only a writable ksc_inc image can be replicated (it needs a dirty bitmap and a change gate)`);
    if (opts.everyMs !== null && !(Number.isSafeInteger(opts.everyMs) && opts.everyMs >= MIN_EVERY_MS && opts.everyMs <= MAX_EVERY_MS)) {
      throw new KscError('KSC_E_INVALID', `option every: ${opts.everyMs} ms is not between ${MIN_EVERY_MS} ms and 7 days`);
    }
    return new Replication(dev, bitmaps, gate, opts);
  }

  /**
   * Starts cycles on the timer, the first at once; resolves once the first cycle reached the destination
   * and decided what to send (status: inCycle). A first cycle failing before that (unreachable, refused
   * token, other base, a destination it cannot resume) rejects with its error and stops the timer.
   */
  static async start(dev: BlockDevice, opts: ReplicateOptions): Promise<Replication> {
    const r = Replication.make(dev, opts);
    r.inCycle = true;
    const started = new Promise<void>((resolve, reject) => (r.started = { resolve, reject }));
    r.loop = r.run();
    try {
      await started;
    } catch (e) {
      await r.stop();
      throw e;
    }
    return r;
  }

  /** The first cycle's start, for start(); null once settled. */
  private started: { resolve: () => void; reject: (e: unknown) => void } | null = null;

  /** Runs one cycle; resolves with the status, rejects with the cycle's error. */
  static async once(dev: BlockDevice, opts: Omit<ReplicateOptions, 'everyMs'>): Promise<ReplicateStatus> {
    const r = Replication.make(dev, { ...opts, everyMs: null });
    await r.cycle();
    r.state = 'stopped';
    const s = r.status();
    if (s.lastCycle?.error) throw new KscError(s.lastCycle.error.code, s.lastCycle.error.message);
    return s;
  }

  /** Still on its timer (not stopped). */
  get running(): boolean {
    return this.state !== 'stopped';
  }

  status(): ReplicateStatus {
    const now = this.now();
    return {
      state: this.state,
      to: this.opts.to,
      everyMs: this.opts.everyMs,
      startedAt: iso(this.startedAt)!,
      cycles: this.cycles,
      inCycle: this.inCycle,
      lastConsistentAt: iso(this.lastConsistent),
      lagMs: this.lastConsistent === null ? null : Math.max(0, now - this.lastConsistent),
      nextCycleAt: this.state === 'running' ? iso(this.nextAt) : null,
      bytesSent: this.bytesSent + (this.sender?.bytesSent ?? 0),
      bytesZeroed: this.bytesZeroed + (this.sender?.bytesZeroed ?? 0),
      lastCycle: this.last,
      error: this.last?.error ?? null,
    };
  }

  /** Waits for a running cycle to end (never cut mid-way: §11.2 rule 4), stops the timer; `drop` removes the state. */
  async stop(drop = false): Promise<ReplicateStatus> {
    if (this.state === 'running') this.state = 'stopping';
    this.wake?.();
    await this.loop;
    this.state = 'stopped';
    if (drop) {
      // The record first (nothing resumable is left with bits missing), then the bits, then the consistent points.
      await removeState(this.bitmaps, 'replicate-drop');
      if (this.bitmaps.hasBitmap(CYCLE_BITS)) {
        await this.bitmaps.removeBitmap(CYCLE_BITS);
        migrateKillPoint('replicate-drop-cycle-removed');
      }
      await removeConsistent(this.bitmaps);
      migrateKillPoint('replicate-drop-consistent-removed');
      this.known = null;
    }
    if (this.cycles > 0 || drop) this.log(`kscinc replicate: ${this.dev.name} to ${this.opts.to} stopped${drop ? '; its state removed' : '; a later replicate start resumes'}`);
    return this.status();
  }

  private async run(): Promise<void> {
    const every = this.opts.everyMs!;
    while (this.state === 'running') {
      const t = this.now();
      this.nextAt = null;
      await this.cycle();
      if (this.state !== 'running') break;
      this.nextAt = t + every;
      const wait = Math.max(0, this.nextAt - this.now());
      await new Promise<void>((res) => {
        const timer = setTimeout(res, wait);
        this.wake = () => {
          clearTimeout(timer);
          res();
        };
      });
      this.wake = null;
    }
  }

  /** One cycle (§11.2); records its report; never throws. */
  private async cycle(): Promise<void> {
    this.inCycle = true;
    const report: CycleReport = {
      startedAt: iso(this.now())!,
      endedAt: '',
      firstPass: false,
      resumed: false,
      bytesSent: 0,
      bytesZeroed: 0,
      rounds: 0,
      fenceMs: null,
      consistentAt: null,
      staged: false,
      error: null,
    };
    let target: ReplicaTarget | null = null;
    let sender: Sender | null = null;
    try {
      target = await this.opts.connect();
      sender = this.sender = new Sender(this.dev, target, this.opts.bandwidth);
      await this.cycleOn(target, sender, report);
      await target.close().catch(() => target!.destroy());
      this.cycles++;
    } catch (e) {
      const err = asKsc(e);
      report.error = { code: err.code, message: err.message };
      if (this.started) {
        this.started.reject(err);
        this.started = null;
        this.state = 'stopping';
      }
      target?.destroy();
      this.log(`kscinc replicate: ${this.dev.name} to ${this.opts.to}: cycle failed: ${err.message}; the source goes on serving${this.opts.everyMs ? '; the next cycle retries' : ''}`);
    } finally {
      report.bytesSent = sender?.bytesSent ?? 0;
      report.bytesZeroed = sender?.bytesZeroed ?? 0;
      this.bytesSent += report.bytesSent;
      this.bytesZeroed += report.bytesZeroed;
      report.endedAt = iso(this.now())!;
      this.last = report;
      this.sender = null;
      this.inCycle = false;
    }
  }

  private async cycleOn(target: ReplicaTarget, sender: Sender, report: CycleReport): Promise<void> {
    const id = target.incoming?.id ?? null;
    const from = await this.gate.quiesce(() => this.decide(target, report));
    this.started?.resolve();
    this.started = null;
    migrateKillPoint('replicate-decided');
    const ctx: PassContext = { sender, target, bitmaps: this.bitmaps, id, stopped: () => false };
    if (from.stage === 'f') {
      report.firstPass = true;
      const plan = fromCursor(await this.firstPassPlan(), from.cursor);
      await sendPass(ctx, 'f', plan);
      await checkpoint(ctx, 'r', 0);
    }
    this.known = { id, ready: true };
    // §11.7: once the destination has a consistent point, the cycle is kept apart there until its commit.
    if (!report.firstPass && id && target.staged && target.beginCycle && consistentPoint(this.bitmaps, id) !== null) {
      if (!this.bitmaps.hasBitmap(CYCLE_BITS)) await this.bitmaps.addBitmap(CYCLE_BITS, { granularity: this.bitmaps.bitmapInfo(MIGRATE_BITMAP)!.granularity, enabled: false });
      await target.beginCycle();
      report.staged = true;
      migrateKillPoint('replicate-begun');
    }
    const goal = (): number => Math.max(MIN_FENCE_BYTES, (sender.throughput() * FENCE_GOAL_MS) / 1000);
    while (report.rounds < MAX_ROUNDS && bytesOf(await this.bitmaps.bitmapExtents(MIGRATE_BITMAP)) > goal()) {
      await this.round(ctx, false, report, target);
      report.rounds++;
    }
    await this.round(ctx, true, report, target);
    this.log(`kscinc replicate: ${this.dev.name} to ${this.opts.to}: replica consistent at ${report.consistentAt} (fence ${report.fenceMs} ms, ${sender.bytesSent} bytes sent)`);
  }

  /**
   * Inside quiesce (§11.2 step 1): go on with this run's state, resume the image's when it names this
   * destination, else start over (KSC_E_INVALID for a written destination that cannot be resumed). Bits a
   * failed round left frozen go back into the migration bitmap first (a superset: sent again).
   */
  private async decide(target: MigrationTarget, report: CycleReport): Promise<Progress> {
    const dest = target.incoming ?? null;
    const id = dest?.id ?? null;
    const hasState = this.bitmaps.hasBitmap(MIGRATE_BITMAP);
    const prev = resumable(this.bitmaps);
    let from: Progress | null = null;
    if (hasState && this.known?.ready && this.known.id === id && !id) from = { id: '', stage: 'r', cursor: 0 };
    else if (hasState && prev && id && prev.id === id) {
      from = prev;
      if (!this.known) {
        report.resumed = true;
        this.lastConsistent ??= consistentPoint(this.bitmaps, id);
      }
    }
    if (from) {
      await mergeCycleBits(this.bitmaps, MIGRATE_BITMAP); // a staged cycle that did not commit (§11.7)
      if (this.bitmaps.hasBitmap(MIGRATE_FROZEN)) {
        await this.bitmaps.mergeBitmap(MIGRATE_FROZEN, MIGRATE_BITMAP);
        await this.bitmaps.removeBitmap(MIGRATE_FROZEN);
      }
      return from;
    }
    if (dest && !dest.empty) {
      throw new KscError(
        'KSC_E_INVALID',
        `${this.opts.to} already holds blocks that ${this.dev.name} cannot account for (its replication state names ${prev ? `destination ${prev.id}` : 'no destination'}, the destination is ${dest.id}): recreate the destination image and serve it again as an incoming migration target`,
      );
    }
    await removeState(this.bitmaps, 'replicate-restart');
    if (this.bitmaps.hasBitmap(CYCLE_BITS)) await this.bitmaps.removeBitmap(CYCLE_BITS);
    await removeConsistent(this.bitmaps);
    await this.bitmaps.addBitmap(MIGRATE_BITMAP, { granularity: Math.max(GRANULARITY, this.dev.blockSize), enabled: true });
    const fresh: Progress = { id: id ?? '', stage: 'f', cursor: 0 };
    if (id) await setProgress(this.bitmaps, fresh);
    this.known = { id, ready: false };
    return fresh;
  }

  /** The ranges above the base (§3 step 1): data as WRITE, known zeros as WRITE_ZEROES. */
  private async firstPassPlan(): Promise<Range[]> {
    const baseDepth = baseOf(this.dev)?.depth ?? Infinity;
    const exts = await this.dev.extents(0, this.dev.size);
    return exts.filter((e) => e.state !== 'unallocated' && e.depth !== null && e.depth < baseDepth).map((e) => ({ offset: e.offset, length: e.length, zero: e.state === 'zero' }));
  }

  /**
   * One round (§11.2 step 3), or the fence (step 4–6): the bits frozen with no change in flight, sent (inside
   * quiesce for the fence), acknowledged, FLUSHed at the destination; then the consistent point recorded
   * (fence), then the frozen bits dropped.
   */
  private async round(ctx: PassContext, fence: boolean, report: CycleReport, target: ReplicaTarget): Promise<void> {
    if (ctx.id) await setProgress(this.bitmaps, { id: ctx.id, stage: 'r', cursor: 0 });
    const frozenRanges = async (): Promise<Range[]> => (await this.bitmaps.bitmapExtents(MIGRATE_FROZEN)).map((d) => ({ offset: d.offset, length: Math.min(d.length, this.dev.size - d.offset) }));
    let at = 0;
    if (fence) {
      const t0 = performance.now();
      await this.gate.quiesce(async () => {
        await this.bitmaps.freezeBitmap(MIGRATE_BITMAP, MIGRATE_FROZEN);
        at = this.now();
        migrateKillPoint('replicate-fenced');
        // No checkpoint inside the hold (id null): the fence's bits are few, and a crash merges them back.
        await sendPass({ ...ctx, id: null }, 'r', await frozenRanges());
        await ctx.sender.drain();
      });
      report.fenceMs = Math.round((performance.now() - t0) * 10) / 10;
    } else {
      await this.gate.quiesce(() => this.bitmaps.freezeBitmap(MIGRATE_BITMAP, MIGRATE_FROZEN));
      await sendPass(ctx, 'r', await frozenRanges());
      await ctx.sender.drain();
    }
    await ctx.target.flush();
    migrateKillPoint(fence ? 'replicate-flushed' : 'replicate-round-flushed');
    // §11.7: a staged cycle's bits are kept until its commit (the destination discards a cycle it did not commit).
    if (report.staged) await this.bitmaps.mergeBitmap(MIGRATE_FROZEN, CYCLE_BITS);
    if (fence && report.staged) {
      await target.commitCycle!();
      migrateKillPoint('replicate-committed');
    }
    if (fence) {
      await recordConsistent(this.bitmaps, ctx.id, at);
      this.lastConsistent = at;
      report.consistentAt = iso(at);
    }
    await this.bitmaps.removeBitmap(MIGRATE_FROZEN);
    if (fence && report.staged) await this.bitmaps.removeBitmap(CYCLE_BITS);
  }
}
