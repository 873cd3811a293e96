/**
 * Kill points of a hot upgrade, for the every-step kill test (test/supervisor/handover-kill.test.ts,
 * formats/ksc_inc.md §9 rule 11): with KSCINC_TEST_KILL_AT=VICTIM@PHASE in the environment of `kscinc
 * serve`, the process that reaches PHASE first SIGKILLs VICTIM (`old` or `new` worker, or `supervisor`),
 * once. Phases, in the order a handover passes them (the process that sees each in brackets):
 *   loaded, warmed [supervisor: the new worker started, warmed up]; preflushed [old: flushed while serving];
 *   parking [supervisor: the old worker stopped reading]; drained [old: connections parked]; handoff
 *   [supervisor: the first connection came back]; handed-off [old: every connection sent]; closed [old:
 *   images handed over]; parked [supervisor]; opened [new: images opened]; ready [supervisor]; adopting,
 *   adopted-one [new: around its first adoption]; forwarded [supervisor: connections sent on, the old worker
 *   told to exit]; adopted [supervisor: every connection adopted].
 * A worker can kill itself or the supervisor only. Without the variable nothing happens.
 */
import { writeSync } from 'node:fs';

const spec = /^(old|new|supervisor)@([a-z-]+)$/.exec(process.env.KSCINC_TEST_KILL_AT ?? '');
let fired = false;

/** The pid to kill at `phase`, given who is who here (undefined: no one, or not here); marks it fired. */
function victim(phase: string, pids: { old?: number; new?: number; supervisor?: number }): number | undefined {
  if (!spec || fired || spec[2] !== phase) return undefined;
  const pid = pids[spec[1] as 'old' | 'new' | 'supervisor'];
  if (pid === undefined) return undefined;
  fired = true;
  writeSync(2, `kscinc: test kill point ${phase}: SIGKILL ${spec[1]} (pid ${pid})\n`);
  return pid;
}

function kill(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

/** In the supervisor: kills the victim of `phase`; a worker's death is awaited, so the step after sees it. */
export async function supervisorKillPoint(phase: string, old: { pid: number; exited: Promise<unknown> } | null, neu: { pid: number; exited: Promise<unknown> } | null): Promise<void> {
  const pid = victim(phase, { old: old?.pid, new: neu?.pid, supervisor: process.pid });
  if (pid === undefined) return;
  kill(pid);
  if (pid === old?.pid) await old.exited;
  else if (pid === neu?.pid) await neu.exited;
}

/** The same, where the supervisor cannot wait (a message handler). */
export function supervisorKillPointNow(phase: string, old: { pid: number }, neu: { pid: number }): void {
  const pid = victim(phase, { old: old.pid, new: neu.pid, supervisor: process.pid });
  if (pid !== undefined) kill(pid);
}

/** In a worker (`role` in this handover): kills itself or its supervisor at `phase`. */
export function workerKillPoint(phase: string, role: 'old' | 'new'): void {
  const pid = victim(phase, { [role]: process.pid, supervisor: process.ppid });
  if (pid !== undefined) kill(pid);
}
