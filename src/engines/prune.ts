/**
 * Prune: removes backups by retention, then garbage-collects what no remaining backup references
 * (formats/repository.md §9 rule 5): manifests first; then repacked chunks and one new index object of
 * everything still in use; then the index objects it replaces; then packs nothing references. Runs under
 * the exclusive repository lock, so no backup runs meanwhile.
 */
import { isKscError } from '../errors.js';
import { Repository, mapLimit, indexKey, packKey } from '../repo/repository.js';
import { decodeIndex, type IndexEntry } from '../repo/format.js';
import { BLOB_HEADER as BLOB_HEADER_SIZE } from '../compress/codec.js';
import { listBackups } from './restore.js';
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
  dryRun: boolean;
  durationMs: number;
}

export async function pruneRepo(repo: Repository, opts: PruneOptions): Promise<PruneResult> {
  const t0 = performance.now();
  const policy: KeepPolicy = { last: opts.last, daily: opts.daily, weekly: opts.weekly, monthly: opts.monthly };
  checkPolicy(policy);
  const lock = await repo.lock('exclusive', 'prune');
  try {
    const damagedManifests: string[] = [];
    const all = await listBackups(repo, (id) => damagedManifests.push(id));
    const byDisk = new Map<string, typeof all>();
    for (const m of all) {
      let l = byDisk.get(m.disk);
      if (!l) byDisk.set(m.disk, (l = []));
      l.push(m);
    }
    const kept: PruneResult['kept'] = [];
    const removed: string[] = [];
    for (const list of byDisk.values()) {
      const keep = selectKeep(list.map((m) => ({ id: m.meta.id, timeMs: m.timeMs })), policy, opts.timeZone);
      for (const m of list) {
        const reasons = keep.get(m.meta.id);
        if (reasons) kept.push({ id: m.meta.id, reasons });
        else removed.push(m.meta.id);
      }
    }
    kept.sort((a, b) => (a.id < b.id ? -1 : 1));
    removed.sort();
    const result: PruneResult = { kept, removed, damagedManifests, packsDeleted: 0, packsRepacked: 0, bytesFreed: 0, chunksMissing: 0, dryRun: !!opts.dryRun, durationMs: 0 };
    if (opts.dryRun) {
      result.durationMs = Math.round(performance.now() - t0);
      return result;
    }
    // 1. Manifests first.
    for (const id of removed) await repo.deleteManifest(id);
    lock.check();

    // 2. What is still referenced, and where each such chunk lives.
    const keptIds = new Set(kept.map((k) => k.id));
    const referenced = new Set<string>();
    for (const m of all) {
      if (!keptIds.has(m.meta.id)) continue;
      m.ids.forEachNonZero((_k, id) => {
        referenced.add(id.toString('hex'));
      });
    }
    const packs = await repo.listPacks();
    const oldIndex = await repo.listIndexObjects();
    const candidates: IndexEntry[] = [];
    const indexedPacks = new Set<string>();
    await mapLimit(oldIndex, 8, async (id) => {
      try {
        for (const e of decodeIndex(await repo.store.get(indexKey(id)), repo.objName(indexKey(id)))) {
          candidates.push(e);
          indexedPacks.add(e.pack);
        }
      } catch (e) {
        if (!isKscError(e)) throw e; // a damaged index object is replaced below; its packs are read as orphans
      }
    });
    // Orphan packs (interrupted writers, damaged index objects): their footers say what they hold.
    await mapLimit([...packs.keys()].filter((p) => !indexedPacks.has(p)), 4, async (p) => {
      try {
        for (const e of await repo.readPackFooter(p, packs.get(p)!.size)) candidates.push({ ...e, pack: p });
      } catch (e) {
        if (!isKscError(e)) throw e;
      }
    });
    const chosen = new Map<string, IndexEntry>();
    for (const e of candidates) {
      const hex = e.id.toString('hex');
      if (referenced.has(hex) && packs.has(e.pack) && !chosen.has(hex)) chosen.set(hex, e);
    }
    result.chunksMissing = [...referenced].filter((h) => !chosen.has(h)).length;
    const used = new Map<string, number>();
    for (const e of chosen.values()) used.set(e.pack, (used.get(e.pack) ?? 0) + e.length);
    const threshold = opts.repackBelow ?? 0.5;
    const drop: string[] = [];
    const repack: string[] = [];
    for (const [p, info] of packs) {
      const u = used.get(p) ?? 0;
      if (u === 0) drop.push(p);
      else if (u < threshold * info.size) repack.push(p);
    }

    // 3. Repack: copy the live blobs of sparse packs into new packs (checked on the way).
    const writer = repo.packWriter();
    const repackSet = new Set(repack);
    const liveByPack = new Map<string, IndexEntry[]>();
    for (const e of chosen.values()) {
      if (!repackSet.has(e.pack)) continue;
      let l = liveByPack.get(e.pack);
      if (!l) liveByPack.set(e.pack, (l = []));
      l.push(e);
    }
    for (const [p, entries] of liveByPack) {
      for (const e of entries) {
        const blob = await repo.store.getRange(packKey(p), e.offset, e.length);
        if (blob.length < BLOB_HEADER_SIZE || !blob.subarray(16, 32).equals(e.id)) {
          result.chunksMissing++;
          chosen.delete(e.id.toString('hex'));
          continue;
        }
        await writer.add(e.id, blob, e.rawLength);
      }
      lock.check();
    }
    await writer.finish();
    const moved = new Map([...writer.entries].map((e) => [e.id.toString('hex'), e]));
    const live: IndexEntry[] = [];
    for (const [hex, e] of chosen) live.push(repackSet.has(e.pack) ? moved.get(hex)! : e);

    // 4. One index object of everything in use, then drop the old ones, then the packs.
    if (live.length > 0) await repo.putIndex(live);
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
