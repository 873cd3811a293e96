/**
 * What an NBD server running in this process holds live while clients never read their replies (the memory
 * tests: nbd/request-overhead-memory, hostile/s25-nbd-status-budget). Exposes gc() when imported.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { setTimeout as sleep } from 'node:timers/promises';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** What this process holds live: heap and buffers outside it, after two full collections. */
export function live(): number {
  gc();
  gc();
  const m = process.memoryUsage();
  return m.heapUsed + m.external;
}

/**
 * What is held live above `before` once the server stops taking requests (its budget's use the same twice
 * running, after at least 3.5 s; at most 30 s of sampling every 500 ms).
 */
export async function heldOnceSettled(budget: { readonly inUse: number }, before: number): Promise<number> {
  let held = 0;
  for (let t = 0, last = -1; t < 60; t++) {
    await sleep(500);
    held = live() - before;
    const inUse = budget.inUse;
    if (inUse === last && t >= 6) break;
    last = inUse;
  }
  return held;
}
