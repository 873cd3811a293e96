/**
 * The schedule's state file, `<config>.state.json`: per job when it was first seen, which scheduled times
 * are done, the last run and its result, the pending retry, and the newest successful backup of each image.
 * A restart reads it to know what already ran (and so what it missed while it was down).
 *
 * Write ordering: the whole file is replaced atomically (temp file in the same folder, fsync, rename,
 * fsync the folder), so a reader or a restart after a power cut sees the old state or the new one. A run
 * is recorded as "running" when it starts and with its result when it ends, and the scheduled times it
 * covers are marked done only at the end: a run cut short by a crash or a stop is run again on restart.
 * One daemon per state file: `<state>.lock` holds its pid.
 */
import { hostname } from 'node:os';
import { readFile, unlink } from 'node:fs/promises';
import { KscError, ioError } from '../../errors.js';
import { pidAlive } from '../../util/process.js';
import { replaceFile } from '../../io/durable.js';
import { createFile } from '../../io/create.js';

export type RunKind = 'scheduled' | 'catch-up' | 'retry' | 'shutdown';

export interface RunRecord {
  kind: RunKind;
  /** The scheduled time this run serves (ISO); for a retry, the one the failed run served; null on shutdown. */
  scheduled: string | null;
  start: string;
  end: string | null;
  result: 'running' | 'ok' | 'failed';
  backups: { image: string; id: string }[];
  /** Per image that failed. */
  errors: { image: string; error: string }[];
  /** One line: why the run failed. */
  error: string | null;
  /** Backups prune removed after this run, or why prune failed. */
  pruned?: number;
  pruneError?: string;
}

export interface ImageState {
  /** When the newest successful backup of this image started (its point in time). */
  lastSuccess?: string;
  lastBackup?: string;
  lastError?: string;
}

export interface JobState {
  firstSeen: string;
  /** Every scheduled time at or before this instant is done (ran, was merged into a catch-up, or is past). */
  doneThrough: string;
  lastRun: RunRecord | null;
  /** Failed runs in a row. */
  attempts: number;
  /** Failures since the last regular run: the backoff step of the pending retry. */
  retryStep: number;
  retryAt: string | null;
  /** Images a retry backs up (those that failed). */
  retryImages: string[];
  retryScheduled: string | null;
  /** End of the newest run that succeeded. */
  lastSuccess: string | null;
  images: Record<string, ImageState>;
}

export interface StateData {
  version: 1;
  jobs: Record<string, JobState>;
}

export function statePathFor(configFile: string): string {
  return `${configFile}.state.json`;
}

export function newJobState(nowMs: number): JobState {
  const now = new Date(nowMs).toISOString();
  return { firstSeen: now, doneThrough: now, lastRun: null, attempts: 0, retryStep: 0, retryAt: null, retryImages: [], retryScheduled: null, lastSuccess: null, images: {} };
}

function damaged(path: string, why: string): KscError {
  return new KscError('KSC_E_CORRUPT', `schedule state ${path} is damaged (${why}); move it away to start afresh (schedules then count from now)`);
}

const isIso = (v: unknown): boolean => typeof v === 'string' && !Number.isNaN(Date.parse(v));

function checkJob(path: string, name: string, j: unknown): JobState {
  if (typeof j !== 'object' || j === null) throw damaged(path, `job "${name}" is not an object`);
  const o = j as Partial<JobState>;
  if (!isIso(o.firstSeen) || !isIso(o.doneThrough)) throw damaged(path, `job "${name}" has no valid firstSeen/doneThrough`);
  const base = newJobState(Date.parse(o.firstSeen!));
  return {
    ...base,
    ...o,
    attempts: Number.isInteger(o.attempts) ? o.attempts! : 0,
    retryStep: Number.isInteger(o.retryStep) ? o.retryStep! : 0,
    retryAt: isIso(o.retryAt) ? o.retryAt! : null,
    retryImages: Array.isArray(o.retryImages) ? o.retryImages.map(String) : [],
    retryScheduled: isIso(o.retryScheduled) ? o.retryScheduled! : null,
    lastSuccess: isIso(o.lastSuccess) ? o.lastSuccess! : null,
    lastRun: o.lastRun && typeof o.lastRun === 'object' ? o.lastRun : null,
    images: o.images && typeof o.images === 'object' ? o.images : {},
  } as JobState;
}

/** The state at `path`; an empty state when the file does not exist; KSC_E_CORRUPT when unreadable. */
export async function readState(path: string): Promise<StateData> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { version: 1, jobs: {} };
    throw ioError(path, 'reading the schedule state', e);
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw damaged(path, `not JSON: ${(e as Error).message}`);
  }
  const d = data as Partial<StateData>;
  if (typeof d !== 'object' || d === null || d.version !== 1 || typeof d.jobs !== 'object' || d.jobs === null) throw damaged(path, 'expected {"version": 1, "jobs": {...}}');
  const jobs: Record<string, JobState> = {};
  for (const [name, j] of Object.entries(d.jobs)) jobs[name] = checkJob(path, name, j);
  return { version: 1, jobs };
}

/** Replaces `path` with `data` atomically and durably (see the notes at the top). */
export async function writeFileAtomic(path: string, data: string | Buffer): Promise<void> {
  try {
    await replaceFile(path, data);
  } catch (e) {
    throw ioError(path, 'writing', e);
  }
}

/** Serialises the writes of one daemon's state: the newest always lands last. */
export class StateStore {
  private chain: Promise<void> = Promise.resolve();

  constructor(
    readonly path: string,
    readonly data: StateData,
  ) {}

  static async open(path: string): Promise<StateStore> {
    return new StateStore(path, await readState(path));
  }

  /** Writes the current state (a snapshot taken now); resolves when it is durable. */
  save(): Promise<void> {
    const text = JSON.stringify(this.data, null, 2) + '\n';
    const p = this.chain.then(() => writeFileAtomic(this.path, text));
    this.chain = p.catch(() => undefined);
    return p;
  }
}

/**
 * Takes `<statePath>.lock` for this process; KSC_E_LOCKED when a live daemon on this host holds it (a lock
 * of a dead process is taken over). Returns the release function.
 */
export async function lockState(statePath: string): Promise<() => Promise<void>> {
  const lock = `${statePath}.lock`;
  const body = JSON.stringify({ pid: process.pid, host: hostname(), since: new Date().toISOString() }) + '\n';
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fh = await createFile(lock);
      await fh.writeFile(body);
      await fh.close();
      return async () => void (await unlink(lock).catch(() => undefined));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(lock, 'creating the daemon lock', e);
    }
    let holder: { pid?: number; host?: string } = {};
    try {
      holder = JSON.parse(await readFile(lock, 'utf8')) as typeof holder;
    } catch {
      // empty or half written: a daemon that died while taking it
    }
    if (typeof holder.pid === 'number' && (holder.host !== hostname() || pidAlive(holder.pid)) && holder.pid !== process.pid) {
      throw new KscError('KSC_E_LOCKED', `another "kscinc schedule run" (pid ${holder.pid} on ${holder.host ?? '?'}) uses ${statePath}; stop it first (or remove ${lock} if it is gone)`);
    }
    await unlink(lock).catch(() => undefined);
  }
  throw new KscError('KSC_E_LOCKED', `could not take ${lock}: other processes keep creating it`);
}

/** The live daemon (on this host) holding the state file's lock, if any. */
export async function daemonHolder(statePath: string): Promise<{ pid: number; since: string | null } | null> {
  try {
    const h = JSON.parse(await readFile(`${statePath}.lock`, 'utf8')) as { pid?: unknown; host?: unknown; since?: unknown };
    if (typeof h.pid !== 'number' || h.host !== hostname() || !pidAlive(h.pid)) return null;
    return { pid: h.pid, since: typeof h.since === 'string' ? h.since : null };
  } catch {
    return null;
  }
}
