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
import { migrateKillPoint } from '../util/killpoint.js';
import { baseOf } from './migrate-base.js';
import { Sender, type MigrationTarget } from './migrate-send.js';
import { MIGRATE_BITMAP, MIGRATE_FROZEN, removeState, resumable, setProgress, type Progress } from './migrate-state.js';
import { checkpoint, fromCursor, sendPass, type PassContext, type Range } from './migrate-pass.js';
import type { SeedInfo } from './migrate-seed.js';

export { MIGRATE_BITMAP, MIGRATE_FROZEN } from './migrate-state.js';
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
  /** Bytes put on the wire (request headers and payloads), and whether pieces go compressed (formats/migrate.md §12). */
  wireBytes: number;
  compressed: boolean;
  bytesLeft: number;
  rounds: number;
  throughputBps: number;
  dirtyRateBps: number;
  estimatedPauseMs: number;
  pauseMs: number | null;
  error: { code: KscErrorCode; message: string } | null;
  warning: string | null;
  /** This run continued an earlier one's persistent state (§10) instead of starting over. */
  resumed: boolean;
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
  /** The destination's incoming id: the cursor is recorded (§10); null for a destination without one. */
  private id: string | null = null;
  private resumed = false;

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
    const prev = await gate.quiesce(() => m.prepareState());
    migrateKillPoint('started');
    let plan: Range[] = [];
    try {
      if (prev.stage === 'f') plan = fromCursor(await m.firstPassPlan(), prev.cursor);
    } catch (e) {
      await m.dropState('fail').catch(() => undefined);
      throw e;
    }
    m.firstPassBytes = m.firstPassLeft = bytesOf(plan);
    m.log(
      `kscinc migrate: ${dev.name} to ${opts.to}: ${m.resumed ? `resumed (${prev.stage === 'f' ? 'first pass' : 'round'} from offset ${prev.cursor})` : 'started'}; first pass of ${m.firstPassBytes} bytes above the base`,
    );
    m.loop = m.run(plan, prev);
    return m;
  }

  /**
   * Inside quiesce: resume the image's persistent state when it names this destination (§10), else start over
   * (KSC_E_INVALID when the destination holds a partial copy it cannot resume). Returns where to go on from.
   */
  private async prepareState(): Promise<Progress> {
    const dest = this.target.incoming ?? null;
    const prev = resumable(this.bitmaps);
    this.id = dest?.id ?? null;
    if (prev && dest && prev.id === dest.id) {
      this.resumed = true;
      return prev;
    }
    // A seeded destination (§9) is empty while it holds exactly its backup (§10.4): once written, only a resume may go there.
    if (dest && !dest.empty) {
      throw new KscError(
        'KSC_E_INVALID',
        `${this.opts.to} already holds blocks of a migration that ${this.dev.name} cannot resume (its state names ${prev ? `destination ${prev.id}` : 'no destination'}, the destination is ${dest.id}): recreate the destination image and serve it again as an incoming migration target`,
      );
    }
    await removeState(this.bitmaps, 'restart');
    await this.bitmaps.addBitmap(MIGRATE_BITMAP, { granularity: Math.max(GRANULARITY, this.dev.blockSize), enabled: true });
    const fresh: Progress = { id: dest?.id ?? '', stage: 'f', cursor: 0 };
    if (this.id) await setProgress(this.bitmaps, fresh);
    return fresh;
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
      wireBytes: this.sender.wireBytes,
      compressed: this.sender.compressed,
      bytesLeft: left,
      rounds: this.rounds,
      throughputBps: rate,
      dirtyRateBps: this.dirtyRate,
      estimatedPauseMs: rate > 0 ? Math.round((left * 1000) / rate) : left > 0 ? -1 : 0,
      pauseMs: this.pauseMs,
      error: this.error ? { code: this.error.code, message: this.error.message } : null,
      warning: this.warning,
      resumed: this.resumed,
      ...(this.opts.seed ? { seed: this.opts.seed.info } : {}),
    };
  }

  /** Copying or converged: the copy loop runs. */
  get active(): boolean {
    return this.phase === 'copying' || this.phase === 'converged' || this.phase === 'completing';
  }

  private passContext(): PassContext {
    return {
      sender: this.sender,
      target: this.target,
      bitmaps: this.bitmaps,
      id: this.id,
      stopped: () => this.stopAsked === 'cancel',
      onQueued: (n) => (this.firstPassLeft = Math.max(0, this.firstPassLeft - n)),
    };
  }

  /** The first pass (or the rest of an interrupted round, when resuming one), then rounds until stopped. */
  private async run(plan: Range[], from: Progress): Promise<void> {
    try {
      if (from.stage === 'f') {
        if (!(await sendPass(this.passContext(), 'f', plan))) return;
        // The first pass durable at the destination before the record leaves stage f (§10).
        await checkpoint(this.passContext(), 'r', 0);
      } else if (this.bitmaps.hasBitmap(MIGRATE_FROZEN)) {
        if (!(await this.sendFrozen(from.cursor))) return;
      }
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
    // §10: the cursor back to 0 before the new frozen bits exist.
    if (this.id) await setProgress(this.bitmaps, { id: this.id, stage: 'r', cursor: 0 });
    await this.gate.quiesce(() => this.bitmaps.freezeBitmap(MIGRATE_BITMAP, MIGRATE_FROZEN));
    migrateKillPoint('round-frozen');
    const sent = await this.sendFrozen(0);
    if (sent) this.rounds++;
    return sent ? this.sentInRound : 0;
  }

  private sentInRound = 0;

  /** Sends the frozen bits from `cursor` on, FLUSHes the destination, then drops them (kill point `round-sent` between). False when cancelled. */
  private async sendFrozen(cursor: number): Promise<boolean> {
    const dirty = fromCursor(await this.bitmaps.bitmapExtents(MIGRATE_FROZEN), cursor).map((d) => ({ offset: d.offset, length: Math.min(d.length, this.dev.size - d.offset) }));
    this.sentInRound = bytesOf(dirty);
    if (!(await sendPass({ ...this.passContext(), onQueued: undefined }, 'r', dirty))) return false;
    await this.sender.drain();
    // §10 rule 2: the bits go only once the destination made their blocks durable (acknowledged is not
    // durable: a destination host that loses power would keep them unsent on a resume).
    await this.target.flush();
    migrateKillPoint('round-sent');
    await this.bitmaps.removeBitmap(MIGRATE_FROZEN);
    return true;
  }

  /** Removes the migration's state from the image (§10: the record first), logging rather than throwing for a failure. */
  private async dropState(why: string): Promise<void> {
    await removeState(this.bitmaps, why);
  }

  /**
   * A failure: the source goes on serving. The state stays for a rerun to resume (§10) when the destination
   * has an id; without one nothing could resume it, so it goes.
   */
  private async fail(e: unknown): Promise<void> {
    if (this.phase === 'failed' || this.phase === 'cancelled' || this.phase === 'completed') return;
    this.error = isKscError(e) ? e : new KscError('KSC_E_IO', (e as Error).message, { cause: e });
    this.phase = 'failed';
    this.log(`kscinc migrate: ${this.dev.name} to ${this.opts.to} failed: ${this.error.message}; the source goes on serving${this.id ? '; a rerun of migrate start resumes' : ''}`);
    this.target.destroy();
    if (!this.id) await this.dropState('fail').catch((x: unknown) => this.log(`kscinc migrate: removing the migration bitmaps failed: ${(x as Error).message}`));
  }

  /** One complete or cancel at a time: a second one while the first waits for the round to end is refused. */
  private refuseSecondStop(): void {
    if (this.stopAsked) throw new KscError('KSC_E_LOCKED', `a ${this.stopAsked} of the migration of ${this.dev.name} is already under way`);
  }

  /**
   * Stops copying, removes the migration's state, disconnects. A failed migration's kept state (§10) is
   * removed too. KSC_E_INVALID unless copying, converged or failed.
   */
  async cancel(): Promise<MigrateStatus> {
    if (this.phase === 'failed' && !this.stopAsked) {
      await this.dropState('cancel');
      this.phase = 'cancelled';
      return this.status();
    }
    if (this.phase !== 'copying' && this.phase !== 'converged') throw new KscError('KSC_E_INVALID', `the migration of ${this.dev.name} is ${this.phase}: nothing to cancel`);
    this.refuseSecondStop();
    this.stopAsked = 'cancel';
    await this.loop;
    if ((this.phase as MigratePhase) === 'failed') return this.status();
    await this.sender.drain().catch(() => undefined);
    migrateKillPoint('cancel-stopped');
    this.phase = 'cancelled';
    this.target.destroy();
    await this.dropState('cancel');
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
    migrateKillPoint('completing');
    try {
      // While still serving: one more round, and a flush of everything sent so far, so that the pause below
      // has only the last blocks to send and make durable (a destination that fsyncs the whole first pass
      // inside the pause took ~0.5 s for 300 MB here). A round that sent blocks has flushed already.
      if ((await this.round()) === 0) await this.target.flush();
      await this.switchOver();
    } catch (e) {
      await this.fail(e);
      throw this.error!;
    }
    migrateKillPoint('released');
    this.phase = 'completed';
    this.dirtyBytes = 0;
    try {
      await this.target.complete();
      await this.target.close();
    } catch (e) {
      this.warning = `the destination was not told that the migration completed: ${(e as Error).message}`;
      this.target.destroy();
    }
    migrateKillPoint('told');
    await this.dropState('complete').catch((e: unknown) => (this.warning = `removing the migration bitmaps failed: ${(e as Error).message}`));
    this.log(`kscinc migrate: ${this.dev.name} moved to ${this.opts.to}: pause ${this.pauseMs} ms; the source now refuses writes`);
    return this.status();
  }

  /** Steps 2–6: hold changes, send the rest, flush the destination, refuse later changes, let go. */
  private async switchOver(): Promise<void> {
    const t0 = performance.now();
    await this.gate.quiesce(async () => {
      const dirty = await this.bitmaps.bitmapExtents(MIGRATE_BITMAP);
      migrateKillPoint('held');
      for (const d of dirty) await this.sender.send(d.offset, Math.min(d.length, this.dev.size - d.offset));
      await this.sender.drain();
      migrateKillPoint('sent');
      // Step 4, and the source's own flush beside it: the stale copy left behind equals the destination.
      await Promise.all([this.target.flush(), this.dev.flush()]);
      migrateKillPoint('flushed');
      // Step 5: the flag durable before any held write is let go or the destination takes writes (§4).
      await this.gate.markMigratedAway();
      migrateKillPoint('flagged');
      const name = this.dev.name;
      const to = this.opts.to;
      this.gate.setBeforeChange(() => Promise.reject(new KscError('KSC_E_READ_ONLY', `image ${name} was migrated to ${to}: the source takes no more writes`)));
      this.pauseMs = Math.round((performance.now() - t0) * 10) / 10;
    });
  }
}
