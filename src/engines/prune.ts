/**
 * Prune: removes backups by retention, then garbage-collects what no remaining backup references
 * (formats/repository.md §9 rule 5): manifests first; then repacked chunks and one new index object of
 * everything still in use; then the index objects it replaces; then packs nothing references. Runs under
 * the exclusive repository lock, so no backup runs meanwhile.
 */
import { isKscError } from '../errors.js';
import { ChunkIndex, Repository, mapLimit, indexKey, packKey } from '../repo/repository.js';
import { visitIndex, type IndexEntry } from '../repo/format.js';
import { BLOB_HEADER as BLOB_HEADER_SIZE } from '../compress/codec.js';
import { listBackups } from './restore.js';
import { type CopyReport, chooseCopies } from './copies.js';
import { type KeepPolicy, checkPolicy, selectKeep } from './retention.js';

export interface PruneOptions extends KeepPolicy {
  dryRun?: boolean;
  timeZone?: string;
  /** Repack a pack when less than this share of its bytes is still used (default 0.5). */
  repackBelow?: number;
}

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
  dryRun: boolean;
  durationMs: number;
}

export async function pruneRepo(repo: Repository, opts: PruneOptions): Promise<PruneResult> {
  const t0 = performance.now();
  const policy: KeepPolicy = { last: opts.last, daily: opts.daily, weekly: opts.weekly, monthly: opts.monthly };
  checkPolicy(policy);
  const lock = await repo.lock('exclusive', 'prune');
  try {
    // Only what retention needs is kept of each manifest (a repository holds many; their chunk lists are
    // read again, a few at a time, for the kept ones below).
    const damagedManifests: string[] = [];
    const metas = await listBackups(repo, (id) => damagedManifests.push(id), (m) => ({ id: m.meta.id, disk: m.disk, timeMs: m.timeMs }));
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
        if (reasons) kept.push({ id: m.id, reasons });
        else removed.push(m.id);
      }
    }
    kept.sort((a, b) => (a.id < b.id ? -1 : 1));
    removed.sort();
    const result: PruneResult = { kept, removed, damagedManifests, packsDeleted: 0, packsRepacked: 0, bytesFreed: 0, chunksMissing: 0,
      copies: { chunksWithCopies: 0, copiesChecked: 0, copiesDamaged: [], chunksWithoutGoodCopy: [], chunksUndecided: [] }, dryRun: !!opts.dryRun, durationMs: 0 };
    if (opts.dryRun) {
      result.durationMs = Math.round(performance.now() - t0);
      return result;
    }
    // 1. Manifests first.
    for (const id of removed) await repo.deleteManifest(id);
    lock.check();

    // 2. Where each chunk lives (the index objects, then the footers of packs no index object names), only
    // in packs that exist, in a compact table; then what the kept backups still reference (a mark a slot).
    const packs = await repo.listPacks();
    const oldIndex = await repo.listIndexObjects();
    const where = new ChunkIndex();
    const indexedPacks = new Set<string>();
    await mapLimit(oldIndex, 8, async (id) => {
      try {
        visitIndex(await repo.store.get(indexKey(id)), repo.objName(indexKey(id)), (b, at, pack, offset, length, rawLength) => {
          indexedPacks.add(pack);
          if (packs.has(pack)) where.addAt(b, at, pack, offset, length, rawLength);
        });
      } catch (e) {
        if (!isKscError(e)) throw e; // a damaged index object is replaced below; its packs are read as orphans
      }
    });
    await mapLimit([...packs.keys()].filter((p) => !indexedPacks.has(p)), 4, async (p) => {
      try {
        for (const e of await repo.readPackFooter(p, packs.get(p)!.size)) where.addAt(e.id, 0, p, e.offset, e.length, e.rawLength);
      } catch (e) {
        if (!isKscError(e)) throw e;
      }
    });
    const live = new Uint8Array(where.slots);
    const missing = new Set<string>();
    // A kept manifest that cannot be read now stops prune here, before anything but the removed manifests is gone.
    await mapLimit(kept, 8, async (k) => {
      const m = await repo.readManifest(k.id);
      m.ids.forEachNonZero((_k, cid) => {
        const slot = where.slotOf(cid);
        if (slot >= 0) live[slot] = 1;
        else missing.add(cid.toString('hex'));
      });
    });
    result.chunksMissing = missing.size;
    missing.clear();
    // Of a chunk with several copies, the one that passes its check (all of them when none does or one
    // could not be read): the copies kept are what the new index names (copy handles, see ChunkIndex).
    const choice = await chooseCopies(repo, where, live);
    result.copies = choice.report;
    lock.check();
    const keptCopies = (slot: number): number[] => choice.keep.get(slot) ?? [slot];
    const used = new Map<string, number>();
    for (let slot = 0; slot < live.length; slot++) {
      if (live[slot] !== 1) continue;
      for (const h of keptCopies(slot)) used.set(where.packName(h), (used.get(where.packName(h)) ?? 0) + where.blobLength(h));
    }
    // Packs holding copies prune could not choose between stay as they are (a repack would keep one).
    const pinned = new Set<string>();
    for (const hs of choice.keep.values()) if (hs.length > 1) for (const h of hs) pinned.add(where.packName(h));
    const threshold = opts.repackBelow ?? 0.5;
    const drop: string[] = [];
    const repack: string[] = [];
    for (const [p, info] of packs) {
      const u = used.get(p) ?? 0;
      if (u === 0) drop.push(p);
      else if (u < threshold * info.size && !pinned.has(p)) repack.push(p);
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
    // Every live chunk where it now lives (made as the index object is written: nothing held per chunk).
    const entries = {
      *[Symbol.iterator](): Generator<IndexEntry> {
        for (let slot = 0; slot < live.length; slot++) {
          if (live[slot] !== 1) continue;
          const id = where.idAt(slot);
          let movedDone = false;
          for (const h of keptCopies(slot)) {
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
    const liveCount = live.reduce((n, x) => n + x, 0);

    // 4. One index object of everything in use, then drop the old ones, then the packs.
    if (liveCount > 0) await repo.putIndex(entries);
    lock.check();
    for (const id of oldIndex) await repo.store.delete(indexKey(id));
    for (const p of [...drop, ...repack]) {
      await repo.store.delete(packKey(p));
      result.bytesFreed += packs.get(p)!.size;
    }
    result.bytesFreed -= writer.bytesUploaded;
    result.packsDeleted = drop.length;
    result.packsRepacked = repack.length;
    result.durationMs = Math.round(performance.now() - t0);
    return result;
  } finally {
    await lock.release();
  }
}
