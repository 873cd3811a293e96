/**
 * QEMU's side of a whole-VM migration (the engine's VmSide, src/engines/migrate-vm.ts) over QMP: the
 * `pause-before-switchover` capability makes QEMU stop in the `pre-switchover` state after the RAM converged
 * and the VM stopped (its block I/O drained and flushed), until `migrate-continue`.
 */
import { KscError } from '../errors.js';
import type { VmMigrationState, VmSide } from '../engines/migrate-vm.js';
import type { Qmp } from './client.js';

interface QueryMigrate {
  status?: string;
  'error-desc'?: string;
  downtime?: number;
  'total-time'?: number;
}

/** Migration states in which QEMU migrates something now (a second `migrate` would be refused or harmful). */
const BUSY = new Set(['setup', 'active', 'pre-switchover', 'device', 'cancelling', 'postcopy-active', 'postcopy-paused', 'postcopy-recover', 'colo', 'wait-unplug']);

export class QmpVmMigration implements VmSide {
  constructor(private readonly qmp: Qmp) {}

  private caps(on: boolean): Promise<unknown> {
    return this.qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'pause-before-switchover', state: on },
        { capability: 'events', state: on },
      ],
    });
  }

  async prepare(): Promise<string> {
    const run = await this.runState();
    if (run !== 'running' && run !== 'paused') throw new KscError('KSC_E_INVALID', `QMP ${this.qmp.path}: the VM is ${run}, not running or paused: nothing to migrate`);
    const m = await this.qmp.execute<QueryMigrate>('query-migrate');
    if (m.status && BUSY.has(m.status)) throw new KscError('KSC_E_LOCKED', `QMP ${this.qmp.path}: QEMU is already migrating (status ${m.status})`);
    await this.caps(true);
    return run;
  }

  async start(uri: string): Promise<void> {
    await this.qmp.execute('migrate', { uri });
  }

  async state(): Promise<VmMigrationState> {
    const m = await this.qmp.execute<QueryMigrate>('query-migrate');
    return { status: m.status ?? 'none', error: m['error-desc'], downtimeMs: m.downtime, totalTimeMs: m['total-time'] };
  }

  async continue(): Promise<void> {
    await this.qmp.execute('migrate-continue', { state: 'pre-switchover' });
  }

  async cancel(): Promise<void> {
    await this.qmp.execute('migrate_cancel');
  }

  async runState(): Promise<string> {
    return (await this.qmp.execute<{ status: string }>('query-status')).status;
  }

  /** Waits (up to 10 s) for a cancelled migration to settle: capabilities can change only then. */
  async finish(): Promise<void> {
    for (let i = 0; i < 200; i++) {
      const m = await this.qmp.execute<QueryMigrate>('query-migrate');
      if (!m.status || !BUSY.has(m.status)) {
        await this.caps(false);
        return;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
