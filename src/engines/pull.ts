/**
 * Pull (issue 18 step 5, formats/ksc_inc.md §4.2 rules 3 and 6): makes a live-restored image independent of
 * its repository. Every non-zero chunk of the backup that the image does not hold yet is fetched through the
 * image's backing the way a restore reads them (coalesced ranged reads of the packs, several in flight;
 * each chunk verified, then filled: copy-on-read, no bitmap marked); the image is flushed every
 * `flushEvery` chunks (64 MiB by default), so a pull killed at any point resumes where the last flush left it
 * (what was flushed is never fetched again). When nothing is left, the backing is dropped: a flush, then a
 * header without it (rule 6), and the image is a plain ksc_inc image.
 */
import { KscError } from '../errors.js';
import { openKsc } from '../image/open.js';
import { BackupBacking } from '../image/repobacking.js';
import type { KscImage } from '../image/ksc.js';

export interface PullOptions {
  /** Coalesced reads (of up to 4 MiB of pack) in flight (default 4). */
  concurrency?: number;
  /** Flush after this many chunks (default: 64 MiB worth of chunks, at least 16). */
  flushEvery?: number;
  progress?: (p: { doneChunks: number; totalChunks: number }) => void;
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

/** Chunks that still read (some of their bytes) through the backing. */
async function remainingChunks(img: KscImage, b: BackupBacking): Promise<number[]> {
  const C = b.blockSize;
  const out = new Set<number>();
  for (const e of await img.extents(0, img.size)) {
    if (e.depth === 0 || e.state !== 'data') continue;
    for (let k = Math.floor(e.offset / C); k * C < e.offset + e.length; k++) if (!b.isZeroChunk(k)) out.add(k);
  }
  return [...out].sort((x, y) => x - y);
}

/** Pulls every remaining chunk of the live-restored image at `path` into it, then drops its backing. */
export async function pullImage(path: string, opts: PullOptions = {}): Promise<PullResult> {
  const t0 = performance.now();
  const img = await openKsc(path, { write: true });
  try {
    const b = img.backing;
    if (!(b instanceof BackupBacking)) throw new KscError('KSC_E_INVALID', `image ${path}: its backing is not a backup in a repository (nothing to pull)`);
    const todo = await remainingChunks(img, b);
    const flushEvery = Math.max(1, opts.flushEvery ?? Math.max(16, Math.floor((64 * 1024 * 1024) / b.blockSize)));
    let done = 0;
    let flushing: Promise<void> | null = null;
    // Every chunk counted is filled (its clusters written, the map entry in memory): a flush makes it durable.
    await b.fetchAll(todo, {
      concurrency: opts.concurrency ?? 4,
      onChunk: () => {
        done++;
        opts.progress?.({ doneChunks: done, totalChunks: todo.length });
        if (done % flushEvery === 0 && !flushing) flushing = img.flush().finally(() => (flushing = null));
      },
    });
    await flushing;
    await b.settled();
    await img.flush();
    b.checkLock();
    const left = await remainingChunks(img, b);
    if (left.length > 0)
      throw new KscError('KSC_E_IO', `image ${path}: ${left.length} chunks (first ${left[0]}) still read through ${b.name} after the pull (a guest change raced it?); run pull again`);
    const stats = { ...b.stats };
    await img.setBacking(null, null, null); // flushes first (§4.2 rule 6)
    // Only now, with the header without the backing durable, may prune delete what the image read from
    // (repository.md §8.1). A reference left behind (repository away) only keeps the backup longer.
    let referenceLeft: string | null = null;
    await b
      .dropReference(path)
      .catch((e: unknown) => (referenceLeft = `the live-restore reference of ${path} could not be deleted (${(e as Error).message}); "kscinc repo unlock" removes it once stale`));
    await b.close();
    return {
      image: path,
      backup: b.manifest.meta.id,
      chunksRemaining: todo.length,
      chunksFetched: stats.chunksFetched,
      bytesFetched: stats.bytesFetched,
      reads: stats.reads,
      detached: true,
      referenceLeft,
      durationMs: Math.round(performance.now() - t0),
    };
  } finally {
    await img.close();
  }
}
