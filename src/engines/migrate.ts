/**
 * Live migration of a served image (formats/migrate.md §3–§4): a first pass of what lies above the shared
 * base, then rounds of what the migration bitmap marked meanwhile, then on request the switch-over with new
 * changes held. Invariants: the migration bitmap exists (enabled) before the first pass decides what to send,
 * and every round takes its bits with no change in flight (quiesce), so a change is always either in the
 * bitmap or already read by a send that follows it; the source image is never written (only its bitmaps);
 * until the switch-over succeeded, a failure or a cancel only removes the migration's bitmaps.
 */
import { KscError, isKscError, type KscErrorCode } from '../errors.js';
import { bitmapsOf, changeGateOf, type ChangeGate, type DirtyBitmaps } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import { baseOf } from './migrate-base.js';
import { Sender, type MigrationTarget } from './migrate-send.js';
import type { SeedInfo } from './migrate-seed.js';

export const MIGRATE_BITMAP = 'kscinc-migrate';
export const MIGRATE_FROZEN = 'kscinc-migrate~frozen';
const GRANULARITY = 64 * 1024;
/** The pause goal the convergence test aims at (formats/migrate.md §3). */
const PAUSE_GOAL_MS = 100;
/** Converged: what is left fits in this many bytes at least. */
const MIN_CONVERGED = 1024 * 1024;
/** A converged migration's rounds come at least this often. */
const IDLE_ROUND_MS = 50;

export type MigratePhase = 'copying' | 'converged' | 'completing' | 'completed' | 'failed' | 'cancelled';

export interface MigrateStatus {
  phase: MigratePhase;
  to: string;
  startedAt: string;
  size: number;
  firstPassBytes: number;
  bytesSent: number;
  bytesZeroed: number;
  bytesLeft: number;
  rounds: number;
  throughputBps: number;
  dirtyRateBps: number;
  estimatedPauseMs: number;
  pauseMs: number | null;
  error: { code: KscErrorCode; message: string } | null;
  warning: string | null;
  /** A seeded destination (formats/migrate.md §9.3); absent otherwise. */
  seed?: SeedInfo;
}

export interface MigrateOptions {
  /** The destination's URI, for status and messages. */
  to: string;
  bandwidth?: number;
  log?: (line: string) => void;
  /** A seeded destination (formats/migrate.md §9): the first pass instead of what lies above the base, and what status shows. */
  seed?: { firstPass: () => Promise<{ offset: number; length: number; zero: boolean }[]>; info: SeedInfo };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Sum of extent lengths. */
const bytesOf = (list: { length: number }[]): number => list.reduce((s, e) => s + e.length, 0);

export class Migration {
  phase: MigratePhase = 'copying';
  private readonly startedAt = new Date();
  private readonly sender: Sender;
  private firstPassBytes = 0;
  private firstPassLeft = 0;
  private dirtyBytes = 0;
  private rounds = 0;
  private rate = 0;
  private dirtyRate = 0;
  private pauseMs: number | null = null;
  private error: KscError | null = null;
  private warning: string | null = null;
  /** complete() or cancel() asked the copy loop to stop at the next round boundary. */
  private stopAsked: 'complete' | 'cancel' | null = null;
  private loop: Promise<void> = Promise.resolve();
  private readonly log: (line: string) => void;

  private constructor(
    private readonly dev: BlockDevice,
    private readonly bitmaps: DirtyBitmaps,
    private readonly gate: ChangeGate,
    private readonly target: MigrationTarget,
    private readonly opts: MigrateOptions,
  ) {
    this.sender = new Sender(dev, target, opts.bandwidth);
    this.log = opts.log ?? (() => undefined);
  }

  /**
   * Starts migrating `dev` to `target` (whose size and base were checked by the caller): creates the
   * migration bitmap with no change in flight, lists what lies above the base, and starts the copy in the
   * background. KSC_E_INVALID for a device that keeps no bitmaps or cannot hold changes.
   */
  static async start(dev: BlockDevice, target: MigrationTarget, opts: MigrateOptions): Promise<Migration> {
    const bitmaps = bitmapsOf(dev);
    const gate = changeGateOf(dev);
    if (!bitmaps || !gate || dev.readOnly) throw new KscError('KSC_E_INVALID', `${dev.name}: only a writable ksc_inc image can be migrated live (it needs a dirty bitmap and a change gate)`);
    if (target.size !== dev.size) throw new KscError('KSC_E_INVALID', `${opts.to} is ${target.size} bytes, ${dev.name} is ${dev.size}: the sizes must be equal`);
    const m = new Migration(dev, bitmaps, gate, target, opts);
    await gate.quiesce(async () => {
      await m.removeBitmaps();
      await bitmaps.addBitmap(MIGRATE_BITMAP, { granularity: Math.max(GRANULARITY, dev.blockSize), enabled: true });
    });
    let plan: { offset: number; length: number; zero: boolean }[];
    try {
      plan = await m.firstPassPlan();
    } catch (e) {
      await m.removeBitmaps().catch(() => undefined);
      throw e;
    }
    m.firstPassBytes = m.firstPassLeft = bytesOf(plan);
    m.log(`kscinc migrate: ${dev.name} to ${opts.to}: first pass of ${m.firstPassBytes} bytes above the base`);
    m.loop = m.run(plan);
    return m;
  }

  /** The ranges above the base: data as WRITE, known zeros as WRITE_ZEROES. */
  private async firstPassPlan(): Promise<{ offset: number; length: number; zero: boolean }[]> {
    if (this.opts.seed) return this.opts.seed.firstPass();
    const baseDepth = baseOf(this.dev)?.depth ?? Infinity;
    const exts = await this.dev.extents(0, this.dev.size);
    return exts.filter((e) => e.state !== 'unallocated' && e.depth !== null && e.depth < baseDepth).map((e) => ({ offset: e.offset, length: e.length, zero: e.state === 'zero' }));
  }

  status(): MigrateStatus {
    const left = this.firstPassLeft + this.dirtyBytes;
    const rate = Math.max(this.sender.throughput(), this.rate);
    return {
      phase: this.phase,
      to: this.opts.to,
      startedAt: this.startedAt.toISOString(),
      size: this.dev.size,
      firstPassBytes: this.firstPassBytes,
      bytesSent: this.sender.bytesSent,
      bytesZeroed: this.sender.bytesZeroed,
      bytesLeft: left,
      rounds: this.rounds,
      throughputBps: rate,
      dirtyRateBps: this.dirtyRate,
      estimatedPauseMs: rate > 0 ? Math.round((left * 1000) / rate) : left > 0 ? -1 : 0,
      pauseMs: this.pauseMs,
      error: this.error ? { code: this.error.code, message: this.error.message } : null,
      warning: this.warning,
      ...(this.opts.seed ? { seed: this.opts.seed.info } : {}),
    };
  }

  /** Copying or converged: the copy loop runs. */
  get active(): boolean {
    return this.phase === 'copying' || this.phase === 'converged' || this.phase === 'completing';
  }

  private async run(plan: { offset: number; length: number; zero: boolean }[]): Promise<void> {
    try {
      for (const r of plan) {
        if (this.stopAsked === 'cancel') return;
        await this.sender.send(r.offset, r.length, r.zero);
        this.firstPassLeft -= r.length;
      }
      await this.sender.drain();
      this.firstPassLeft = 0;
      while (!this.stopAsked) {
        const t = performance.now();
        const sent = await this.round();
        this.rate = Math.round(Math.max(this.sender.throughput(), this.rate * 0.9));
        this.dirtyBytes = bytesOf(await this.bitmaps.bitmapExtents(MIGRATE_BITMAP));
        this.dirtyRate = Math.round((this.dirtyBytes * 1000) / Math.max(1, performance.now() - t));
        const goal = Math.max(MIN_CONVERGED, (this.rate * PAUSE_GOAL_MS) / 1000);
        if (this.phase === 'copying' && this.dirtyBytes <= goal) this.phase = 'converged';
        else if (this.phase === 'converged' && this.dirtyBytes > 2 * goal) this.phase = 'copying';
        if (sent === 0) await sleep(IDLE_ROUND_MS);
      }
    } catch (e) {
      await this.fail(e);
    }
  }

  /** One round: take the bits with no change in flight, send those granules, drop the frozen bitmap. Returns the bytes. */
  private async round(): Promise<number> {
    if (bytesOf(await this.bitmaps.bitmapExtents(MIGRATE_BITMAP)) === 0) return 0;
    await this.gate.quiesce(() => this.bitmaps.freezeBitmap(MIGRATE_BITMAP, MIGRATE_FROZEN));
    try {
      const dirty = await this.bitmaps.bitmapExtents(MIGRATE_FROZEN);
      for (const d of dirty) await this.sender.send(d.offset, Math.min(d.length, this.dev.size - d.offset));
      await this.sender.drain();
      await this.bitmaps.removeBitmap(MIGRATE_FROZEN);
      this.rounds++;
      return bytesOf(dirty);
    } catch (e) {
      await this.mergeBack();
      throw e;
    }
  }

  /** The frozen bits back into the migration bitmap (a round that failed). */
  private async mergeBack(): Promise<void> {
    if (!this.bitmaps.hasBitmap(MIGRATE_FROZEN)) return;
    if (this.bitmaps.hasBitmap(MIGRATE_BITMAP)) await this.bitmaps.mergeBitmap(MIGRATE_FROZEN, MIGRATE_BITMAP);
    await this.bitmaps.removeBitmap(MIGRATE_FROZEN);
  }

  private async removeBitmaps(): Promise<void> {
    for (const b of [MIGRATE_FROZEN, MIGRATE_BITMAP]) if (this.bitmaps.hasBitmap(b)) await this.bitmaps.removeBitmap(b);
  }

  private async fail(e: unknown): Promise<void> {
    if (this.phase === 'failed' || this.phase === 'cancelled' || this.phase === 'completed') return;
    this.error = isKscError(e) ? e : new KscError('KSC_E_IO', (e as Error).message, { cause: e });
    this.phase = 'failed';
    this.log(`kscinc migrate: ${this.dev.name} to ${this.opts.to} failed: ${this.error.message}; the source goes on serving`);
    this.target.destroy();
    await this.removeBitmaps().catch((x: unknown) => this.log(`kscinc migrate: removing the migration bitmaps failed: ${(x as Error).message}`));
  }

  /** One complete or cancel at a time: a second one while the first waits for the round to end is refused. */
  private refuseSecondStop(): void {
    if (this.stopAsked) throw new KscError('KSC_E_LOCKED', `a ${this.stopAsked} of the migration of ${this.dev.name} is already under way`);
  }

  /** Stops copying, removes the migration bitmaps, disconnects. KSC_E_INVALID unless copying or converged. */
  async cancel(): Promise<MigrateStatus> {
    if (this.phase !== 'copying' && this.phase !== 'converged') throw new KscError('KSC_E_INVALID', `the migration of ${this.dev.name} is ${this.phase}: nothing to cancel`);
    this.refuseSecondStop();
    this.stopAsked = 'cancel';
    await this.loop;
    if ((this.phase as MigratePhase) === 'failed') return this.status();
    await this.sender.drain().catch(() => undefined);
    this.phase = 'cancelled';
    this.target.destroy();
    await this.removeBitmaps();
    this.log(`kscinc migrate: ${this.dev.name} to ${this.opts.to} cancelled; the source goes on serving`);
    return this.status();
  }

  /**
   * The switch-over (formats/migrate.md §4). Resolves with the status (phase completed, pauseMs); on a
   * failure the phase is `failed`, the held changes proceed on the source, and it rejects with the error.
   */
  async complete(): Promise<MigrateStatus> {
    if (this.phase !== 'copying' && this.phase !== 'converged') throw new KscError('KSC_E_INVALID', `the migration of ${this.dev.name} is ${this.phase}: it cannot be completed`);
    this.refuseSecondStop();
    this.stopAsked = 'complete';
    await this.loop;
    if ((this.phase as MigratePhase) === 'failed') throw this.error!;
    this.phase = 'completing';
    try {
      // While still serving: one more round, and a flush of everything sent so far, so that the pause below
      // has only the last blocks to send and make durable (a destination that fsyncs the whole first pass
      // inside the pause took ~0.5 s for 300 MB here).
      await this.round();
      await this.target.flush();
      await this.switchOver();
    } catch (e) {
      await this.fail(e);
      throw this.error!;
    }
    this.phase = 'completed';
    this.dirtyBytes = 0;
    await this.removeBitmaps().catch((e: unknown) => (this.warning = `removing the migration bitmaps failed: ${(e as Error).message}`));
    try {
      await this.target.complete();
      await this.target.close();
    } catch (e) {
      this.warning = `the destination was not told that the migration completed: ${(e as Error).message}`;
      this.target.destroy();
    }
    this.log(`kscinc migrate: ${this.dev.name} moved to ${this.opts.to}: pause ${this.pauseMs} ms; the source now refuses writes`);
    return this.status();
  }

  /** Steps 2–6: hold changes, send the rest, flush the destination, refuse later changes, let go. */
  private async switchOver(): Promise<void> {
    const t0 = performance.now();
    await this.gate.quiesce(async () => {
      const dirty = await this.bitmaps.bitmapExtents(MIGRATE_BITMAP);
      for (const d of dirty) await this.sender.send(d.offset, Math.min(d.length, this.dev.size - d.offset));
      await this.sender.drain();
      await this.target.flush();
      const name = this.dev.name;
      const to = this.opts.to;
      this.gate.setBeforeChange(() => Promise.reject(new KscError('KSC_E_READ_ONLY', `image ${name} was migrated to ${to}: the source takes no more writes`)));
      this.pauseMs = Math.round((performance.now() - t0) * 10) / 10;
    });
  }
}
