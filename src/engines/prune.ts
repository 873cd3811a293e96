/**
 * Prune: removes backups by retention, then garbage-collects what no remaining backup references
 * (formats/repository.md §9 rule 5): manifests first; then repacked chunks and one new index object of
 * everything still in use; then the index objects it replaces; then packs nothing references. Runs under
 * the exclusive repository lock, so no backup runs meanwhile; and deletes nothing while a manifest cannot
 * be read (§9.2 rule 1). A pack with unreferenced chunks goes only once the GC mark (gc/mark) says it has
 * been unreferenced for a grace period, or it is that old and no other lock exists (§9.2), so the packs of
 * a backup that has not committed yet survive whatever the locks say.
 */
import { KscError } from '../errors.js';
import { Repository, type LockInfo } from '../repo/repository.js';
import { listBackups } from '../repo/catalog.js';
import { garbageRefsError, listLiveRefs, type LiveRefInfo } from '../repo/liverefs.js';
import type { CopyReport } from './copies.js';
import { type KeepPolicy, assertPolicy, selectKeep } from './retention.js';
import { checkListedAgain, collectGarbage, refuseUnseenHolder } from './prune-gc.js';

/** For the CLI, which imports this module when prune runs (retention.js alone would be a chunk of its own). */
export { policyIsEmpty } from './retention.js';

export interface PruneOptions extends KeepPolicy {
  dryRun?: boolean;
  timeZone?: string;
  /** Repack a pack when less than this share of its bytes is still used (default 0.5). */
  repackBelow?: number;
  /** §9.2: how long a pack must have been unreferenced (storage clock) before it goes (default GRACE_MS). */
  graceMs?: number;
  /** Damaged manifests to remove (they then reference nothing); any other damaged manifest stops prune. */
  forgetDamaged?: string[];
  /** Temporary parts of interrupted uploads older than this go (default TEMP_GRACE_MS). */
  tempGraceMs?: number;
  /**
   * Work done of work known, in steps: one per kept backup whose manifest is read to mark what it
   * references (the long part), one per pack repacked or deleted. Called with done === total at the end.
   */
  progress?: (done: number, total: number) => void;
}

/**
 * §9.2: 24 hours. The grace only matters when the locks failed to protect a writer (a clock, a pause, a
 * lock judged stale wrongly); a writer that is not paused commits within the duration of one backup, and a
 * day covers any backup shorter than a day (daily schedules are the common case). Proxmox Backup uses
 * 24 h 5 min for its atime marks, whose extra 5 minutes cover relatime; our marks carry storage times.
 */
export const GRACE_MS = 24 * 3600_000;
/** Temporary parts older than an hour: a part is written in one go, and a writer paused past its lock's lifetime fails anyway. */
export const TEMP_GRACE_MS = 3600_000;

export interface PruneResult {
  kept: { id: string; reasons: string[] }[];
  removed: string[];
  damagedManifests: string[];
  packsDeleted: number;
  packsRepacked: number;
  bytesFreed: number;
  /** Chunks a kept backup needs that no pack holds (the repository was damaged before prune). */
  chunksMissing: number;
  /** Chunks with several copies: which copies were checked, found damaged, or could not be chosen from (§6.1). */
  copies: CopyReport;
  /** Unreferenced (or sparse) packs kept until they have been so for the grace period, and their bytes. */
  packsWaiting: number;
  bytesWaiting: number;
  /** Packs whose contents could not be read (footer damaged, no index names them); prune refuses instead when a kept backup misses chunks. */
  packsUnreadable: string[];
  /** Packs an index object names that the listing did not show; prune refuses instead when a kept backup misses chunks (§9.2 rule 1). */
  packsUnlisted: string[];
  /** Temporary parts of interrupted uploads removed (.tmp files; S3 incomplete multipart uploads), and their bytes (also counted in bytesFreed). */
  tempParts: number;
  tempBytes: number;
  /** Live-restore references (repository.md §8.1): each keeps its backup; stale ones too (said here). */
  liveRefs: { key: string; backup: string; stale: boolean; reason: string }[];
  /** The lock object could not be written (full file system): prune ran under the folder lock alone (§8 rule 7). */
  lockless: boolean;
  dryRun: boolean;
  durationMs: number;
}

/** What prune reads about each backup: only what retention needs (a repository holds many manifests). */
interface BackupMeta {
  id: string;
  disk: string;
  timeMs: number;
}

/**
 * Removes the backups retention does not keep, then garbage-collects (§9 rule 5, §9.2), under the exclusive
 * lock. The steps, in order: check the options; read the backups and the live-restore references and
 * refuse on damage; decide what to keep; then (unless dryRun) find where every chunk lives, mark what the
 * kept backups reference, refuse when it cannot see everything, delete manifests, write the GC mark, delete
 * orphan packs, repack, write the new index, delete what it replaces, sweep temporary parts.
 */
export async function pruneRepo(repo: Repository, opts: PruneOptions): Promise<PruneResult> {
  const t0 = performance.now();
  const { policy, forget, graceMs } = checkOptions(opts);
  const lock = await repo.lock('exclusive', 'prune');
  try {
    // The storage's time now, and whether any other lock object (stale ones too: their writers may come
    // back) exists: both decide which unreferenced packs may go (§9.2).
    const now = lock.storageNow;
    const listed = performance.now();
    const listedNow = (await repo.listLocks(now)).filter((l) => l.key !== lock.key && !l.garbage);
    refuseMissedLock(repo, lock.written, listedNow, "the listing prune's lock took");
    // A live lock the listing prune's lock took did not show: a taker backing off, or a holder that listing
    // missed and that refreshed since (its age then says nothing): looked at again before anything is read.
    const seen = new Set(lock.othersAtTaking.map((l) => l.key));
    if (lock.written) {
      await refuseUnseenHolder(
        repo,
        listedNow.filter((l) => !seen.has(l.key)),
        performance.now() - listed,
      );
    }
    // Rule 4(b) counts a lock any listing showed: the one prune's lock took too (a later one may lose its page).
    const listedKeys = new Set(listedNow.map((l) => l.key));
    const otherLocks = [...listedNow, ...lock.othersAtTaking.filter((l) => !l.garbage && !listedKeys.has(l.key))];
    const { metas, damagedManifests } = await readBackups(repo, forget);
    const { refs, refBy } = await readLiveRefs(repo, now, forget);
    const { kept, removed } = decideKeep(metas, refBy, policy, opts.timeZone);
    const result: PruneResult = {
      kept,
      removed,
      damagedManifests,
      packsDeleted: 0,
      packsRepacked: 0,
      bytesFreed: 0,
      chunksMissing: 0,
      packsWaiting: 0,
      bytesWaiting: 0,
      copies: { chunksWithCopies: 0, copiesChecked: 0, copiesDamaged: [], chunksWithoutGoodCopy: [], chunksUndecided: [] },
      packsUnreadable: [],
      packsUnlisted: [],
      tempParts: 0,
      tempBytes: 0,
      liveRefs: refs.map((r) => ({ key: r.key, backup: r.backup!, stale: r.stale, reason: r.reason })),
      lockless: !lock.written,
      dryRun: !!opts.dryRun,
      durationMs: 0,
    };
    const gc = { opts, graceMs, now, otherLocks, forget, result };
    // A dry run says what a real run would do: it refuses where that would, on what the listings missed.
    if (opts.dryRun) await checkListedAgain(repo, lock, null, gc);
    else await collectGarbage(repo, lock, gc);
    result.durationMs = Math.round(performance.now() - t0);
    return result;
  } finally {
    await lock.release();
  }
}

/**
 * §8 rule 1 again: a live lock whose object is older than prune's own (by storage time) was there when
 * prune's lock listed locks/, and would have blocked it; that listing missed it (a page of an S3 listing
 * lost), so prune runs beside its holder (a restore, a backup): it deletes nothing and fails as the taker
 * would have. A lock put after prune's is a taker that saw prune's and backs off. Without its own lock
 * object (§8 rule 7), prune holds the folder lock and ages say nothing.
 */
export function refuseMissedLock(repo: Repository, ownWritten: boolean, others: LockInfo[], listing: string): void {
  const missed = ownWritten ? others.filter((l) => !l.stale && l.ageMs > 0) : [];
  if (missed.length === 0) return;
  const l = missed[0]!;
  throw new KscError(
    'KSC_E_LOCKED',
    `repository ${repo.name} is locked by ${l.what || 'another writer'} (${l.kind}, host ${l.host}, pid ${l.pid}: ${l.reason}), which ${listing} missed (a listing that lost a page?); prune deleted nothing; try again later`,
  );
}

function checkOptions(opts: PruneOptions): { policy: KeepPolicy; forget: Set<string>; graceMs: number } {
  const policy: KeepPolicy = { last: opts.last, daily: opts.daily, weekly: opts.weekly, monthly: opts.monthly };
  assertPolicy(policy);
  const forget = new Set(opts.forgetDamaged ?? []);
  const graceMs = opts.graceMs ?? GRACE_MS;
  if (!(graceMs >= 0) || !Number.isFinite(graceMs)) throw new KscError('KSC_E_INVALID', `prune grace ${graceMs} ms must be a time ≥ 0`);
  return { policy, forget, graceMs };
}

/**
 * Every backup's id, disk and time. §9.2 rule 1: a manifest that cannot be read may reference anything:
 * nothing is deleted until the user says what to do with it (option forgetDamaged).
 */
async function readBackups(repo: Repository, forget: Set<string>): Promise<{ metas: BackupMeta[]; damagedManifests: string[] }> {
  const damageWhy = new Map<string, string>();
  const metas = await listBackups(
    repo,
    (id, e) => void damageWhy.set(id, e.message),
    (m) => ({ id: m.meta.id, disk: m.disk, timeMs: m.timeMs }),
  );
  const damagedManifests = [...damageWhy.keys()].sort();
  for (const id of forget) {
    if (!damagedManifests.includes(id))
      throw new KscError(
        'KSC_E_INVALID',
        `option forgetDamaged ${id}: ${metas.some((m) => m.id === id) ? 'that backup is readable (only damaged manifests can be forgotten)' : `no backup ${id} in ${repo.name}`}`,
      );
  }
  const unknown = damagedManifests.filter((id) => !forget.has(id));
  if (unknown.length > 0) {
    throw new KscError(
      'KSC_E_CORRUPT',
      `prune deletes nothing while manifests cannot be read: ${unknown.map((id) => damageWhy.get(id)).join('; ')}. Restore them from a copy, or remove them with option forgetDamaged ${unknown.join(' ')} (their backups are then gone and reference nothing)`,
    );
  }
  return { metas, damagedManifests };
}

/**
 * §8.1: a backup that a live-restored image still reads through to is kept, with every chunk it lists,
 * whether or not the image is open; a reference that cannot be read stops prune unless its key names the
 * backup (then that backup is kept). A backup to forget that such a reference names stops prune too.
 */
async function readLiveRefs(repo: Repository, now: number, forget: Set<string>): Promise<{ refs: LiveRefInfo[]; refBy: Map<string, LiveRefInfo[]> }> {
  const refs = await listLiveRefs(repo.store, now);
  const unknownRefs = refs.filter((r) => r.backup === null);
  if (unknownRefs.length > 0) throw garbageRefsError(repo.store, unknownRefs);
  const refBy = new Map<string, LiveRefInfo[]>();
  for (const r of refs) refBy.set(r.backup!, [...(refBy.get(r.backup!) ?? []), r]);
  for (const id of forget) {
    const rs = refBy.get(id);
    if (rs)
      throw new KscError(
        'KSC_E_LOCKED',
        `option forgetDamaged ${id}: a live-restored image still reads through to that backup (${rs.map((r) => `${r.key}: ${r.reason}`).join('; ')}); nothing was deleted`,
      );
  }
  return { refs, refBy };
}

/** Retention per disk, plus every backup a live-restore reference names; both lists sorted by id. */
function decideKeep(metas: BackupMeta[], refBy: Map<string, LiveRefInfo[]>, policy: KeepPolicy, timeZone: string | undefined): { kept: PruneResult['kept']; removed: string[] } {
  const byDisk = new Map<string, BackupMeta[]>();
  for (const m of metas) {
    let l = byDisk.get(m.disk);
    if (!l) byDisk.set(m.disk, (l = []));
    l.push(m);
  }
  const kept: PruneResult['kept'] = [];
  const removed: string[] = [];
  for (const list of byDisk.values()) {
    const keep = selectKeep(
      list.map((m) => ({ id: m.id, timeMs: m.timeMs })),
      policy,
      timeZone,
    );
    for (const m of list) {
      const reasons = keep.get(m.id);
      const liveRefReasons = refBy.get(m.id)?.map((r) => `${r.stale ? 'stale ' : ''}live-restore reference ${r.key} (${r.reason})`) ?? [];
      if (reasons || liveRefReasons.length > 0) kept.push({ id: m.id, reasons: [...(reasons ?? []), ...liveRefReasons] });
      else removed.push(m.id);
    }
  }
  kept.sort((a, b) => (a.id < b.id ? -1 : 1));
  removed.sort();
  return { kept, removed };
}
