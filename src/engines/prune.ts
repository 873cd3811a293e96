/**
 * Prune: removes backups by retention, then garbage-collects what no remaining backup references
 * (formats/repository.md §9 rule 5): manifests first; then repacked chunks and one new index object of
 * everything still in use; then the index objects it replaces; then packs nothing references. Runs under
 * the exclusive repository lock, so no backup runs meanwhile; and deletes nothing while a manifest cannot
 * be read (§9.2 rule 1). A pack with unreferenced chunks goes only once the GC mark (gc/mark) says it has
 * been unreferenced for a grace period, or it is that old and no other lock exists (§9.2), so the packs of
 * a backup that has not committed yet survive whatever the locks say.
 */
import { KscError, isKscError } from '../errors.js';
import { ChunkIndex, Repository, indexKey, packKey } from '../repo/repository.js';
import { mapLimit } from '../util/concurrency.js';
import { readMark, writeMark } from '../repo/gcmark.js';
import { visitIndex, type IndexEntry } from '../repo/index-object.js';
import { BLOB_HEADER as BLOB_HEADER_SIZE } from '../compress/codec.js';
import { listBackups } from '../repo/catalog.js';
import { garbageRefsError, listLiveRefs, type LiveRefInfo } from '../repo/liverefs.js';
import { type CopyReport, chooseCopies } from './copies.js';
import { type KeepPolicy, assertPolicy, selectKeep } from './retention.js';

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

export async function pruneRepo(repo: Repository, opts: PruneOptions): Promise<PruneResult> {
  const t0 = performance.now();
  const policy: KeepPolicy = { last: opts.last, daily: opts.daily, weekly: opts.weekly, monthly: opts.monthly };
  assertPolicy(policy);
  const forget = new Set(opts.forgetDamaged ?? []);
  const graceMs = opts.graceMs ?? GRACE_MS;
  if (!(graceMs >= 0) || !Number.isFinite(graceMs)) throw new KscError('KSC_E_INVALID', `prune grace ${graceMs} ms must be a time ≥ 0`);
  const lock = await repo.lock('exclusive', 'prune');
  try {
    // The storage's time now, and whether any other lock object (stale ones too: their writers may come
    // back) exists: both decide which unreferenced packs may go (§9.2).
    const now = lock.storageNow;
    const otherLocks = (await repo.listLocks(now)).filter((l) => l.key !== lock.key && !l.garbage);
    // Only what retention needs is kept of each manifest (a repository holds many; their chunk lists are
    // read again, a few at a time, for the kept ones below).
    const damageWhy = new Map<string, string>();
    const metas = await listBackups(repo, (id, e) => void damageWhy.set(id, e.message), (m) => ({ id: m.meta.id, disk: m.disk, timeMs: m.timeMs }));
    const damagedManifests = [...damageWhy.keys()].sort();
    // §9.2 rule 1: a manifest that cannot be read may reference anything: nothing is deleted until the user
    // says what to do with it.
    for (const id of forget) {
      if (!damagedManifests.includes(id)) throw new KscError('KSC_E_INVALID', `option forgetDamaged ${id}: ${metas.some((m) => m.id === id) ? 'that backup is readable (only damaged manifests can be forgotten)' : `no backup ${id} in ${repo.name}`}`);
    }
    const unknown = damagedManifests.filter((id) => !forget.has(id));
    if (unknown.length > 0) {
      throw new KscError('KSC_E_CORRUPT', `prune deletes nothing while manifests cannot be read: ${unknown.map((id) => damageWhy.get(id)).join('; ')}. Restore them from a copy, or remove them with option forgetDamaged ${unknown.join(' ')} (their backups are then gone and reference nothing)`);
    }
    // §8.1: a backup that a live-restored image still reads through to is kept, with every chunk it lists,
    // whether or not the image is open; a reference that cannot be read stops prune unless its key names
    // the backup (then that backup is kept).
    const refs = await listLiveRefs(repo.store, now);
    const unknownRefs = refs.filter((r) => r.backup === null);
    if (unknownRefs.length > 0) throw garbageRefsError(repo.store, unknownRefs);
    const refBy = new Map<string, LiveRefInfo[]>();
    for (const r of refs) refBy.set(r.backup!, [...(refBy.get(r.backup!) ?? []), r]);
    for (const id of forget) {
      const rs = refBy.get(id);
      if (rs) throw new KscError('KSC_E_LOCKED', `option forgetDamaged ${id}: a live-restored image still reads through to that backup (${rs.map((r) => `${r.key}: ${r.reason}`).join('; ')}); nothing was deleted`);
    }
    const byDisk = new Map<string, { id: string; disk: string; timeMs: number }[]>();
    for (const m of metas) {
      let l = byDisk.get(m.disk);
      if (!l) byDisk.set(m.disk, (l = []));
      l.push(m);
    }
    const kept: PruneResult['kept'] = [];
    const removed: string[] = [];
    for (const list of byDisk.values()) {
      const keep = selectKeep(list.map((m) => ({ id: m.id, timeMs: m.timeMs })), policy, opts.timeZone);
      for (const m of list) {
        const reasons = keep.get(m.id);
        const liveRefReasons = refBy.get(m.id)?.map((r) => `${r.stale ? 'stale ' : ''}live-restore reference ${r.key} (${r.reason})`) ?? [];
        if (reasons || liveRefReasons.length > 0) kept.push({ id: m.id, reasons: [...(reasons ?? []), ...liveRefReasons] });
        else removed.push(m.id);
      }
    }
    kept.sort((a, b) => (a.id < b.id ? -1 : 1));
    removed.sort();
    const result: PruneResult = {
      kept, removed, damagedManifests, packsDeleted: 0, packsRepacked: 0, bytesFreed: 0, chunksMissing: 0, packsWaiting: 0, bytesWaiting: 0,
      copies: { chunksWithCopies: 0, copiesChecked: 0, copiesDamaged: [], chunksWithoutGoodCopy: [], chunksUndecided: [] },
      packsUnreadable: [], tempParts: 0, tempBytes: 0, liveRefs: refs.map((r) => ({ key: r.key, backup: r.backup!, stale: r.stale, reason: r.reason })), lockless: !lock.written, dryRun: !!opts.dryRun, durationMs: 0,
    };
    if (opts.dryRun) {
      result.durationMs = Math.round(performance.now() - t0);
      return result;
    }
    // 1. Where each chunk lives (the index objects, then the footers of packs no index object names), only
    // in packs that exist, in a compact table; then what the kept backups still reference (a mark a slot).
    const packs = await repo.listPacks();
    const oldIndex = await repo.listIndexObjects();
    const where = new ChunkIndex();
    const damagedIndex: string[] = [];
    const indexedPacks = new Set<string>();
    await mapLimit(oldIndex, 8, async (id) => {
      try {
        visitIndex(await repo.readIndexObject(id), repo.objName(indexKey(id)), (b, at, pack, offset, length, rawLength) => {
          indexedPacks.add(pack);
          if (packs.has(pack)) where.addAt(b, at, pack, offset, length, rawLength);
        });
      } catch (e) {
        if (!isKscError(e)) throw e; // a damaged index object is replaced below; its packs are read as orphans
        damagedIndex.push(indexKey(id));
      }
    });
    const unreadable = new Set<string>();
    await mapLimit([...packs.keys()].filter((p) => !indexedPacks.has(p)), 4, async (p) => {
      try {
        for (const e of await repo.readPackFooter(p, packs.get(p)!.size)) where.addAt(e.id, 0, p, e.offset, e.length, e.rawLength);
      } catch (e) {
        if (!isKscError(e)) throw e;
        unreadable.add(p); // what it holds is unknown
      }
    });
    const live = new Uint8Array(where.slots);
    const missing = new Set<string>();
    // A kept manifest that cannot be read now stops prune here, before anything but the removed manifests is gone.
    let stepsDone = 0;
    let stepsTotal = kept.length;
    const step = (): void => opts.progress?.(++stepsDone, stepsTotal);
    opts.progress?.(0, stepsTotal);
    await mapLimit(kept, 8, async (k) => {
      const m = await repo.readManifest(k.id);
      m.ids.forEachNonZero((_k, cid) => {
        const slot = where.slotOf(cid);
        if (slot >= 0) live[slot] = 1;
        else missing.add(cid.toString('hex'));
      });
      step();
    });
    result.chunksMissing = missing.size;
    missing.clear();
    // §9.2 rule 1: kept backups miss chunks, and what a damaged index object or an unreadable pack holds is
    // unknown: they may be the missing chunks' only trace, so nothing goes until someone looks.
    if (result.chunksMissing > 0 && (damagedIndex.length > 0 || unreadable.size > 0)) {
      const what = [...damagedIndex.sort(), ...[...unreadable].sort().map(packKey)].map((k) => repo.objName(k)).join(', ');
      throw new KscError('KSC_E_CORRUPT', `prune deletes nothing: kept backups miss ${result.chunksMissing} chunk(s), and ${what} cannot be read (they may hold them); run "kscinc verify" and repair or restore those objects first`);
    }

    // Of a chunk with several copies, the one that passes its check (all of them when none does or one
    // could not be read): the copies kept are what the new index names (copy handles, see ChunkIndex).
    const choice = await chooseCopies(repo, where, live);
    result.copies = choice.report;
    lock.check();
    const keptCopies = (slot: number): number[] => choice.keep.get(slot) ?? [slot];

    // 2. Manifests first (the damaged ones it was told to forget too): nothing else is deleted before.
    for (const id of [...removed, ...forget]) await repo.deleteManifest(id);
    lock.check();
    const used = new Map<string, number>();
    for (let slot = 0; slot < live.length; slot++) {
      if (live[slot] !== 1) continue;
      for (const h of keptCopies(slot)) used.set(where.packName(h), (used.get(where.packName(h)) ?? 0) + where.blobLength(h));
    }
    // Packs holding copies prune could not choose between stay as they are (a repack would keep one).
    const pinned = new Set<string>();
    for (const hs of choice.keep.values()) if (hs.length > 1) for (const h of hs) pinned.add(where.packName(h));
    const threshold = opts.repackBelow ?? 0.5;
    // §9.2: a pack with unreferenced chunks goes once it has been unreferenced for the grace period by the
    // mark, or is that old itself and no other lock exists; the others wait in the new mark. A pack whose
    // contents are unknown stays while a kept backup misses chunks (it may hold them).
    const mark = await readMark(repo.store);
    const nextMark = new Map<string, number>();
    const drop: string[] = [];
    const repack: string[] = [];
    for (const [p, info] of packs) {
      const u = used.get(p) ?? 0;
      if (u > 0 && (u >= threshold * info.size || pinned.has(p))) continue;
      if (unreadable.has(p)) result.packsUnreadable.push(p); // unknown contents, but no kept backup misses a chunk
      const since = mark.packs.get(p);
      const old = (since !== undefined && now - since >= graceMs) || (otherLocks.length === 0 && now - info.mtimeMs >= graceMs);
      if (!old) {
        nextMark.set(p, since ?? 0);
        result.packsWaiting++;
        result.bytesWaiting += info.size;
      } else if (u === 0) drop.push(p);
      else repack.push(p);
    }
    result.packsUnreadable.sort();
    // The mark of this scan goes first (a pack's time in it is the mark's own, written after the scan); a
    // full file system may refuse it: then the old mark goes (nothing is old by an empty one) and this one
    // is written once space was freed.
    let markWritten = true;
    try {
      await writeMark(repo.store, nextMark);
    } catch (e) {
      if (!isKscError(e, 'KSC_E_NO_SPACE')) throw e;
      await repo.store.delete('gc/mark');
      markWritten = false;
    }
    lock.check();
    // Packs no index object names go first: nothing finds chunks through them, so the order of §9 rule 5
    // does not concern them, and on a full file system this makes room for the new packs and index.
    const orphans = new Set(drop.filter((p) => !indexedPacks.has(p)));
    stepsTotal += drop.length + repack.length;
    opts.progress?.(stepsDone, stepsTotal);
    for (const p of orphans) {
      await repo.store.delete(packKey(p));
      result.bytesFreed += packs.get(p)!.size;
      step();
    }

    // 3. Repack: copy the live blobs of sparse packs into new packs (checked on the way).
    const writer = repo.packWriter();
    const repackSet = new Set(repack);
    const liveByPack = new Map<string, number[]>();
    for (let slot = 0; slot < live.length; slot++) {
      if (live[slot] !== 1) continue;
      for (const h of keptCopies(slot)) {
        if (!repackSet.has(where.packName(h))) continue;
        let l = liveByPack.get(where.packName(h));
        if (!l) liveByPack.set(where.packName(h), (l = []));
        l.push(h);
      }
    }
    for (const [p, handles] of liveByPack) {
      for (const h of handles) {
        const id = where.idAt(h);
        const blob = await repo.store.getRange(packKey(p), where.blobOffset(h), where.blobLength(h));
        if (blob.length < BLOB_HEADER_SIZE || !blob.subarray(16, 32).equals(id)) {
          if (keptCopies(where.slotOfCopy(h)).length === 1) {
            result.chunksMissing++;
            live[where.slotOfCopy(h)] = 0;
          }
          continue;
        }
        await writer.add(id, blob, where.rawLengthAt(h));
      }
      lock.check();
    }
    await writer.finish();
    const moved = new ChunkIndex();
    for (const e of writer.entries) moved.add(e);
    // Every live chunk where it now lives, and every chunk of a pack that stays (a waiting pack's chunks
    // stay indexed: a writer that has not committed may need them); made as the index object is written.
    const goes = new Set([...drop, ...repack]);
    // A live chunk: the copies chosen above; any other: every copy in a pack that stays.
    const indexedCopies = (slot: number): number[] => (live[slot] === 1 ? keptCopies(slot)
      : where.copies(slot).filter((h) => where.packNumber(h) >= 0 && !goes.has(where.packName(h))));
    const indexed = (slot: number): boolean => live[slot] === 1 || indexedCopies(slot).length > 0;
    const entries = {
      *[Symbol.iterator](): Generator<IndexEntry> {
        for (let slot = 0; slot < live.length; slot++) {
          if (!indexed(slot)) continue;
          const id = where.idAt(slot);
          let movedDone = false;
          for (const h of indexedCopies(slot)) {
            if (!repackSet.has(where.packName(h))) yield { id, ...where.location(h) };
            else if (!movedDone) {
              movedDone = true;
              const loc = moved.get(id);
              if (loc) yield { id, ...loc };
            }
          }
        }
      },
    };
    let indexCount = 0;
    for (let slot = 0; slot < live.length; slot++) if (indexed(slot)) indexCount++;

    // 4. One index object of everything in use, then drop the old ones, then the packs.
    if (indexCount > 0) await repo.putIndex(entries);
    lock.check();
    for (const id of oldIndex) await repo.store.delete(indexKey(id));
    for (const p of [...drop.filter((x) => !orphans.has(x)), ...repack]) {
      await repo.store.delete(packKey(p));
      result.bytesFreed += packs.get(p)!.size;
      step();
    }
    result.bytesFreed -= writer.bytesUploaded;
    if (!markWritten) await writeMark(repo.store, nextMark);
    // 5. Temporary parts of interrupted uploads (a local folder's .tmp, S3's incomplete multipart uploads),
    // by the storage's clock.
    const swept = await repo.store.sweepTemp?.(opts.tempGraceMs ?? TEMP_GRACE_MS, now);
    if (swept) {
      result.tempParts = swept.count;
      result.tempBytes = swept.bytes;
      result.bytesFreed += swept.bytes;
    }
    result.packsDeleted = drop.length;
    result.packsRepacked = repack.length;
    opts.progress?.(stepsTotal, stepsTotal);
    result.durationMs = Math.round(performance.now() - t0);
    return result;
  } finally {
    await lock.release();
  }
}
