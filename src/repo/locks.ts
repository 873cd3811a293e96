/**
 * Repository locks (formats/repository.md §8).
 *
 * Design notes. A lock is an object `locks/ID.lock` that its holder re-puts every refresh period. Whether a
 * lock is stale is judged by the *storage's* clock only: its age is the storage time now (the modification
 * time of an object just written: the taker's own lock, or a probe) minus the lock object's modification
 * time (S3 LastModified, a file's mtime). The times written in the body are the writer's clock and are only
 * shown, never compared. A lock of a process of this kernel and pid namespace is also stale when that
 * process is gone or its pid now belongs to a process started at another time; another boot or namespace
 * proves nothing, so there only age counts.
 *
 * The holder measures its own refreshes with the monotonic clock (and the wall clock, which keeps running
 * through a suspend): once a successful refresh is more than a deadline (half the lifetime) older than
 * now, or than the next one, the lock may have looked stale to someone, and the lock is lost for good —
 * check() throws and the writer must not commit. On a local folder every lock also holds an flock on the
 * folder (ObjectStore.hostLock), which lets an exclusive taker work when its lock object cannot be written
 * (a full file system): rule 7.
 */
import { getSmall } from '../objstore/small-object.js';
import { hostname } from 'node:os';
import { KscError, isKscError } from '../errors.js';
import type { HostLock, ObjectStore } from '../objstore/types.js';
import { pidAlive, processIdentity, processStartTicks } from '../util/process.js';
import { isoUtc } from '../util/time.js';
import { randomHexId } from './constants.js';

/** §8: the lifetime of a lock not refreshed (tests may shorten it with KSCINC_LOCK_STALE_MS, ≥ 1 s). */
export const STALE_MS = lifetimeFromEnv() ?? 10 * 60 * 1000;

function lifetimeFromEnv(): number | null {
  const v = Number(process.env.KSCINC_LOCK_STALE_MS);
  return Number.isSafeInteger(v) && v >= 1000 ? v : null;
}

/** Lock objects need not survive a power cut (every holder is gone then): no fsyncs for them. */
const LEASE = { durable: false } as const;

export const lockKey = (id: string): string => `locks/${id}.lock`;
const LOCK_KEY_RE = /^locks\/[0-9a-zA-Z_-]+\.lock$/;
const PROBE_KEY_RE = /^locks\/[0-9a-f]{32}\.clock$/;

/** The clocks a lock uses; tests inject skewed or paused ones. `wall` is only written into bodies and used for the holder's deadline. */
export interface LockClock {
  wall(): number;
  mono(): number;
}
export const systemLockClock: LockClock = { wall: () => Date.now(), mono: () => performance.now() };

export interface LockTiming {
  /** Lifetime: a lock not refreshed for this long (storage clock) is stale. */
  staleMs: number;
  clock: LockClock;
}

/** A lock as listed: its body's fields (`created`/`refreshed` are the holder's clock: shown, never compared). */
export interface LockInfo extends Pick<LockBody, 'kind' | 'host' | 'pid' | 'created' | 'refreshed' | 'what'> {
  key: string;
  /** Storage time since the object was last written. */
  ageMs: number;
  /** Not a lock at all (unreadable, not JSON, no valid kind): never counts as live. */
  garbage: boolean;
  stale: boolean;
  /** Why it is stale, or why it counts as live. */
  reason: string;
}

interface LockBody {
  kind: 'shared' | 'exclusive';
  host: string;
  pid: number;
  created: number;
  refreshed: number;
  what: string;
  boot?: string;
  pidns?: string;
  start?: number;
}

const minutes = (ms: number): string => `${(ms / 60_000).toFixed(1)} min`;

/** Judges one lock object (§8 rule 3) at storage time `now`. */
/**
 * A lock object whose read failed (KSC_E_IO): its body is unknown, not bad, so it is not garbage. It counts
 * as a live exclusive lock (it blocks every taker, and prune) until the storage's clock says it is stale by
 * its age; `repo unlock --force` removes it earlier.
 */
export function judgeUnreadable(key: string, why: string, mtimeMs: number, now: number, staleMs: number): LockInfo {
  const ageMs = Math.max(0, now - mtimeMs);
  const base = { key, ageMs, kind: 'exclusive' as const, host: '?', pid: 0, what: '', created: mtimeMs, refreshed: mtimeMs, garbage: false };
  if (ageMs > staleMs) return { ...base, stale: true, reason: `could not be read (${why}) and not refreshed for ${minutes(ageMs)} by the storage's clock (lifetime ${minutes(staleMs)})` };
  return { ...base, stale: false, reason: `could not be read (${why}): counted as a live lock until stale by its age (${minutes(ageMs)} of ${minutes(staleMs)})` };
}

export function judgeLock(key: string, raw: Buffer | null, mtimeMs: number, now: number, staleMs: number): LockInfo {
  let body: Partial<LockBody> | null = null;
  try {
    const v: unknown = raw ? JSON.parse(raw.toString('utf8')) : null;
    if (v && typeof v === 'object' && !Array.isArray(v)) body = v as Partial<LockBody>;
  } catch {
    body = null;
  }
  const ageMs = Math.max(0, now - mtimeMs);
  const num = (v: unknown, dflt: number): number => (typeof v === 'number' && Number.isSafeInteger(v) ? v : dflt);
  const base = {
    key,
    ageMs,
    host: String(body?.host ?? '?'),
    pid: num(body?.pid, 0),
    what: String(body?.what ?? ''),
    created: num(body?.created, mtimeMs),
    refreshed: num(body?.refreshed, mtimeMs),
  };
  if (!body || (body.kind !== 'shared' && body.kind !== 'exclusive') || !LOCK_KEY_RE.test(key)) {
    return { ...base, kind: 'shared', garbage: true, stale: true, reason: 'not a lock object (unreadable or not a lock body): never a live lock' };
  }
  const info = { ...base, kind: body.kind, garbage: false };
  if (ageMs > staleMs) return { ...info, stale: true, reason: `not refreshed for ${minutes(ageMs)} by the storage's clock (lifetime ${minutes(staleMs)})` };
  const self = processIdentity();
  const here = body.host === hostname() && typeof body.pid === 'number' && body.boot !== undefined && body.boot === self.boot && body.pidns !== undefined && body.pidns === self.pidns;
  if (here) {
    if (!pidAlive(body.pid!)) return { ...info, stale: true, reason: `process ${body.pid} of this host (same boot and pid namespace) is gone` };
    const start = processStartTicks(body.pid!);
    if (typeof body.start === 'number' && start !== null && start !== body.start) {
      return { ...info, stale: true, reason: `pid ${body.pid} of this host now belongs to another process (started at tick ${start}, the holder at ${body.start})` };
    }
    return { ...info, stale: false, reason: `process ${body.pid} of this host is running (refreshed ${minutes(ageMs)} ago)` };
  }
  const where = body.host === hostname() ? 'this host name, but another boot or pid namespace' : `host ${String(body.host)}`;
  return { ...info, stale: false, reason: `refreshed ${minutes(ageMs)} ago by the storage's clock (${where}: only its age can tell)` };
}

export class RepoLock {
  private timer: NodeJS.Timeout | null = null;
  private failed: unknown = null;
  /** The refresh in flight, if any (release waits for it: a put landing after the delete would bring the lock back). */
  private refreshing: Promise<void> | null = null;
  /** The clocks at the start of the last refresh that succeeded. */
  private lastOk: { mono: number; wall: number };

  /**
   * `storageNow`: the storage's time when the lock was taken (its own object's modification time). `host`:
   * the folder lock held with it, if any. `written`: false when the object could not be written (rule 7).
   */
  constructor(
    private readonly store: ObjectStore,
    readonly key: string,
    private readonly body: LockBody,
    private readonly timing: LockTiming,
    private readonly host: HostLock | null,
    readonly storageNow: number,
    readonly written = true,
    startedAt?: { mono: number; wall: number },
    /** The other lock objects the listing this lock was taken with showed (prune counts them, §9.2 rule 4). */
    readonly othersAtTaking: readonly LockInfo[] = [],
  ) {
    this.lastOk = startedAt ?? { mono: timing.clock.mono(), wall: timing.clock.wall() };
  }

  /** §8 rule 4: no refresh may be late by more than this (the holder's own clocks). */
  get deadlineMs(): number {
    return this.timing.staleMs / 2;
  }

  private elapsed(from: { mono: number; wall: number }, to: { mono: number; wall: number }): number {
    return Math.max(to.mono - from.mono, to.wall - from.wall);
  }

  /** §8 rule 2: refresh in the background; a failed or late refresh loses the lock for good. */
  startRefresh(everyMs = this.timing.staleMs / 6): void {
    if (!this.written) return;
    this.timer = setInterval(() => void this.refresh(), everyMs);
    this.timer.unref();
  }

  private refresh(): Promise<void> {
    if (this.refreshing || this.failed) return this.refreshing ?? Promise.resolve();
    this.refreshing = this.refreshOnce().finally(() => (this.refreshing = null));
    return this.refreshing;
  }

  private async refreshOnce(): Promise<void> {
    const start = { mono: this.timing.clock.mono(), wall: this.timing.clock.wall() };
    try {
      this.late(start);
      this.body.refreshed = start.wall;
      await this.store.put(this.key, Buffer.from(JSON.stringify(this.body)), LEASE);
      if (!this.failed) this.lastOk = start;
    } catch (e) {
      this.failed ??= e;
    }
  }

  private late(now: { mono: number; wall: number }): void {
    const gap = this.elapsed(this.lastOk, now);
    if (gap > this.deadlineMs && !this.failed) {
      this.failed = new Error(
        `no refresh for ${(gap / 1000).toFixed(1)} s (deadline ${(this.deadlineMs / 1000).toFixed(1)} s: the process was paused or the storage was slow), so the lock may have looked stale to others`,
      );
    }
  }

  /** Throws KSC_E_LOCKED if the lock could not be kept (a refresh failed or was late, §8 rule 4). */
  check(): void {
    if (this.written) this.late({ mono: this.timing.clock.mono(), wall: this.timing.clock.wall() }); // else: the folder lock holds
    if (this.failed) throw new KscError('KSC_E_LOCKED', `lost the repository lock ${this.key}: ${(this.failed as Error).message}; nothing was committed`, { cause: this.failed });
  }

  async release(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.refreshing;
    if (this.written) await this.store.delete(this.key, LEASE).catch(() => undefined);
    await this.host?.release().catch(() => undefined);
  }
}

/** The storage's time now: the modification time of a probe object written for it (then removed). */
export async function storageNow(store: ObjectStore): Promise<number> {
  const key = `locks/${randomHexId()}.clock`;
  await store.put(key, Buffer.alloc(0), LEASE);
  try {
    const st = await store.stat(key);
    if (!st) throw new KscError('KSC_E_IO', `${store.name}: the clock probe ${key} vanished right after it was written`);
    return st.mtimeMs;
  } finally {
    await store.delete(key, LEASE).catch(() => undefined);
  }
}

/**
 * Every object under `locks/` judged at storage time `now` (default: a probe's). Probes of other takers
 * are skipped while younger than the lifetime (garbage afterwards). `own`: this process's lock key, whose
 * modification time is the storage time when `now` is absent.
 */
export async function listLocks(store: ObjectStore, timing: LockTiming, now?: number, own?: string): Promise<LockInfo[]> {
  return (await scanLocks(store, timing, now, own)).locks;
}

/** listLocks, and the storage time it judged them at. `ownBody`: the body of lock `own` as this process put it (not read back). */
export async function scanLocks(store: ObjectStore, timing: LockTiming, now?: number, own?: string, ownBody?: LockBody): Promise<{ now: number; locks: LockInfo[] }> {
  const objects: { key: string; size: number; mtimeMs: number }[] = [];
  for await (const o of store.list('locks/')) objects.push(o);
  let t = now ?? objects.find((o) => o.key === own)?.mtimeMs;
  if (t === undefined) {
    try {
      t = await storageNow(store);
    } catch (e) {
      // A local folder that cannot take a probe (full, read-only): its mtimes come from this kernel's clock.
      if (!store.hostLock || !isKscError(e)) throw e;
      t = timing.clock.wall();
    }
  }
  const out: LockInfo[] = [];
  for (const o of objects) {
    if (PROBE_KEY_RE.test(o.key) && t - o.mtimeMs <= timing.staleMs) continue;
    if (o.key === own && ownBody) {
      // Its body is the one just put: not read back (a round trip of every lock taken, issue 18).
      out.push(judgeLock(o.key, Buffer.from(JSON.stringify(ownBody)), o.mtimeMs, t, timing.staleMs));
      continue;
    }
    let raw: Buffer | null = null;
    try {
      raw = await getSmall(store, o.key, 'lock', o.size);
    } catch (e) {
      if (isKscError(e, 'KSC_E_NOT_FOUND')) continue; // released meanwhile
      if (isKscError(e, 'KSC_E_IO')) {
        // Not read, so not known to be garbage: live (of either kind) until stale by its age.
        out.push(judgeUnreadable(o.key, e.message, o.mtimeMs, t, timing.staleMs));
        continue;
      }
      if (!isKscError(e) || !['KSC_E_CORRUPT', 'KSC_E_FORMAT'].includes(e.code)) throw e;
    }
    out.push(judgeLock(o.key, raw, o.mtimeMs, t, timing.staleMs));
  }
  return { now: t, locks: out };
}

/**
 * §8 rules 1 and 7: takes a lock or fails with KSC_E_LOCKED naming the holder. With `waitMs`, a taker
 * blocked by a live lock tries again every few seconds for that long (readers wait for a prune).
 */
export async function takeLock(store: ObjectStore, timing: LockTiming, kind: 'shared' | 'exclusive', what: string, opts: { waitMs?: number } = {}): Promise<RepoLock> {
  const until = timing.clock.mono() + (opts.waitMs ?? 0);
  for (let attempt = 0; ; attempt++) {
    try {
      return await tryLock(store, timing, kind, what);
    } catch (e) {
      if (!isKscError(e, 'KSC_E_LOCKED') || timing.clock.mono() >= until) throw e;
    }
    await new Promise((r) => setTimeout(r, Math.min(5000, 250 * 2 ** Math.min(attempt, 4))));
  }
}

async function tryLock(store: ObjectStore, timing: LockTiming, kind: 'shared' | 'exclusive', what: string): Promise<RepoLock> {
  const host = store.hostLock ? await store.hostLock(kind === 'exclusive') : null;
  if (host === null && store.hostLock) {
    // Name the holder from its lock object when there is one (the folder lock itself says nothing).
    const live = (await listLocks(store, timing, timing.clock.wall()).catch(() => [] as LockInfo[])).filter((l) => !l.stale && (kind === 'exclusive' || l.kind === 'exclusive'));
    throw lockedError(store, live[0] ?? null, `another kscinc process of this host holds the folder lock (${kind === 'exclusive' ? 'any lock blocks an exclusive one' : 'an exclusive lock'})`);
  }
  const key = lockKey(randomHexId());
  const startedAt = { mono: timing.clock.mono(), wall: timing.clock.wall() };
  const id = processIdentity();
  const body: LockBody = { kind, host: hostname(), pid: process.pid, created: startedAt.wall, refreshed: startedAt.wall, what, ...id };
  let written = true;
  try {
    await store.put(key, Buffer.from(JSON.stringify(body)), LEASE);
  } catch (e) {
    // Rule 7: an exclusive taker holding the folder lock may work without its object on a full file system.
    if (!(isKscError(e, 'KSC_E_NO_SPACE') && kind === 'exclusive' && host?.effective)) {
      await host?.release();
      throw e;
    }
    written = false;
  }
  let others;
  let now: number;
  try {
    // Without its own object, the storage time is the host's: a local folder's mtimes come from this kernel.
    const scan = await scanLocks(store, timing, written ? undefined : timing.clock.wall(), key, body);
    others = scan.locks.filter((l) => l.key !== key);
    now = scan.now;
  } catch (e) {
    if (written) await store.delete(key, LEASE).catch(() => undefined);
    await host?.release();
    throw e;
  }
  const lock = new RepoLock(store, key, body, timing, host, now, written, startedAt, others);
  const blocking = others.filter((l) => !l.stale && (kind === 'exclusive' || l.kind === 'exclusive'));
  if (blocking.length > 0) {
    await lock.release();
    throw lockedError(store, blocking[0]!, '');
  }
  lock.startRefresh();
  return lock;
}

/** How long a reader waits for a prune's exclusive lock to go. */
export const READER_WAIT_MS = 30 * 60_000;

/**
 * §8 rule 6: a reader's shared lock (restore, verify), waiting up to `waitMs` for a prune to end. Null when
 * the lock object cannot be written at all (a read-only repository): the reader then goes on without one.
 * Needs only the store (a live restore's open takes it while the config is read).
 */
export async function readerLockOn(store: ObjectStore, timing: LockTiming, what: string, waitMs = READER_WAIT_MS): Promise<RepoLock | null> {
  try {
    return await takeLock(store, timing, 'shared', what, { waitMs });
  } catch (e) {
    if (isKscError(e, 'KSC_E_LOCKED') || !isKscError(e) || e.code === 'KSC_E_UNAVAILABLE') throw e;
    return null;
  }
}

function lockedError(store: ObjectStore, l: LockInfo | null, why: string): KscError {
  const holder = l ? `${l.what || 'another writer'} (${l.kind}, host ${l.host}, pid ${l.pid}, since ${isoUtc(l.created)}: ${l.reason})` : 'another kscinc process';
  return new KscError('KSC_E_LOCKED', `repository ${store.name} is locked by ${holder}${why ? `; ${why}` : ''}; try again later, or remove a stale lock with "kscinc repo unlock"`);
}

/**
 * §8 rule 5: deletes stale locks and garbage lock objects (every lock with `force`); returns what it
 * removed and what it kept, each with the reason.
 */
export async function unlockStale(store: ObjectStore, timing: LockTiming, force = false): Promise<{ removed: LockInfo[]; kept: LockInfo[] }> {
  const removed: LockInfo[] = [];
  const kept: LockInfo[] = [];
  for (const l of await listLocks(store, timing)) {
    if (force || l.stale) {
      await store.delete(l.key);
      removed.push(l);
    } else kept.push(l);
  }
  return { removed, kept };
}
