/**
 * The schedule daemon: runs due jobs, prunes after each success, retries failures with backoff, catches up
 * once on what it missed while it was not running, and on shutdown runs the `on shutdown` jobs within a
 * time budget.
 *
 * Design notes. One loop: start what is due (at most `parallel` jobs at a time), then sleep on the injected
 * Clock until the next due time or until something changes (a job ends, shutdown is asked for). Time comes
 * only from the Clock, so tests drive the daemon with a fake one while the backups are real. A job backs up
 * its images one after the other; a per-disk mutex keeps two jobs off the same image and a per-repository
 * reader-writer lock keeps prune away from backups of this daemon. The state file (state.ts) is written
 * when a run starts and when it ends; the scheduled times a run covers are marked done only at its end.
 * The daemon never prints: every event goes to `log` as one line starting with an ISO time.
 */
import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { isKscError } from '../../errors.js';
import type { ScheduleConfig, ScheduleJob } from './config.js';
import type { BackupImageFn, PruneFn, ReplicateImageFn } from './actions.js';
import { expandImages } from './glob.js';
import { KeyedMutex, KeyedRwLock } from '../../util/concurrency.js';
import { countRuns, dueOf, regularNext, retryDelay, type Due } from './plan.js';
import { StateStore, lockState, newJobState, statePathFor, type JobState, type RunKind, type RunRecord } from './state.js';
import { formatDuration } from './duration.js';

export interface Clock {
  now(): number;
  /** Resolves after `ms`, or as soon as `signal` aborts (never rejects). */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise<void>((resolve) => {
      if (signal?.aborted) return resolve();
      const done = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, Math.min(ms, 2 ** 31 - 1)));
      signal?.addEventListener('abort', done, { once: true });
    }),
};

export interface DaemonDeps {
  clock: Clock;
  backupImage: BackupImageFn;
  prune: PruneFn;
  /** Runs a `replicate:` job's cycle (formats/migrate.md §11); without it such jobs fail saying so. */
  replicateImage?: ReplicateImageFn;
  /** One line per event (no newline). */
  log: (line: string) => void;
}

export interface DaemonOptions {
  /** Default `<config>.state.json`. */
  statePath?: string;
  /** Jobs at a time (default: the config's `parallel`). */
  parallel?: number;
  /** Budget for the shutdown phase (default 5 min). */
  shutdownTimeoutMs?: number;
  /** First retry pause (default 1 min), doubling up to retryMaxMs (default 1 h). */
  retryBaseMs?: number;
  retryMaxMs?: number;
  /** Longest single sleep, so a changed wall clock (suspend, NTP) is noticed (default 60 s). */
  maxSleepMs?: number;
}

export interface ShutdownReport {
  /** `on shutdown` jobs that succeeded. */
  done: string[];
  /** `on shutdown` jobs that ran and failed. */
  failed: string[];
  /** Jobs (any kind) given up on at the deadline. */
  unfinished: string[];
}

export const DEFAULT_SHUTDOWN_TIMEOUT_MS = 5 * 60_000;

interface Running {
  job: ScheduleJob;
  kind: RunKind;
  ac: AbortController;
  what: string;
  /** Its result is recorded (only the state write may be under way). */
  finished: boolean;
  done: Promise<void>;
}

const iso = (t: number): string => new Date(t).toISOString();
const msg = (e: unknown): string => (e instanceof Error ? e.message : String(e)).split('\n')[0]!;

export class ScheduleDaemon {
  readonly statePath: string;
  private readonly parallel: number;
  private store: StateStore | null = null;
  private readonly running = new Map<string, Running>();
  private readonly disks = new KeyedMutex();
  private readonly repos = new KeyedRwLock();
  private wake = new AbortController();
  private sleeping = false;
  private stopping = false;
  private closed = false;
  private deadline = Infinity;
  private startedAt = 0;
  private idleWaiters: (() => void)[] = [];
  private readonly report: ShutdownReport = { done: [], failed: [], unfinished: [] };

  constructor(
    readonly config: ScheduleConfig,
    private readonly deps: DaemonDeps,
    private readonly opts: DaemonOptions = {},
  ) {
    this.statePath = opts.statePath ?? statePathFor(config.file);
    this.parallel = Math.max(1, opts.parallel ?? config.parallel);
  }

  private now(): number {
    return this.deps.clock.now();
  }

  private log(line: string): void {
    this.deps.log(`${iso(this.now())} ${line}`);
  }

  private state(job: ScheduleJob): JobState {
    return this.store!.data.jobs[job.name]!;
  }

  private async save(): Promise<void> {
    if (this.closed) return;
    await this.store!.save().catch((e: unknown) => this.log(`could not write the state file ${this.statePath}: ${msg(e)}`));
  }

  /**
   * Runs until shutdown() and the shutdown phase are over; resolves with what the shutdown phase did.
   * KSC_E_LOCKED when another daemon uses the same state file; KSC_E_CORRUPT when the state is unreadable.
   */
  async run(): Promise<ShutdownReport> {
    const release = await lockState(this.statePath);
    try {
      this.store = await StateStore.open(this.statePath);
      this.startedAt = this.now();
      this.adoptState();
      await this.save();
      while (!this.stopping) {
        this.startDue();
        const next = this.nextWake();
        await this.sleep(Math.min(next - this.now(), this.opts.maxSleepMs ?? 60_000));
      }
      return await this.shutdownPhase();
    } finally {
      this.closed = true;
      await release();
    }
  }

  /** Stops starting clock jobs and begins the shutdown phase; a second call ends it now (gives up on what still runs). */
  shutdown(): void {
    if (this.stopping) this.deadline = Math.min(this.deadline, this.now());
    this.stopping = true;
    this.wake.abort();
  }

  /** Resolves when no job runs and the daemon waits for its clock (for tests driving a fake clock). */
  idle(): Promise<void> {
    return new Promise((resolve) => {
      this.idleWaiters.push(resolve);
      this.checkIdle();
    });
  }

  private checkIdle(): void {
    if (this.idleWaiters.length === 0) return;
    setImmediate(() => {
      if (!this.sleeping || this.running.size > 0) return;
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    });
  }

  private async sleep(ms: number): Promise<void> {
    this.wake = new AbortController(); // no await since the caller's checks: a shutdown() or a job's end cannot slip in between
    this.sleeping = true;
    this.checkIdle();
    await this.deps.clock.sleep(Math.max(0, ms), this.wake.signal);
    this.sleeping = false;
  }

  /** New jobs get a state; runs left "running" by a daemon that stopped count as interrupted. */
  private adoptState(): void {
    const now = this.now();
    const jobs = this.store!.data.jobs;
    this.log(`schedule ${this.config.file}: ${this.config.jobs.length} job(s), parallel ${this.parallel}, state ${this.statePath}`);
    for (const job of this.config.jobs) {
      let js = jobs[job.name];
      if (!js) jobs[job.name] = js = newJobState(now);
      if (js.lastRun?.result === 'running') {
        js.lastRun.result = 'failed';
        js.lastRun.error = 'interrupted: the daemon stopped during the run';
        this.log(`job ${job.name}: the run started ${js.lastRun.start} was interrupted (the daemon stopped)${job.when.kind === 'shutdown' ? '' : '; it runs again now'}`);
      }
      if (job.when.kind === 'shutdown') {
        this.log(`job ${job.name}: ${job.when.text}`);
        continue;
      }
      const due = dueOf(job, js, now);
      if (!due) this.log(`job ${job.name}: ${job.when.text} (${job.timezone}): no run to come`);
      else if (due.at <= now) {
        const missed = due.kind === 'retry' ? 0 : countRuns(job, js, Date.parse(js.doneThrough), now);
        this.log(
          `job ${job.name}: ${due.kind === 'retry' ? `retry due since ${iso(due.at)}` : `missed ${missed >= 1000 ? 'over 1000' : missed} run(s) since ${iso(due.at)} while not running; catching up once now`}`,
        );
      } else this.log(`job ${job.name}: ${job.when.text} (${job.timezone}): next ${due.kind === 'retry' ? 'retry' : 'run'} ${iso(due.at)}`);
    }
  }

  private nextWake(): number {
    let next = Infinity;
    if (this.running.size >= this.parallel) return next; // a job's end wakes the loop
    for (const job of this.config.jobs) {
      if (this.running.has(job.name)) continue;
      const due = dueOf(job, this.state(job), this.now());
      if (due) next = Math.min(next, due.at);
    }
    return next;
  }

  private startDue(): void {
    const now = this.now();
    const due: { job: ScheduleJob; due: Due }[] = [];
    for (const job of this.config.jobs) {
      if (this.running.has(job.name)) continue;
      const d = dueOf(job, this.state(job), now);
      if (d && d.at <= now) due.push({ job, due: d });
    }
    due.sort((a, b) => a.due.at - b.due.at);
    for (const { job, due: d } of due) {
      if (this.running.size >= this.parallel) break;
      const kind: RunKind = d.kind === 'scheduled' && d.scheduled < this.startedAt ? 'catch-up' : d.kind;
      this.start(job, kind, d.scheduled, d.images);
    }
  }

  private start(job: ScheduleJob, kind: RunKind, scheduled: number | null, images: string[] | null): void {
    const r: Running = { job, kind, ac: new AbortController(), what: 'starting', finished: false, done: Promise.resolve() };
    this.running.set(job.name, r);
    r.done = this.runJob(r, scheduled, images)
      .catch((e: unknown) => this.log(`job ${job.name}: internal error: ${msg(e)}`))
      .finally(() => {
        if (this.running.get(job.name) === r) this.running.delete(job.name);
        this.wake.abort();
        this.checkIdle();
      });
  }

  private async diskKey(image: string): Promise<string> {
    return realpath(image).catch(() => resolve(image));
  }

  private async runJob(r: Running, scheduled: number | null, only: string[] | null): Promise<void> {
    const { job, kind } = r;
    const js = this.state(job);
    const start = this.now();
    const rec: RunRecord = { kind, scheduled: scheduled === null ? null : iso(scheduled), start: iso(start), end: null, result: 'running', backups: [], errors: [], error: null };
    js.lastRun = rec;
    this.log(`job ${job.name}: ${kind} run started${scheduled === null ? '' : ` (scheduled ${iso(scheduled)})`}`);
    await this.save();

    let images: string[] = [];
    try {
      images = only ?? (await expandImages(job.images, `job "${job.name}"`));
    } catch (e) {
      rec.error = msg(e);
    }
    try {
      await this.backupImages(r, images, rec);
      if (!this.closed && rec.error === null && rec.errors.length === 0 && images.length > 0 && job.keep) await this.pruneAfter(r, rec);
    } catch (e) {
      rec.error = `internal error: ${msg(e)}`; // recorded like any failure, so the run is not restarted at once
    }
    if (this.closed) return; // given up on at the shutdown deadline: the state says "running"
    const ok = rec.error === null && rec.errors.length === 0 && images.length > 0;
    this.finish(r, rec, ok, start, images);
    await this.save();
  }

  /** Backs up `images` one after the other, each under its disk's mutex; records each result in `rec`. */
  private async backupImages(r: Running, images: string[], rec: RunRecord): Promise<void> {
    const { job } = r;
    const js = this.state(job);
    const tags = [`schedule:${job.name}`, ...job.tags];
    for (const image of images) {
      if (r.ac.signal.aborted) break;
      r.what = `waiting for disk ${image}`;
      const releaseDisk = await this.disks.acquire(await this.diskKey(image));
      const releaseRepo = await this.repos.shared(job.repo);
      const img = (js.images[image] ??= {});
      try {
        if (r.ac.signal.aborted) break;
        const t = this.now();
        const id = job.replicate ? await this.replicateOne(r, image) : await this.backupOne(r, image, tags);
        rec.backups.push({ image, id });
        img.lastSuccess = iso(t);
        img.lastBackup = id;
        delete img.lastError;
      } catch (e) {
        const text = isKscError(e) ? `${e.code}: ${msg(e)}` : msg(e);
        rec.errors.push({ image, error: text });
        img.lastError = text;
        this.log(`job ${job.name}: ${job.replicate ? 'replication' : 'backup'} of ${image} failed: ${text}`);
      } finally {
        releaseRepo();
        releaseDisk();
      }
    }
  }

  private async backupOne(r: Running, image: string, tags: string[]): Promise<string> {
    const { job } = r;
    r.what = `backing up ${image}`;
    const b = await this.deps.backupImage(image, job.repo, { bitmap: job.bitmap, tags, signal: r.ac.signal, encrypt: job.encrypt });
    this.log(`job ${job.name}: backup ${b.id} of ${image} -> ${job.repo}`);
    return b.id;
  }

  /** A `replicate:` job's run: one cycle; its id in the run record is `replica@` and the consistent point. */
  private async replicateOne(r: Running, image: string): Promise<string> {
    const { job } = r;
    if (!this.deps.replicateImage) throw new Error('this daemon cannot run replicate jobs');
    r.what = `replicating ${image}`;
    const c = await this.deps.replicateImage(image, job.replicate!, { ...job.target, signal: r.ac.signal });
    this.log(`job ${job.name}: replica of ${image} at ${job.replicate} consistent at ${c.consistentAt}`);
    return `replica@${c.consistentAt}`;
  }

  private async pruneAfter(r: Running, rec: RunRecord): Promise<void> {
    const { job } = r;
    r.what = 'pruning';
    const release = await this.repos.exclusive(job.repo);
    try {
      const p = await this.deps.prune(job.repo, job.keep!, { timeZone: job.timezone });
      rec.pruned = p.removed.length;
      this.log(`job ${job.name}: prune of ${job.repo} removed ${p.removed.length} backup(s)`);
    } catch (e) {
      rec.pruneError = msg(e);
      this.log(`job ${job.name}: prune of ${job.repo} failed (the backups are kept): ${rec.pruneError}`);
    } finally {
      release();
    }
  }

  private finish(r: Running, rec: RunRecord, ok: boolean, start: number, images: string[]): void {
    const { job, kind } = r;
    const js = this.state(job);
    const end = this.now();
    r.finished = true;
    rec.end = iso(end);
    rec.result = ok ? 'ok' : 'failed';
    if (!ok && rec.error === null) rec.error = rec.errors.length > 0 ? `${rec.errors.length} of ${images.length} image(s) failed: ${rec.errors[0]!.error}` : 'no image to back up';
    if (kind === 'scheduled' || kind === 'catch-up') js.doneThrough = iso(Math.max(Date.parse(js.doneThrough), start));
    js.retryAt = null;
    if (kind === 'scheduled' || kind === 'catch-up') js.retryStep = 0; // each regular run starts its own backoff
    if (ok) {
      js.attempts = 0;
      js.retryStep = 0;
      js.retryImages = [];
      js.retryScheduled = null;
      js.lastSuccess = rec.end;
      this.log(`job ${job.name}: ok, ${rec.backups.length} ${job.replicate ? 'replication cycle(s)' : 'backup(s)'} in ${formatDuration(end - start)}`);
      if (kind === 'shutdown') this.report.done.push(job.name);
      return;
    }
    js.attempts++;
    if (kind === 'shutdown') {
      this.report.failed.push(job.name);
      this.log(`job ${job.name}: failed: ${rec.error}`);
      return;
    }
    // Retry the images that failed (all of them when the list could not be made).
    js.retryImages = rec.errors.map((e) => e.image);
    js.retryScheduled = rec.scheduled;
    js.retryStep++;
    const retryAt = end + retryDelay(js.retryStep, this.opts.retryBaseMs ?? 60_000, this.opts.retryMaxMs ?? 3_600_000);
    const reg = regularNext(job, js);
    if (reg !== null && retryAt >= reg) {
      this.log(`job ${job.name}: failed (attempt ${js.attempts}): ${rec.error}; no retry before the next regular run at ${iso(reg)}`);
    } else {
      js.retryAt = iso(retryAt);
      this.log(`job ${job.name}: failed (attempt ${js.attempts}): ${rec.error}; retry in ${formatDuration(retryAt - end)} at ${js.retryAt}`);
    }
  }

  /** Runs the `on shutdown` jobs (and lets running ones end) until done or the budget is spent. */
  private async shutdownPhase(): Promise<ShutdownReport> {
    const budget = this.opts.shutdownTimeoutMs ?? DEFAULT_SHUTDOWN_TIMEOUT_MS;
    this.deadline = Math.min(this.deadline, this.now() + budget);
    const queue = this.config.jobs.filter((j) => j.when.kind === 'shutdown');
    this.log(`shutdown: no new clock runs; ${this.running.size} run(s) in progress, ${queue.length} on-shutdown job(s) to run; budget ${formatDuration(budget)}`);
    while ((queue.length > 0 || this.running.size > 0) && this.now() < this.deadline) {
      while (queue.length > 0 && this.running.size < this.parallel) this.start(queue.shift()!, 'shutdown', null, null);
      await this.sleep(this.deadline - this.now());
    }
    for (const r of this.running.values()) {
      if (r.finished) continue;
      this.log(`job ${r.job.name}: could not finish before the shutdown deadline (${r.what}); given up`);
      r.ac.abort();
      this.report.unfinished.push(r.job.name);
      if (r.kind === 'shutdown') {
        const rec = this.state(r.job).lastRun;
        if (rec) Object.assign(rec, { result: 'failed', end: iso(this.now()), error: `not finished before the shutdown deadline (${r.what})` });
      }
    }
    for (const job of queue) {
      this.log(`job ${job.name}: could not finish before the shutdown deadline (not started)`);
      this.report.unfinished.push(job.name);
    }
    await this.save();
    this.closed = true;
    this.log(`shutdown: done (${this.report.done.length} on-shutdown job(s) ok, ${this.report.failed.length} failed, ${this.report.unfinished.length} unfinished)`);
    return this.report;
  }
}
