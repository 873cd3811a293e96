/**
 * A process blocked in the open of a fifo nobody has opened from the other side (the kernel's
 * wait_for_partner): how tests hold a command at a known point (its --from or its output is a fifo) without
 * timing it.
 */
import { readFileSync, readdirSync } from 'node:fs';

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

/** Waits (polling every 20 ms) until `pid` waits in a fifo's open; throws naming `what` after `ms`. */
export async function untilWaitsForPartner(pid: number, what: string, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!waitsForPartner(pid)) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
