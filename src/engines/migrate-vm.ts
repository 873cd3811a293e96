/**
 * The whole VM in one step (formats/migrate.md §8): the disk's migration (§3–§4, run by the source's server)
 * and QEMU's own migration of RAM and device state, tied together at QEMU's `pre-switchover` pause so that
 * the storage switch-over happens while the VM's CPUs are stopped and its block I/O is drained and flushed.
 *
 * The engine takes two interfaces and names no backend: StorageSide (the control operations of §6; the CLI
 * implements it over the control socket) and VmSide (QEMU's migration; src/qmp/vm-migration.ts implements
 * it over QMP). Invariant: until the storage switch-over succeeded, any failure (either side, a timeout, an
 * abort) cancels both, and the source VM runs on its source disk as before; once it succeeded the source
 * disk refuses writes for good, and nothing here lifts that (the VM may already run on the destination).
 */
import { KscError, isKscError } from '../errors.js';
import type { MigrateStatus } from './migrate.js';

/** The disk's migration, as the control operations of formats/migrate.md §6 offer it. */
export interface StorageSide {
  start(): Promise<MigrateStatus>;
  status(): Promise<MigrateStatus>;
  complete(): Promise<MigrateStatus>;
  cancel(): Promise<MigrateStatus>;
}

/** QEMU's migration state (query-migrate's `status`, and what matters of the rest). */
export interface VmMigrationState {
  status: string;
  error?: string;
  downtimeMs?: number;
  totalTimeMs?: number;
}

/** QEMU's side of the move. */
export interface VmSide {
  /** Checks that the VM runs and migrates nothing, turns `pause-before-switchover` on; returns the run state. */
  prepare(): Promise<string>;
  /** Starts the RAM migration to `uri` (e.g. tcp:H:P, where the destination QEMU waits with -incoming). */
  start(uri: string): Promise<void>;
  state(): Promise<VmMigrationState>;
  /** Leaves `pre-switchover`: QEMU sends the device state; the destination VM then runs. */
  continue(): Promise<void>;
  /** Cancels the RAM migration; QEMU resumes the source VM if it ran before. */
  cancel(): Promise<void>;
  /** The VM's run state (query-status), e.g. `running`. */
  runState(): Promise<string>;
  /** Turns `pause-before-switchover` back off (best effort; also after a failure). */
  finish(): Promise<void>;
}

export interface VmMigrateOptions {
  vmTo: string;
  /** How long the disk may take to converge, and QEMU to reach pre-switchover and then complete. */
  timeoutMs?: number;
  pollMs?: number;
  signal?: AbortSignal;
  log?: (line: string) => void;
}

export interface VmMigrateResult {
  storage: MigrateStatus;
  vm: VmMigrationState;
  /** From the VM's stop at pre-switchover (as seen here) to `migrate-continue` answered. */
  storagePauseMs: number;
  totalMs: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const VM_DONE = new Set(['completed', 'failed', 'cancelled']);

class Mover {
  private readonly t0 = performance.now();
  private readonly timeoutMs: number;
  private readonly pollMs: number;
  private readonly log: (line: string) => void;
  private vmStarted = false;

  constructor(
    private readonly storage: StorageSide,
    private readonly vm: VmSide,
    private readonly o: VmMigrateOptions,
  ) {
    this.timeoutMs = o.timeoutMs ?? 600_000;
    this.pollMs = o.pollMs ?? 50;
    this.log = o.log ?? (() => undefined);
  }

  private check(what: string, since?: number): void {
    if (this.o.signal?.aborted) throw new KscError('KSC_E_INVALID', `interrupted while ${what}`);
    if (since !== undefined && performance.now() - since > this.timeoutMs) throw new KscError('KSC_E_IO', `timed out after ${this.timeoutMs} ms while ${what}`);
  }

  /** Waits for the disk to converge; a failed storage migration throws its error. */
  private async converge(): Promise<void> {
    const t = performance.now();
    for (;;) {
      const s = await this.storage.status();
      if (s.phase === 'converged') return;
      if (s.phase !== 'copying') throw new KscError(s.error?.code ?? 'KSC_E_IO', `the disk's migration is ${s.phase}: ${s.error?.message ?? 'no error given'}`);
      this.check(`waiting for the disk to converge (${s.bytesLeft} bytes left)`, t);
      await sleep(this.pollMs * 2);
    }
  }

  /** Waits for QEMU's pre-switchover while the disk keeps its rounds going. */
  private async preSwitchover(): Promise<void> {
    const t = performance.now();
    for (let i = 0; ; i++) {
      const v = await this.vm.state();
      if (v.status === 'pre-switchover') return;
      if (VM_DONE.has(v.status)) throw new KscError('KSC_E_IO', `QEMU's migration ${v.status} before the switch-over${v.error ? `: ${v.error}` : ''}`);
      if (i % 10 === 9) {
        const s = await this.storage.status();
        if (s.phase !== 'copying' && s.phase !== 'converged') throw new KscError(s.error?.code ?? 'KSC_E_IO', `the disk's migration is ${s.phase}: ${s.error?.message ?? ''}`);
      }
      this.check(`waiting for QEMU's pre-switchover (status ${v.status})`, t);
      await sleep(this.pollMs);
    }
  }

  /** Before the storage switch-over: cancel both, wait for the VM to run again (when it ran). */
  private async undo(ranBefore: string): Promise<void> {
    if (this.vmStarted) await this.vm.cancel().catch((e: unknown) => this.log(`kscinc migrate: cancelling QEMU's migration failed: ${(e as Error).message}`));
    const s = await this.storage.status().catch(() => null);
    if (s && (s.phase === 'copying' || s.phase === 'converged')) {
      await this.storage.cancel().catch((e: unknown) => this.log(`kscinc migrate: cancelling the disk's migration failed: ${(e as Error).message}`));
    }
    if (this.vmStarted && ranBefore === 'running') {
      const t = performance.now();
      while ((await this.vm.runState().catch(() => 'unknown')) !== 'running' && performance.now() - t < 30_000) await sleep(this.pollMs);
    }
    this.log(`kscinc migrate: cancelled; the VM stays on the source (${await this.vm.runState().catch(() => 'state unknown')})`);
  }

  async run(): Promise<VmMigrateResult> {
    const ranBefore = await this.vm.prepare();
    let storageDone = false;
    try {
      return await this.move(ranBefore, () => (storageDone = true));
    } catch (e) {
      if (!storageDone) {
        await this.undo(ranBefore);
        throw e;
      }
      const why = (e as Error).message;
      throw new KscError(
        isKscError(e) ? e.code : 'KSC_E_IO',
        `the disk switched over to the destination, then QEMU's migration did not complete (${why}): the source disk refuses writes from now on; ` +
          'check the destination VM (query-status) before doing anything else — it may already run (formats/migrate.md §8)',
        { cause: e },
      );
    } finally {
      await this.vm.finish().catch(() => undefined);
    }
  }

  private async move(ranBefore: string, storageSwitched: () => void): Promise<VmMigrateResult> {
    const s0 = await this.storage.start();
    this.log(`kscinc migrate: disk: first pass of ${s0.firstPassBytes} bytes to ${s0.to}`);
    await this.converge();
    this.log(`kscinc migrate: disk converged; QEMU migrates the VM (was ${ranBefore}) to ${this.o.vmTo}`);
    this.vmStarted = true;
    await this.vm.start(this.o.vmTo);
    await this.preSwitchover();
    const tPause = performance.now();
    this.check('about to switch over');
    const storage = await this.storage.complete();
    storageSwitched();
    this.log(`kscinc migrate: disk switched over (pause ${storage.pauseMs} ms); QEMU continues`);
    await this.vm.continue();
    const storagePauseMs = Math.round((performance.now() - tPause) * 10) / 10;
    const t = performance.now();
    let vm = await this.vm.state();
    while (!VM_DONE.has(vm.status)) {
      if (performance.now() - t > this.timeoutMs) throw new KscError('KSC_E_IO', `QEMU's migration not done after ${this.timeoutMs} ms (status ${vm.status})`);
      await sleep(this.pollMs);
      vm = await this.vm.state();
    }
    if (vm.status !== 'completed') throw new KscError('KSC_E_IO', `QEMU's migration ${vm.status}${vm.error ? `: ${vm.error}` : ''}`);
    return { storage, vm, storagePauseMs, totalMs: Math.round(performance.now() - this.t0) };
  }
}

/**
 * Moves the VM and its disk (formats/migrate.md §8): the disk converges, QEMU migrates RAM and waits in
 * pre-switchover, the disk switches over, QEMU continues. Rejects after cancelling both on a failure before
 * the disk's switch-over; after it, rejects without undoing anything (the message says so).
 */
export function migrateVm(storage: StorageSide, vm: VmSide, o: VmMigrateOptions): Promise<VmMigrateResult> {
  return new Mover(storage, vm, o).run();
}
