/**
 * The background pull inside `kscinc serve` (issue 18), as the serving process (the worker, or the only
 * process with --no-supervisor) runs it: one BackgroundPull (src/engines/pull-background.ts) per served
 * live restore, started once the images are open, stopped before they are closed; and how `kscinc status`
 * prints a pull's progress.
 */
import * as path from 'node:path';
import { KscError } from '../errors.js';
import type { BackgroundPull, PullStatus } from '../engines/pull-background.js';
import type { BlockDevice } from '../image/types.js';
import { formatSize } from '../util/size.js';
import { println } from './output.js';

/** `serve --bandwidth` / `--no-pull`: plain data, sent from the supervisor to its worker. */
export interface PullConfig {
  enabled: boolean;
  /** Bytes per second read from the repository at most; null: no limit. */
  bandwidth: number | null;
  /** `serve --pull-retry SECONDS`: the pause after a failed pull (default PULL_RETRY_DEFAULT_MS). */
  retryMs?: number;
}

/** Parses `--pull-retry SECONDS` (fractions allowed, above 0, at most a day). */
export function pullRetryMs(v: string): number {
  const s = /^\d+(\.\d+)?$/.test(v) ? Number(v) : NaN;
  if (!(s > 0 && s <= 86_400)) throw new KscError('KSC_E_INVALID', `--pull-retry "${v}": expected seconds above 0 and at most 86400 (e.g. 30, 0.5)`);
  return Math.round(s * 1000);
}

/**
 * The pulls of one serving process. engines/pull-background.js (and image/repobacking.js, the repository
 * code under it) is imported only when a device reads from a backup, which image/open.ts imported them for
 * already: a worker serving other images never loads them (scripts/bundle-cli.mjs: the worker's bundle keeps
 * them in a chunk of their own).
 */
export class ServePulls {
  private pulls: BackgroundPull[] = [];
  /** The pulls being made (the import of pull-background.js); start() of an older round is void after stop(). */
  private starting: Promise<void> = Promise.resolve();
  private round = 0;

  constructor(
    private readonly config: PullConfig | undefined,
    private readonly busy: () => boolean,
    private readonly log: (line: string) => void,
  ) {}

  /** Starts a pull for each device that is a live restore open for writing. */
  start(images: string[], devices: BlockDevice[]): void {
    if (!devices.some((d) => 'backupBacking' in d && d.backupBacking)) return;
    const round = this.round;
    this.starting = import('../engines/pull-background.js').then(
      ({ BackgroundPull }) => {
        if (round === this.round) this.startEach(BackgroundPull, images, devices);
      },
      (e: unknown) => this.log(`kscinc serve: cannot start pulling from the backups: ${(e as Error).message}`),
    );
  }

  private startEach(Pull: typeof BackgroundPull, images: string[], devices: BlockDevice[]): void {
    const c = this.config ?? { enabled: true, bandwidth: null };
    for (let i = 0; i < devices.length; i++) {
      const p = Pull.of(devices[i]!, path.resolve(images[i]!), { bandwidth: c.bandwidth, off: !c.enabled, retryMs: c.retryMs, busy: this.busy, log: this.log });
      if (!p) continue;
      if (c.enabled) this.log(`kscinc serve: pulling the rest of ${images[i]} from its backup${c.bandwidth ? ` (at most ${formatSize(c.bandwidth)}/s)` : ''}`);
      p.start();
      this.pulls.push(p);
    }
  }

  /** Stops every pull (reads started finish, fills are flushed); call before closing the devices. */
  async stop(): Promise<void> {
    this.round++;
    await this.starting;
    const ps = this.pulls;
    this.pulls = [];
    await Promise.all(ps.map((p) => p.stop()));
  }

  status(): PullStatus[] {
    return this.pulls.map((p) => p.status());
  }
}

/** The pull lines of `kscinc status IMAGE`. */
export function printPull(image: string, pulls: PullStatus[] | undefined): void {
  const p = pulls?.find((x) => x.image === path.resolve(image));
  if (!p) {
    println('pull:        none (the image does not read from a backup)');
    return;
  }
  const pct = p.totalBytes > 0 ? ((100 * p.localBytes) / p.totalBytes).toFixed(1) : '100.0';
  println(`pull:        ${p.state}, ${formatSize(p.localBytes)} of ${formatSize(p.totalBytes)} local (${pct} %), ${p.localChunks}/${p.totalChunks} chunks of backup ${p.backup}`);
  println(`  rate:      ${formatSize(p.rate)}/s${p.bandwidth ? ` (limit ${formatSize(p.bandwidth)}/s)` : ''}, ${formatSize(p.fetchedBytes)} read from the repository`);
  if (p.error) println(`  error:     ${p.error}`);
}
