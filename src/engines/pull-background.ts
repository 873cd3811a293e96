/**
 * The background pull of a served live restore (issue 18; formats/ksc_inc.md §4.2 rule 8): the process that
 * serves an image whose backing is a backup pulls the rest of the backup into it with the pull engine
 * (pull.ts, pullOpen on the open image), behind the guest's requests:
 *  - before each coalesced read of the repository it waits while guest requests run (up to
 *    YIELD_MAX_MS, so a guest that is never idle slows the pull down but does not stop it), then takes the
 *    read's bytes from the bandwidth limit, if any;
 *  - a failure (the repository away past the live timeout, a lost lock) is retried after `retryMs`; damage
 *    (KSC_E_CORRUPT / KSC_E_NOT_FOUND) is not: the guest's reads of that chunk fail the same way, and the
 *    operator repairs the repository and restarts the server;
 *  - stop() (shutdown, hot upgrade) lets the reads started finish and flushes: the next server resumes
 *    (what was flushed is never fetched again).
 * When it is done the image has no backing any more; the export goes on serving the same image object.
 */
import { isKscError } from '../errors.js';
import type { KscImage } from '../image/ksc.js';
import type { BackupBacking } from '../image/repobacking.js';
import type { BlockDevice } from '../image/types.js';
import { RateLimit } from '../util/ratelimit.js';
import { pullOpen } from './pull.js';
import { backupTotals, localShare, writableLiveRestore } from '../image/live-share.js';

/** The pause after a failed pull before it tries again (formats/ksc_inc.md §4.2 rule 8; `serve --pull-retry`). */
export const PULL_RETRY_DEFAULT_MS = 30_000;

/** The longest a pull read waits for guest requests to drain before it goes anyway. */
export const YIELD_MAX_MS = 250;

export type PullState = 'pulling' | 'retrying' | 'done' | 'failed' | 'stopped' | 'off';

/** What `kscinc status` reports for an image being pulled (formats/control.md §5). */
export interface PullStatus {
  image: string;
  backup: string;
  state: PullState;
  /** Non-zero chunks of the backup, and how many of them the image holds itself. */
  totalChunks: number;
  localChunks: number;
  /** The same in bytes of the disk. */
  totalBytes: number;
  localBytes: number;
  /** Bytes read from the repository (stored, compressed) by this process since it opened the image: pull and guest reads. */
  fetchedBytes: number;
  /** Chunks fetched by this process (pull and guest reads), and the non-zero chunks the image lacked when its pull started (null: not yet known). Every fetched chunk is one that was missing: fetched ≤ missing at start. */
  chunksFetched: number;
  chunksMissingAtStart: number | null;
  /** Bytes of the disk pulled per second over the last 10 s. */
  rate: number;
  /** The limit on repository reads, bytes per second (null: none). */
  bandwidth: number | null;
  /** Times the pull waited for guest requests before a read. */
  yields: number;
  startedAt: string;
  finishedAt: string | null;
  error: string | null;
}

export interface BackgroundPullOptions {
  /** Bytes per second read from the repository at most (null: no limit). */
  bandwidth?: number | null;
  /** Coalesced reads in flight (default 4). */
  concurrency?: number;
  /** Whether guest requests are queued or running now. */
  busy?: () => boolean;
  /** Do not pull (`serve --no-pull`): status says "off". */
  off?: boolean;
  /** Pause after a failure before trying again (default PULL_RETRY_DEFAULT_MS, 30 s). */
  retryMs?: number;
  /** Flush at least this often while pulling, ms (pull.ts; default 5 s). */
  flushIntervalMs?: number;
  log: (line: string) => void;
}

class Stopped extends Error {}

export class BackgroundPull {
  private readonly s: PullStatus;
  private readonly limit: RateLimit | null;
  private stopping = false;
  private run: Promise<void> = Promise.resolve();
  private wake: (() => void) | null = null;
  private readonly samples: { t: number; bytes: number }[] = [];
  /** The backing's fetch counters when the pull started. */
  private counts = { bytes: 0, chunks: 0 };

  private constructor(
    private readonly img: KscImage,
    private readonly path: string,
    b: BackupBacking,
    private readonly opts: BackgroundPullOptions,
  ) {
    const t = backupTotals(b);
    this.limit = opts.bandwidth ? new RateLimit(opts.bandwidth) : null;
    this.s = {
      image: path,
      backup: b.manifest.meta.id,
      state: opts.off ? 'off' : 'pulling',
      totalChunks: t.chunks,
      localChunks: 0,
      totalBytes: t.bytes,
      localBytes: 0,
      fetchedBytes: 0,
      chunksFetched: 0,
      chunksMissingAtStart: null,
      rate: 0,
      bandwidth: opts.bandwidth ?? null,
      yields: 0,
      startedAt: new Date().toISOString(),
      finishedAt: null,
      error: null,
    };
  }

  /** A pull for `dev` when it is a live restore open for writing; null otherwise. Not started yet. */
  static of(dev: BlockDevice, path: string, opts: BackgroundPullOptions): BackgroundPull | null {
    const live = writableLiveRestore(dev);
    return live ? new BackgroundPull(live.img, path, live.backing, opts) : null;
  }

  start(): void {
    if (this.opts.off) {
      void localShare(this.img).then(
        (v) => v && Object.assign(this.s, { localChunks: v.localChunks, localBytes: v.localBytes }),
        () => undefined,
      );
      return;
    }
    this.run = this.loop();
  }

  /** Stops pulling: the reads started finish, what was filled is flushed. Resolves when nothing runs. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.wake?.();
    await this.run;
  }

  status(): PullStatus {
    const now = performance.now();
    while (this.samples.length > 1 && now - this.samples[0]!.t > 10_000) this.samples.shift();
    const a = this.samples[0];
    const z = this.samples[this.samples.length - 1];
    const live = this.s.state === 'pulling' && a && z && z.t > a.t;
    return { ...this.s, rate: live ? Math.round(((z.bytes - a.bytes) * 1000) / (now - a.t)) : 0 };
  }

  private async loop(): Promise<void> {
    const b = this.img.backing as BackupBacking;
    const retryMs = this.opts.retryMs ?? PULL_RETRY_DEFAULT_MS;
    for (;;) {
      try {
        this.s.state = 'pulling';
        const r = await pullOpen(this.img, this.path, {
          concurrency: this.opts.concurrency,
          flushIntervalMs: this.opts.flushIntervalMs,
          beforeRead: (n) => this.gate(n),
          progress: (p) => this.progress(p),
        });
        this.fetched(b);
        Object.assign(this.s, { state: 'done', localChunks: this.s.totalChunks, localBytes: this.s.totalBytes, error: null });
        this.s.finishedAt = new Date().toISOString();
        this.opts.log(`kscinc serve: pull of ${this.path} done: ${r.chunksFetched} chunks fetched, the image no longer needs ${b.name}${r.referenceLeft ? `; ${r.referenceLeft}` : ''}`);
        return;
      } catch (e) {
        this.fetched(b);
        if (this.stopping) {
          this.s.state = 'stopped';
          return;
        }
        const damage = isKscError(e, 'KSC_E_CORRUPT') || isKscError(e, 'KSC_E_NOT_FOUND');
        this.s.state = damage ? 'failed' : 'retrying';
        this.s.error = (e as Error).message;
        this.opts.log(`kscinc serve: pull of ${this.path} ${damage ? 'failed' : `failed, trying again in ${retryMs / 1000} s`}: ${(e as Error).message}`);
        if (damage) return;
        await new Promise<void>((r) => {
          const t = setTimeout(r, retryMs);
          this.wake = () => {
            clearTimeout(t);
            r();
          };
        });
        this.wake = null;
        if (this.stopping) {
          this.s.state = 'stopped';
          return;
        }
      }
    }
  }

  private progress(p: { doneChunks: number; totalChunks: number; doneBytes: number; totalBytes: number }): void {
    this.s.localChunks = this.s.totalChunks - p.totalChunks + p.doneChunks;
    this.s.localBytes = this.s.totalBytes - p.totalBytes + p.doneBytes;
    const b = this.img.backing as BackupBacking;
    if (this.s.chunksMissingAtStart === null) {
      // The counters start with the list of missing chunks: every chunk fetched from now on is one of them.
      this.s.chunksMissingAtStart = p.totalChunks;
      this.counts = { bytes: b.stats.bytesFetched, chunks: b.stats.chunksFetched };
    }
    this.samples.push({ t: performance.now(), bytes: this.s.localBytes });
    if (this.samples.length > 4096) this.samples.splice(0, 2048);
    this.fetched(b);
  }

  private fetched(b: BackupBacking): void {
    if (this.s.chunksMissingAtStart === null) return;
    this.s.fetchedBytes = b.stats.bytesFetched - this.counts.bytes;
    this.s.chunksFetched = b.stats.chunksFetched - this.counts.chunks;
  }

  /** Before each read: guest requests first (bounded), then the bandwidth limit. */
  private async gate(bytes: number): Promise<void> {
    if (this.stopping) throw new Stopped('stopped');
    if (this.opts.busy?.()) {
      this.s.yields++;
      const end = performance.now() + YIELD_MAX_MS;
      while (this.opts.busy() && performance.now() < end && !this.stopping) await new Promise((r) => setTimeout(r, 2));
    }
    await this.limit?.take(bytes, () => this.stopping);
    if (this.stopping) throw new Stopped('stopped');
  }
}
