/**
 * One run stopped after step N of the fault plan (src/io/fault.ts), for the every-step tests of the
 * repository engines (test/backup/prune-steps.test.ts, test/backup/restore-steps.test.ts): in this process
 * with the plan's `throw` action, or as a `kscinc` child that its own fault layer SIGKILLs
 * (KSC_FAULT_AFTER=N). The plan is cleared after every run, and after the file's tests.
 */
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { afterAll } from 'vitest';
import { faultFired, faultSteps, setFaultPlan } from '../../src/io/fault.js';
import { closePool } from '../../src/compress/pool.js';
import { CLI } from './cli.js';

/** After the file's tests: no fault plan left behind, the compression pool closed. */
export function clearFaultsAfterAll(): void {
  afterAll(() => {
    setFaultPlan(null);
    return closePool();
  });
}

/**
 * Runs `op` with the fault plan stopping it after step `n`. `fired`: the fault stopped it (`err` is what it
 * threw); otherwise it ran to its end (`err` null unless it failed on its own). `steps`: the steps it took.
 */
export async function runStoppedAfter(n: number, op: () => Promise<unknown>): Promise<{ fired: boolean; steps: number; err: unknown }> {
  setFaultPlan({ after: n, action: 'throw' });
  let err: unknown = null;
  try {
    await op();
  } catch (e) {
    err = e;
  }
  const fired = faultFired();
  const steps = faultSteps();
  setFaultPlan(null);
  return { fired, steps, err };
}

/**
 * Runs `kscinc ARGS` killed by its fault layer after step `n`, counting its steps into `countFile`.
 * `steps`: the steps of a run that exited 0 (null when it did not).
 */
export function runCliStoppedAfter(args: string[], n: number, countFile: string): { r: SpawnSyncReturns<string>; steps: number | null } {
  const r = spawnSync(process.execPath, [CLI, ...args], {
    env: { ...process.env, KSC_FAULT_AFTER: String(n), KSC_FAULT_COUNT_FILE: countFile },
    encoding: 'utf8',
  });
  return { r, steps: r.status === 0 ? Number(readFileSync(countFile, 'utf8')) : null };
}
