import { readFileSync, readlinkSync } from 'node:fs';

/** Whether a process with this pid exists on this host (EPERM: it exists, owned by someone else). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * What tells this process apart from any other that had or will have its pid: the kernel's boot id (a new
 * one at every boot; the same in every container of one kernel), the pid namespace (a container has its
 * own, so a pid means nothing outside it) and the process's start time in clock ticks since boot (a pid
 * reused after this process ended starts later). Fields are absent where /proc does not tell them.
 */
export interface ProcessIdentity {
  boot?: string;
  pidns?: string;
  start?: number;
}

let selfIdentity: ProcessIdentity | null = null;

/** This process's identity (read once). */
export function processIdentity(): ProcessIdentity {
  if (selfIdentity) return selfIdentity;
  const id: ProcessIdentity = {};
  try {
    id.boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    /* not Linux */
  }
  try {
    id.pidns = readlinkSync('/proc/self/ns/pid'); // "pid:[4026531836]"
  } catch {
    /* not Linux, or no access */
  }
  const start = processStartTicks(process.pid);
  if (start !== null) id.start = start;
  return (selfIdentity = id);
}

/**
 * Field 22 of /proc/PID/stat (start time after boot, in clock ticks) of a process of this pid namespace;
 * null when there is no such process or /proc does not say. The command name (field 2) may hold spaces and
 * parentheses, so the fields are counted from its last ')'.
 */
export function processStartTicks(pid: number): number | null {
  if (!Number.isSafeInteger(pid) || pid <= 0) return null;
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const v = Number(fields[19]); // field 3 (state) is fields[0]
  return Number.isSafeInteger(v) ? v : null;
}
