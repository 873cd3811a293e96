/**
 * The base fingerprint (formats/migrate.md §2) computed off the serving thread and cached by the base file's
 * identity (§2.1). Hashing a base of hundreds of MiB in the serving process held the guest's writes for about
 * its whole duration (bench/README.md), so a worker thread (fingerprint-worker.ts) opens the base file itself
 * and hashes it there; the serving thread only waits. The result is kept per (dev, inode, size, mtime ns,
 * ctime ns) of the file the serving process has open, and only when nothing can have changed it unseen:
 *   - the stamp of the served file before the work, the worker's file before and after hashing, and the
 *     served file after the work are all equal (same file, no change while it was read);
 *   - its mtime and ctime lie RACY_NS before the work started, so that any later change — whose timestamps
 *     are at least the time it happens, minus the file system's granularity — moves one of them.
 * A base with no host file (a device without fileStamp) is hashed on the serving thread as before, uncached.
 */
import { Worker } from 'node:worker_threads';
import { KscError } from '../errors.js';
import { allocationOf } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import type { FileStamp } from '../io/file.js';
import { workerEntry } from '../util/worker-entry.js';

/** A change this recent (ns) before the hashing started may share its timestamps with a later one: not cached. */
export const RACY_NS = 2_000_000_000n;
const MAX_ENTRIES = 64;

const cache = new Map<string, string>();
const counts = { worker: 0, inThread: 0 };

const keyOf = (s: FileStamp): string => `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}:${s.ctimeNs}`;

/** How many fingerprints were computed (not taken from the cache) since the process started, and where: for tests. */
export function fingerprintsComputed(): { worker: number; inThread: number } {
  return { ...counts };
}

/** Forgets every cached fingerprint (tests). */
export function clearFingerprintCache(): void {
  cache.clear();
}

export interface WorkerAnswer {
  fingerprint: string;
  before: FileStamp | null;
  after: FileStamp | null;
}

/** Runs fingerprint-worker.ts on `path` (opened there read-only as `format`); rejects with its error. */
function inWorker(path: string, format: 'raw' | 'ksc_inc'): Promise<WorkerAnswer> {
  return new Promise((resolve, reject) => {
    const w = new Worker(workerEntry(import.meta.url, 'fingerprint-worker.cjs', 'engines/fingerprint-worker.js'), { workerData: { path, format } });
    let settled = false;
    w.once('message', (m: { ok: WorkerAnswer } | { error: { code: string; message: string } }) => {
      settled = true;
      if ('ok' in m) resolve(m.ok);
      else reject(new KscError(m.error.code as never, m.error.message));
      void w.terminate();
    });
    w.once('error', (e) => {
      settled = true;
      reject(new KscError('KSC_E_IO', `${path}: the fingerprint worker failed: ${e.message}`, { cause: e }));
    });
    w.once('exit', (code) => {
      if (!settled) reject(new KscError('KSC_E_IO', `${path}: the fingerprint worker exited (${code}) without an answer`));
    });
  });
}

const same = (a: FileStamp | null, b: FileStamp | null): boolean => a !== null && b !== null && keyOf(a) === keyOf(b);

/**
 * Fingerprint v1 of `base` (the bottom of a chain, opened by this process): from the cache when its file is
 * unchanged, else hashed in a worker; `inThread` hashes through the device itself (no host file, or the path
 * no longer names the file this process has open).
 */
export async function fingerprintOffThread(base: BlockDevice, inThread: (b: BlockDevice) => Promise<string>): Promise<string> {
  const stampOf = allocationOf(base)?.fileStamp;
  const s1 = stampOf ? await stampOf.call(allocationOf(base)) : null;
  const slow = (): Promise<string> => {
    counts.inThread++;
    return inThread(base);
  };
  if (!s1) return slow();
  const hit = cache.get(keyOf(s1));
  if (hit !== undefined) return hit;
  const startedNs = BigInt(Date.now()) * 1_000_000n;
  let r: WorkerAnswer;
  try {
    r = await inWorker(base.name, base.format);
  } catch {
    return slow(); // the worker could not open or read it: the served device still can
  }
  if (!r.before || r.before.dev !== s1.dev || r.before.ino !== s1.ino) return slow(); // the path names another file now
  counts.worker++;
  const s2 = await stampOf!.call(allocationOf(base));
  const quiet = s1.mtimeNs < startedNs - RACY_NS && s1.ctimeNs < startedNs - RACY_NS;
  if (same(s1, r.before) && same(s1, r.after) && same(s1, s2) && quiet) {
    if (cache.size >= MAX_ENTRIES) cache.delete(cache.keys().next().value!);
    cache.set(keyOf(s1), r.fingerprint);
  }
  return r.fingerprint;
}
