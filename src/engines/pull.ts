/**
 * Pull (issue 18, formats/ksc_inc.md §4.2 rules 3 and 6): makes a live-restored image independent of its
 * repository. Every non-zero chunk of the backup that the image does not hold yet is fetched through the
 * image's backing the way a restore reads them (coalesced ranged reads of the packs, several in flight;
 * each chunk verified, then filled: copy-on-read, no bitmap marked); the image is flushed every
 * `flushEvery` chunks (64 MiB by default) and at least every `flushIntervalMs` (5 s by default: a slow or
 * throttled pull loses little to a kill), so a pull killed at any point resumes where the last flush left it
 * (what was flushed is never fetched again). When nothing is left, the backing is dropped: a flush, then a
 * header without it (rule 6), and the image is a plain ksc_inc image.
 *
 * Two callers: `kscinc pull` (pullImage: the image opened here, nothing else uses it) and the server that
 * serves the image (pullOpen on its open image, src/engines/pull-background.ts), whose guest reads and
 * writes go on meanwhile. Dropping the backing under a served image is safe because a block never goes
 * back to UNALLOCATED while the image has a backing (a discard or write-zeroes then stores ZERO) and only
 * an exclusive block lock moves a block out of it: once no block is UNALLOCATED, no read is reading through
 * the backing and none will start.
 */
import { KscError } from '../errors.js';
import { openKsc } from '../image/open.js';
import { BackupBacking } from '../image/repobacking.js';
import type { KscImage } from '../image/ksc.js';
import { chunkBytes, remainingChunks } from '../image/live-share.js';
import { fingerprintText } from '../format/local-base.js';
import { fingerprintV1 } from './migrate-base.js';

export interface PullProgress {
  doneChunks: number;
  totalChunks: number;
  /** Bytes of the disk those chunks cover (a short last chunk counts its own length). */
  doneBytes: number;
  totalBytes: number;
}

export interface PullOptions {
  /** Coalesced reads (of up to 4 MiB of pack) in flight (default 4). */
  concurrency?: number;
  /** Flush after this many chunks (default: 64 MiB worth of chunks, at least 16). */
  flushEvery?: number;
  /** Also flush when this long has passed since the last flush and a chunk was filled since (default 5 s). */
  flushIntervalMs?: number;
  progress?: (p: PullProgress) => void;
  /**
   * Awaited before each coalesced read with the stored bytes it reads: a throttle, a pause for guest
   * requests. Throwing stops the pull (the reads started finish and their chunks are filled first).
   */
  beforeRead?: (bytes: number) => Promise<void>;
}

export interface PullResult {
  image: string;
  backup: string;
  /** Non-zero chunks of the backup that were not in the image when the pull started. */
  chunksRemaining: number;
  chunksFetched: number;
  bytesFetched: number;
  /** Ranged reads of the repository's packs (coalesced: far fewer than chunks). */
  reads: number;
  /** True when the backing was dropped (the image no longer needs the repository). */
  detached: boolean;
  /** Why the image's live-restore reference is still in the repository (null: deleted). */
  referenceLeft: string | null;
  durationMs: number;
}

/** Pulls every remaining chunk of the live-restored image at `path` into it, then drops its backing. */
export async function pullImage(path: string, opts: PullOptions = {}): Promise<PullResult> {
  const img = await openKsc(path, { write: true });
  try {
    return await pullOpen(img, path, opts);
  } finally {
    await img.close();
  }
}

/**
 * Pulls into `img`, open for writing (its backing a BackupBacking, KSC_E_INVALID otherwise), which others
 * may read and write meanwhile; drops the backing when nothing is left and closes it. `path` names the
 * image's reference (repository.md §8.1).
 */
export async function pullOpen(img: KscImage, path: string, opts: PullOptions = {}): Promise<PullResult> {
  const t0 = performance.now();
  const b = img.backing;
  if (!(b instanceof BackupBacking)) throw new KscError('KSC_E_INVALID', `image ${path}: its backing is not a backup in a repository (nothing to pull)`);
  const todo = await remainingChunks(img, b);
  const before = { ...b.stats };
  await fetchRemaining(img, b, todo, opts);
  const left = await remainingChunks(img, b);
  if (left.length > 0) throw new KscError('KSC_E_IO', `image ${path}: ${left.length} chunks (first ${left[0]}) still read through ${b.name} after the pull (a fill failed?); run pull again`);
  const stats = { ...b.stats };
  const referenceLeft = await detach(img, b, path);
  return {
    image: path,
    backup: b.manifest.meta.id,
    chunksRemaining: todo.length,
    chunksFetched: stats.chunksFetched - before.chunksFetched,
    bytesFetched: stats.bytesFetched - before.bytesFetched,
    reads: stats.reads - before.reads,
    detached: true,
    referenceLeft,
    durationMs: Math.round(performance.now() - t0),
  };
}

/** The time bound on unflushed pulled chunks (formats/ksc_inc.md §4.2 rule 6). */
export const PULL_FLUSH_INTERVAL_MS = 5000;

/** Fetches and fills chunks `todo`, flushing every `flushEvery` chunks or `flushIntervalMs`; ends with them durable. */
async function fetchRemaining(img: KscImage, b: BackupBacking, todo: number[], opts: PullOptions): Promise<void> {
  const flushEvery = Math.max(1, opts.flushEvery ?? Math.max(16, Math.floor((64 * 1024 * 1024) / b.blockSize)));
  let totalBytes = 0;
  for (const k of todo) totalBytes += chunkBytes(b, k);
  const p: PullProgress = { doneChunks: 0, totalChunks: todo.length, doneBytes: 0, totalBytes };
  const interval = opts.flushIntervalMs ?? PULL_FLUSH_INTERVAL_MS;
  let flushing: Promise<void> | null = null;
  let sinceFlush = 0;
  let lastFlush = performance.now();
  const flushNow = (): void => {
    sinceFlush = 0;
    lastFlush = performance.now();
    // A failed flush breaks the image's session: the final flush below reports it.
    flushing = img
      .flush()
      .catch(() => undefined)
      .finally(() => (flushing = null));
  };
  // A chunk filled just before a pause (a throttle, a repository away) is flushed on time too.
  const timer = setInterval(
    () => {
      if (sinceFlush > 0 && !flushing && performance.now() - lastFlush >= interval) flushNow();
    },
    Math.max(10, Math.min(interval, 1000)),
  );
  timer.unref();
  opts.progress?.(p);
  try {
    // Every chunk counted is filled (its clusters written, the map entry in memory): a flush makes it durable.
    await b.fetchAll(todo, {
      concurrency: opts.concurrency ?? 4,
      beforeRead: opts.beforeRead,
      onChunk: (k) => {
        p.doneChunks++;
        p.doneBytes += chunkBytes(b, k);
        opts.progress?.(p);
        sinceFlush++;
        if (!flushing && (p.doneChunks % flushEvery === 0 || performance.now() - lastFlush >= interval)) flushNow();
      },
    });
  } finally {
    clearInterval(timer);
    // Stopped or not, what was filled is made durable (a stopped pull resumes after it).
    await flushing;
    await b.settled();
    await img.flush();
  }
  b.checkLock();
}

/**
 * §4.2 rule 6: the header without the backing (after a flush), then the reference deleted and the
 * backing closed. Returns why the reference is still there (null: deleted).
 */
async function detach(img: KscImage, b: BackupBacking, path: string): Promise<string | null> {
  const local = b.localBase;
  if (local) {
    // §4.2 rule 9d: the base checked again from its bytes, then one header: an overlay over it.
    await img.flush();
    const now = await fingerprintV1(local.device);
    if (now !== fingerprintText(local.ref)) {
      throw new KscError(
        'KSC_E_INVALID',
        `image ${path}: its local base ${local.ref.name} changed since the live restore (fingerprint ${now}, ${fingerprintText(local.ref)} expected): the backing is not dropped; the image stays a live restore`,
      );
    }
    await img.setBacking(local.ref.name, 'raw', local.device); // flushes first
    local.handOver();
  } else await img.setBacking(null, null, null); // flushes first
  img.onRead = null; // no readahead from a backing the image no longer reads (open.ts)
  // Only now, with the header without the backing durable, may prune delete what the image read from
  // (repository.md §8.1). A reference left behind (repository away) only keeps the backup longer.
  let referenceLeft: string | null = null;
  await b
    .dropReference(path)
    .catch((e: unknown) => (referenceLeft = `the live-restore reference of ${path} could not be deleted (${(e as Error).message}); "kscinc repo unlock" removes it once stale`));
  await b.close();
  return referenceLeft;
}
