/**
 * The whole-VM steps (src/engines/migrate-vm.ts, formats/migrate.md §8) against scripted sides, failing at
 * each step in turn: before the disk's switch-over every failure cancels both halves (QEMU's migration only
 * once it was started) and the capability is turned back off; a failed switch-over cancels QEMU's migration
 * (the disk's is already failed); after the switch-over nothing is cancelled and the error says so. The real
 * peers (two QEMU processes, kscinc serve) are in vm.test.ts; this covers the failure points it cannot time.
 */
import { describe, expect, it } from 'vitest';
import { KscError } from '../../src/errors.js';
import type { MigratePhase, MigrateStatus } from '../../src/engines/migrate.js';
import { migrateVm, type StorageSide, type VmMigrationState, type VmSide } from '../../src/engines/migrate-vm.js';

type Step = 'storage.start' | 'storage.converge' | 'vm.start' | 'vm.pre' | 'storage.complete' | 'vm.continue' | 'vm.done' | null;

function status(phase: MigratePhase): MigrateStatus {
  return {
    phase,
    to: 'nbd://x/',
    startedAt: '',
    size: 1,
    firstPassBytes: 0,
    bytesSent: 0,
    bytesZeroed: 0,
    wireBytes: 0,
    compressed: false,
    bytesLeft: 0,
    rounds: 1,
    throughputBps: 0,
    dirtyRateBps: 0,
    estimatedPauseMs: 0,
    pauseMs: phase === 'completed' ? 1 : null,
    error: phase === 'failed' ? { code: 'KSC_E_IO', message: 'injected' } : null,
    warning: null,
    resumed: false,
  };
}

/** Both sides, scripted: `failAt` names the step that fails; `calls` records what the engine asked. */
function sides(failAt: Step, abort?: AbortController): { storage: StorageSide; vm: VmSide; calls: string[] } {
  const calls: string[] = [];
  let phase: MigratePhase | null = null;
  let vmStatus = 'none';
  let run = 'running';
  let caps = false;
  const fail = (step: Step): void => {
    if (failAt === step) throw new KscError('KSC_E_IO', `injected at ${step}`);
  };
  const storage: StorageSide = {
    start: async () => {
      calls.push('storage.start');
      fail('storage.start');
      phase = 'copying';
      return status(phase);
    },
    status: async () => {
      if (!phase) throw new KscError('KSC_E_NOT_FOUND', 'no migration');
      if (phase === 'copying') {
        phase = failAt === 'storage.converge' ? 'failed' : 'converged';
        if (abort) abort.abort();
      }
      return status(phase);
    },
    complete: async () => {
      calls.push('storage.complete');
      if (failAt === 'storage.complete') {
        phase = 'failed';
        throw new KscError('KSC_E_IO', 'injected at storage.complete');
      }
      phase = 'completed';
      return status(phase);
    },
    cancel: async () => {
      calls.push('storage.cancel');
      phase = 'cancelled';
      return status(phase);
    },
  };
  const vm: VmSide = {
    prepare: async () => {
      calls.push('vm.prepare');
      caps = true;
      return run;
    },
    start: async () => {
      calls.push('vm.start');
      fail('vm.start');
      vmStatus = failAt === 'vm.pre' ? 'failed' : 'pre-switchover';
      run = 'finish-migrate';
    },
    state: async (): Promise<VmMigrationState> => ({ status: vmStatus, error: vmStatus === 'failed' ? 'injected' : undefined }),
    continue: async () => {
      calls.push('vm.continue');
      fail('vm.continue');
      vmStatus = failAt === 'vm.done' ? 'failed' : 'completed';
      run = failAt === 'vm.done' ? 'running' : 'postmigrate';
    },
    cancel: async () => {
      calls.push('vm.cancel');
      vmStatus = 'cancelled';
      run = 'running';
    },
    runState: async () => run,
    finish: async () => {
      calls.push('vm.finish');
      caps = false;
    },
  };
  Object.defineProperty(vm, 'caps', { get: () => caps });
  return { storage, vm, calls };
}

const opts = { vmTo: 'tcp:127.0.0.1:1', pollMs: 1, timeoutMs: 5000 };

describe('kscinc migrate --qmp: the steps and their failures', () => {
  it('succeeds in order: start, converge, QEMU to pre-switchover, disk switch-over, continue, capability off', async () => {
    const { storage, vm, calls } = sides(null);
    const r = await migrateVm(storage, vm, opts);
    expect(r.storage.phase).toBe('completed');
    expect(r.vm.status).toBe('completed');
    expect(calls).toEqual(['vm.prepare', 'storage.start', 'vm.start', 'storage.complete', 'vm.continue', 'vm.finish']);
  });

  const before: [Step, string[], RegExp][] = [
    ['storage.start', ['vm.prepare', 'storage.start', 'vm.finish'], /injected at storage.start/],
    ['storage.converge', ['vm.prepare', 'storage.start', 'vm.finish'], /disk's migration is failed/],
    ['vm.start', ['vm.prepare', 'storage.start', 'vm.start', 'vm.cancel', 'storage.cancel', 'vm.finish'], /injected at vm.start/],
    ['vm.pre', ['vm.prepare', 'storage.start', 'vm.start', 'vm.cancel', 'storage.cancel', 'vm.finish'], /QEMU's migration failed before the switch-over/],
    ['storage.complete', ['vm.prepare', 'storage.start', 'vm.start', 'storage.complete', 'vm.cancel', 'vm.finish'], /injected at storage.complete/],
  ];
  for (const [step, want, message] of before) {
    it(`a failure at ${step} cancels what was started; the VM runs on at the source`, async () => {
      const { storage, vm, calls } = sides(step);
      await expect(migrateVm(storage, vm, opts)).rejects.toThrow(message);
      expect(calls).toEqual(want);
      expect(await vm.runState()).toBe('running');
      expect((vm as unknown as { caps: boolean }).caps).toBe(false);
    });
  }

  for (const step of ['vm.continue', 'vm.done'] as const) {
    it(`a failure at ${step}, after the disk's switch-over: nothing is cancelled, and the error says why`, async () => {
      const { storage, vm, calls } = sides(step);
      await expect(migrateVm(storage, vm, opts)).rejects.toThrow(/the disk switched over to the destination, then QEMU's migration did not complete/);
      expect(calls).not.toContain('vm.cancel');
      expect(calls).not.toContain('storage.cancel');
      expect(calls.at(-1)).toBe('vm.finish');
    });
  }

  it('an abort (SIGINT) before the switch-over cancels both', async () => {
    const abort = new AbortController();
    const { storage, vm, calls } = sides(null, abort);
    await expect(migrateVm(storage, vm, { ...opts, signal: abort.signal })).rejects.toThrow(/interrupted/);
    expect(calls).not.toContain('storage.complete');
    expect(calls).toContain('storage.cancel');
  });
});
