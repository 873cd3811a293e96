/**
 * A process blocked in the open of a fifo nobody has opened from the other side (the kernel's
 * wait_for_partner): how tests hold a command at a known point (its --from or its output is a fifo) without
 * timing it.
 */
import { closeSync, constants, existsSync, openSync, readFileSync, readdirSync, writeSync } from 'node:fs';

/** Whether one of `pid`'s threads waits in the open of a fifo for the other side (wchan wait_for_partner). */
export function waitsForPartner(pid: number): boolean {
  try {
    return readdirSync(`/proc/${pid}/task`).some((t) => {
      try {
        return readFileSync(`/proc/${pid}/task/${t}/wchan`, 'utf8').includes('wait_for_partner');
      } catch {
        return false;
      }
    });
  } catch {
    return false;
  }
}

/**
 * Waits (polling every 20 ms) until `pid` waits in a fifo's open; throws naming `what` after `ms`, or at once
 * when the process has ended (and been reaped) without getting there.
 */
export async function untilWaitsForPartner(pid: number, what: string, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!waitsForPartner(pid)) {
    if (!existsSync(`/proc/${pid}`)) throw new Error(`process ${pid} ended before ${what}`);
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Writes `data` (at most a pipe's 64 KiB) into `fifo` and closes it, for a reader waiting in its open; false,
 * with nothing written, when no reader has it open (a blocking open would then wait for ever).
 */
export function feedFifo(fifo: string, data: Buffer): boolean {
  let fd: number;
  try {
    fd = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
  } catch (e) {
    if ((e as { code?: string }).code === 'ENXIO') return false;
    throw e;
  }
  try {
    writeSync(fd, data);
  } finally {
    closeSync(fd);
  }
  return true;
}
