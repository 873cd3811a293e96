/**
 * Turns of the event loop for work that can complete without one.
 *
 * A read the page cache answers on the calling thread (io/file.ts), a read of an image's hole, a chunk
 * already decoded in memory, a hash of a buffer: each settles its promise before the event loop runs again,
 * and `await` then goes on with microtasks only. A loop of such steps over cached data never lets timers or
 * I/O callbacks run until it ends: the repository lock's refresh (repo/locks.ts: late beyond the lifetime,
 * another host may judge the lock stale and take it), a live restore's reference renewal, the NBD server's
 * sockets and timers, progress output, signal handlers.
 *
 * pace() is called after each such completion. It counts completions since the event loop last had a turn
 * (a setImmediate queued at the first of a run resets the count when it runs) and, after RUN_MAX of them in
 * a row or RUN_MS since the first, hands back a promise the caller awaits: it settles on a setImmediate,
 * after timers and I/O callbacks had their turn. Otherwise null, and the caller goes on at once: one
 * counter step per completion and a clock read every eighth, one setImmediate per loop turn that had any.
 *
 * Once per completion, at the depth where it is known to have had no turn: HostFile.read's cached path
 * (io/file.ts), a backup backing's zero and decoded chunks (image/repobacking.ts). A ksc_inc read calls it
 * only when nothing below it did (paceUnlessPaced: holes, zero clusters), so a read of cached clusters
 * counts once, not twice.
 */

/** Completions in a row without a turn of the event loop, at most. */
export const RUN_MAX = 256;
/** Time since the first completion of a run, at most (checked every eighth completion). */
export const RUN_MS = 2;

let run = 0;
let since = 0;
/** Turns pace() handed out (tests and benches read it). */
let forced = 0;
/** Calls of pace() in this thread so far (paceCalls, paceUnlessPaced). */
let calls = 0;

function turned(): void {
  run = 0;
}

/** A promise to await before going on when the event loop is due a turn; null (the usual case) when not. */
export function pace(): Promise<void> | null {
  calls++;
  if (run++ === 0) {
    since = performance.now();
    setImmediate(turned);
  }
  if (run < RUN_MAX && ((run & 7) !== 0 || performance.now() - since < RUN_MS)) return null;
  forced++;
  return new Promise((resolve) => setImmediate(resolve));
}

/** How many turns pace() has handed out in this thread so far. */
export function pacedTurns(): number {
  return forced;
}

/**
 * pace() for a step that began at `mark` (paceCalls), unless a pace() came since: then what it read below
 * was counted already (a cached file read, a zero chunk). A step beside others in flight may see their
 * calls and skip its own; each call skips at most the steps in flight at that moment, so a run still
 * yields after at most RUN_MAX × (steps in flight + 1) completions (and RUN_MS still holds).
 */
export function paceUnlessPaced(mark: number): Promise<void> | null {
  return calls === mark ? pace() : null;
}

/** How many times pace() has been called in this thread so far: the mark for paceUnlessPaced; tests count with it. */
export function paceCalls(): number {
  return calls;
}
