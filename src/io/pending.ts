/**
 * Temporary files being built right now (absolute or as given), with the lock files they may carry: what a
 * process interrupted by a signal removes before it exits (src/cli/program.ts). A module of its own so that
 * the CLI's start-up does not load the file layer (crypto, zlib) to reach it; src/io/newfile.ts and
 * src/engines/restore.ts fill it.
 */
export const pendingFiles = new Set<string>();

/**
 * Pending temporaries being published under their final name by a hard link (io/newfile.ts nameNewFile):
 * temporary → target. Once the target names the temporary's inode the file is finished and the temporary
 * only its second name: a signal's handler removes that name but does not call the file unfinished.
 */
export const publishingAs = new Map<string, string>();

/**
 * Opens that may create a file, still running on libuv's threads. A signal's handler that removed the
 * pending files while one of these was in flight would see the file appear after it: it waits until none
 * is (creatingNow) and removes again before the process exits.
 */
const creating = new Set<Promise<unknown>>();

/** `open` (a call that may create a file) tracked until it settles; returns it. */
export function trackCreate<T>(open: Promise<T>): Promise<T> {
  creating.add(open);
  const done = (): void => void creating.delete(open);
  open.then(done, done);
  return open;
}

/** How many creates are in flight. */
export function creatingNow(): number {
  return creating.size;
}
