/**
 * What is due, computed from a job and its state alone (pure, so the daemon, `schedule status` and the
 * tests agree). A job's regular run is the first scheduled time after `doneThrough`; a pending retry goes
 * first while it is earlier than that. Several missed times give one due run (the earliest): running it
 * marks every time up to its start done.
 */
import type { ScheduleJob } from './config.js';
import type { JobState, RunKind, RunRecord } from './state.js';
import { nextRun, nextRuns } from './when.js';
import { matchesPattern } from './glob.js';

export interface Due {
  at: number;
  kind: Exclude<RunKind, 'shutdown' | 'catch-up'>;
  /** The scheduled time served. */
  scheduled: number;
  /** Images to back up; null: all the job's images. */
  images: string[] | null;
}

const ms = (iso: string): number => Date.parse(iso);

/** The first regular run strictly after `after` (default: what the state marks done). */
export function regularNext(job: ScheduleJob, js: JobState, after: number = ms(js.doneThrough)): number | null {
  return nextRun(job.when, job.timezone, after, ms(js.firstSeen));
}

/**
 * The next run of a clock job, or null (on shutdown, or a one-time job that is done). With `now`, a regular
 * run already due wins over a retry (it backs up every image).
 */
export function dueOf(job: ScheduleJob, js: JobState, now?: number): Due | null {
  if (job.when.kind === 'shutdown') return null;
  const reg = regularNext(job, js);
  const retry = js.retryAt !== null ? ms(js.retryAt) : null;
  const regularDueNow = reg !== null && now !== undefined && reg <= now;
  if (retry !== null && !regularDueNow && (reg === null || retry < reg)) {
    return { at: retry, kind: 'retry', scheduled: js.retryScheduled !== null ? ms(js.retryScheduled) : retry, images: js.retryImages.length > 0 ? js.retryImages : null };
  }
  return reg === null ? null : { at: reg, kind: 'scheduled', scheduled: reg, images: null };
}

/** Regular times in (after, until], counting at most `cap` (for "missed N runs" messages). */
export function countRuns(job: ScheduleJob, js: JobState, after: number, until: number, cap = 1000): number {
  let n = 0;
  let t: number | null = after;
  while (n < cap && (t = nextRun(job.when, job.timezone, t, ms(js.firstSeen))) !== null && t <= until) n++;
  return n;
}

/** Pause before retry number `attempts` (1 for the first): base, 2×base, 4×base … up to `max`. */
export function retryDelay(attempts: number, baseMs: number, maxMs: number): number {
  return Math.min(maxMs, baseMs * 2 ** Math.min(30, Math.max(0, attempts - 1)));
}

export interface JobStatus {
  job: string;
  when: string;
  timezone: string;
  lastRun: RunRecord | null;
  /** The next clock run (ISO; may be in the past when the daemon is not running), null when none. */
  nextRun: string | null;
  nextRunKind: Due['kind'] | null;
  onShutdown: boolean;
  attempts: number;
  /** The oldest of the images' newest successful backups: every image has a backup at least this new. */
  newestBackup: string | null;
  rpo: string | null;
  /** null when the job has no rpo. */
  rpoMet: boolean | null;
  images: Record<string, { lastSuccess: string | null; lastBackup: string | null; lastError: string | null }>;
}

/** What `schedule status` shows for a job, from its state (undefined: the daemon never saw it). */
export function jobStatus(job: ScheduleJob, js: JobState | undefined, now: number): JobStatus {
  const shutdown = job.when.kind === 'shutdown';
  const images: JobStatus['images'] = {};
  for (const [path, st] of Object.entries(js?.images ?? {})) {
    if (!job.images.some((p) => matchesPattern(path, p))) continue; // no longer part of the job
    images[path] = { lastSuccess: st.lastSuccess ?? null, lastBackup: st.lastBackup ?? null, lastError: st.lastError ?? null };
  }
  const times = Object.values(images).map((i) => (i.lastSuccess ? ms(i.lastSuccess) : null));
  const newest = times.length === 0 || times.some((t) => t === null) ? null : Math.min(...(times as number[]));
  let due: Due | null = null;
  if (js) due = dueOf(job, js, now);
  else if (!shutdown) {
    const t = nextRuns(job.when, job.timezone, now, 1)[0];
    if (t !== undefined) due = { at: t, kind: 'scheduled', scheduled: t, images: null };
  }
  return {
    job: job.name,
    when: job.when.text,
    timezone: job.timezone,
    lastRun: js?.lastRun ?? null,
    nextRun: due ? new Date(due.at).toISOString() : null,
    nextRunKind: due?.kind ?? null,
    onShutdown: shutdown,
    attempts: js?.attempts ?? 0,
    newestBackup: newest === null ? null : new Date(newest).toISOString(),
    rpo: job.rpo ?? null,
    rpoMet: job.rpoMs === undefined ? null : newest !== null && now - newest <= job.rpoMs,
    images,
  };
}
