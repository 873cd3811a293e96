/**
 * Prune's garbage collection (formats/repository.md §9 rule 5, §9.2), after pruneRepo has decided which
 * backups go: find where every chunk lives, mark what the kept backups reference, refuse when it cannot see
 * everything, delete manifests, write the GC mark, delete orphan packs, repack, write the new index, delete
 * what it replaces, sweep temporary parts — in that order, under prune's exclusive lock.
 */
import { KscError, isKscError } from '../errors.js';
import { ChunkIndex, type ChunkLocation, type LockInfo, Repository, type RepoLock, indexKey, manifestKey, packKey } from '../repo/repository.js';
import type { PackWriter } from '../repo/pack.js';
import { mapLimit } from '../util/concurrency.js';
import { ID_BYTES } from '../hash/chunkid.js';
import { readMark, writeMark } from '../repo/gcmark.js';
import { listLiveRefKeys } from '../repo/liverefs.js';
import { visitIndex, type IndexEntry } from '../repo/index-object.js';
import { BLOB_HEADER as BLOB_HEADER_SIZE } from '../compress/codec.js';
import { chooseCopies } from './copies.js';
import { forEachNonZeroPaced, oneTurnEach, turnDue } from './paced.js';
import { TEMP_GRACE_MS, refuseMissedLock, type PruneOptions, type PruneResult } from './prune.js';

type PackList = Map<string, { size: number; mtimeMs: number }>;

/** The steps' counter behind opts.progress (see PruneOptions.progress). */
export class Steps {
  private done = 0;
  constructor(
    private total: number,
    private readonly report?: (done: number, total: number) => void,
  ) {
    report?.(0, total);
  }
  step(): void {
    this.report?.(++this.done, this.total);
  }
  add(n: number): void {
    this.total += n;
    this.report?.(this.done, this.total);
  }
  end(): void {
    this.report?.(this.total, this.total);
  }
}

export interface GcContext {
  opts: PruneOptions;
  graceMs: number;
  now: number;
  /**
   * The lock objects other than prune's own (stale ones too) that its listings of locks/ showed: the one
   * after its lock was taken, and (checkListedAgain) the one before it deletes anything.
   */
  otherLocks: LockInfo[];
  forget: Set<string>;
  result: PruneResult;
}

/** Where each chunk lives, and what could not be read. */
interface ChunkScan {
  packs: PackList;
  oldIndex: string[];
  where: ChunkIndex;
  damagedIndex: string[];
  indexedPacks: Set<string>;
  unreadable: Set<string>;
}

/** What happens to each pack that is not kept as it is. */
interface PackPlan {
  nextMark: Map<string, number>;
  drop: string[];
  repack: string[];
}

/** The garbage collection after the manifests prune removes are known; the numbered steps keep their order. */
export async function collectGarbage(repo: Repository, lock: RepoLock, gc: GcContext): Promise<void> {
  const { result, opts } = gc;
  // 1. Where each chunk lives; then what the kept backups still reference; refuse when blind.
  const scan = await locateChunks(repo);
  // A kept manifest that cannot be read now stops prune here, before anything but the removed manifests is gone.
  const steps = new Steps(result.kept.length, opts.progress);
  const live = await markLive(repo, scan.where, gc, steps);
  refuseBlind(repo, scan, result);
  // Of a chunk with several copies, the one that passes its check (all of them when none does or one
  // could not be read): the copies kept are what the new index names (copy handles, see ChunkIndex).
  const choice = await chooseCopies(repo, scan.where, live);
  result.copies = choice.report;
  lock.check();
  const keptCopies = (slot: number): number[] => choice.keep.get(slot) ?? [slot];

  await checkListedAgain(repo, lock, scan, gc);
  lock.check(); // its wait for unseen holders may have outlasted a refresh
  // 2. Manifests first (the damaged ones it was told to forget too): nothing else is deleted before.
  for (const id of [...result.removed, ...gc.forget]) await repo.deleteManifest(id);
  lock.check();
  const plan = await planPacks(repo, scan, live, keptCopies, choice.keep, gc);
  const markWritten = await writeScanMark(repo, plan.nextMark);
  lock.check();
  steps.add(plan.drop.length + plan.repack.length);
  const orphans = await deleteOrphanPacks(repo, scan, plan.drop, result, steps);

  // 3. Repack: copy the live blobs of sparse packs into new packs (checked on the way).
  const writer = await repackSparse(repo, lock, scan.where, live, keptCopies, plan.repack, result);

  // 4. One index object of everything in use, then drop the old ones, then the packs.
  await writeNewIndex(repo, scan.where, live, keptCopies, writer, plan);
  lock.check();
  for (const id of scan.oldIndex) await repo.store.delete(indexKey(id));
  for (const p of [...plan.drop.filter((x) => !orphans.has(x)), ...plan.repack]) {
    await repo.store.delete(packKey(p));
    result.bytesFreed += scan.packs.get(p)!.size;
    steps.step();
  }
  result.bytesFreed -= writer.bytesUploaded;
  if (!markWritten) await writeMark(repo.store, plan.nextMark);
  // 5. Temporary parts of interrupted uploads (a local folder's .tmp, S3's incomplete multipart uploads),
  // by the storage's clock.
  const swept = await repo.store.sweepTemp?.(opts.tempGraceMs ?? TEMP_GRACE_MS, gc.now);
  if (swept) {
    result.tempParts = swept.count;
    result.tempBytes = swept.bytes;
    result.bytesFreed += swept.bytes;
  }
  result.packsDeleted = plan.drop.length;
  result.packsRepacked = plan.repack.length;
  steps.end();
}

/**
 * Where each chunk lives (the index objects, then the footers of packs no index object names), only in
 * packs that exist, in a compact table. A damaged index object is replaced later (its packs are read as
 * orphans); a pack whose footer cannot be read is unreadable (what it holds is unknown).
 */
async function locateChunks(repo: Repository): Promise<ChunkScan> {
  const packs = await repo.listPacks();
  const oldIndex = await repo.listIndexObjects();
  const where = new ChunkIndex();
  const damagedIndex: string[] = [];
  const indexedPacks = new Set<string>();
  // Read side by side, visited one at a time, each in a turn of its own (an object lists up to millions of entries).
  const inTurn = oneTurnEach();
  await mapLimit(oldIndex, 8, async (id) => {
    try {
      const plain = await repo.readIndexObject(id);
      await inTurn(() =>
        visitIndex(plain, repo.objName(indexKey(id)), (b, at, pack, offset, length, rawLength) => {
          indexedPacks.add(pack);
          if (packs.has(pack)) where.addAt(b, at, pack, offset, length, rawLength);
        }),
      );
    } catch (e) {
      if (!isKscError(e)) throw e;
      damagedIndex.push(indexKey(id));
    }
  });
  const unreadable = new Set<string>();
  await mapLimit(
    [...packs.keys()].filter((p) => !indexedPacks.has(p)),
    4,
    async (p) => {
      try {
        for (const e of await repo.readPackFooter(p, packs.get(p)!.size)) where.addAt(e.id, 0, p, e.offset, e.length, e.rawLength);
      } catch (e) {
        if (!isKscError(e)) throw e;
        unreadable.add(p);
      }
    },
  );
  return { packs, oldIndex, where, damagedIndex, indexedPacks, unreadable };
}

/** What the kept backups reference (a mark a slot of `where`); counts the chunks no pack holds in result.chunksMissing. */
async function markLive(repo: Repository, where: ChunkIndex, gc: GcContext, steps: Steps): Promise<Uint8Array> {
  const live = new Uint8Array(where.slots);
  const missing = new Set<string>();
  await mapLimit(gc.result.kept, 8, async (k) => {
    const m = await repo.readManifest(k.id);
    // With turns of the event loop (engines/paced.ts): a manifest lists up to millions of chunks.
    await forEachNonZeroPaced(m.ids, (_k, ids, at) => {
      const cid = ids.subarray(at, at + ID_BYTES);
      const slot = where.slotOf(cid);
      if (slot >= 0) live[slot] = 1;
      else missing.add(cid.toString('hex'));
    });
    steps.step();
  });
  gc.result.chunksMissing = missing.size;
  return live;
}

/**
 * §9.2 rule 1: kept backups miss chunks, and what a damaged index object or an unreadable pack holds is
 * unknown, or an index object names a pack the listing did not show (a folder the listing missed, an S3
 * listing that lagged, a pack moved away): they may be the missing chunks' only trace (the old index
 * objects are the only map to an unlisted pack), so nothing goes until someone looks. With no chunk
 * missing, an unlisted pack holds nothing a kept backup needs: prune goes on and names it (result.packsUnlisted);
 * its entries are dropped (kept, a pack lost for good would make every later backup deduplicate against it),
 * and if it was only hidden it comes back as an orphan the next writer adopts (§9 rule 6).
 */
function refuseBlind(repo: Repository, scan: ChunkScan, result: PruneResult): void {
  const unlisted = [...scan.indexedPacks].filter((p) => !scan.packs.has(p)).sort();
  result.packsUnlisted = unlisted;
  const chunksMissing = result.chunksMissing;
  if (chunksMissing === 0) return;
  if (scan.damagedIndex.length > 0 || scan.unreadable.size > 0) {
    const what = [...scan.damagedIndex.sort(), ...[...scan.unreadable].sort().map(packKey)].map((k) => repo.objName(k)).join(', ');
    throw new KscError(
      'KSC_E_CORRUPT',
      `prune deletes nothing: kept backups miss ${chunksMissing} chunk(s), and ${what} cannot be read (they may hold them); run "kscinc verify" and repair or restore those objects first`,
    );
  }
  if (unlisted.length > 0) {
    const what = unlisted.map((p) => repo.objName(packKey(p))).join(', ');
    throw new KscError(
      'KSC_E_CORRUPT',
      `prune deletes nothing: kept backups miss ${chunksMissing} chunk(s), and the index names ${unlisted.length} pack(s) the listing does not show (they may hold them): ${what}; put them back where the listing sees them (or find why the listing misses them: a moved folder, a lagging S3 listing), then run prune again`,
    );
  }
}

/**
 * What prune decided from was read from listings: the backups (manifests/), where chunks live (index/;
 * a pack none of the listed objects names is an orphan to it, and an unreferenced orphan goes), the
 * live-restore references (refs/live/, §8.1: each keeps its backup) and the other locks (locks/: with none,
 * an unreferenced pack whose own time is a grace period old goes, §9.2 rule 4(b)). A listing that missed an
 * object (a page of an S3 listing lost) would let it delete what that object needs: a backup it never saw
 * (its packs unreferenced), the packs an index object names while the object stays (only listed ones are
 * replaced: the next backup deduplicates against packs that are gone), the backup a live-restored image
 * still reads through to, or the packs a writer whose lock looks stale has uploaded and not yet committed.
 * So all four are listed again before anything is deleted. An index object, manifest or reference the first
 * listings did not show stops prune (under its exclusive lock none may appear; one that went meanwhile, a
 * pull's reference, only protected less). A lock either listing showed counts for rule 4(b) (one that came
 * meanwhile too: a taker backing off, which only keeps packs waiting); a live one older than prune's own was
 * there when prune took its lock and stops it (§8 rule 1). `scan` null: a dry run, which read no index.
 * Packs, the mark and temporary parts: see formats/repository.md §9.2 rule 1 (a listing that misses them
 * deletes less, or refuses).
 */
export async function checkListedAgain(repo: Repository, lock: RepoLock, scan: ChunkScan | null, gc: GcContext): Promise<void> {
  const { result } = gc;
  const seenIndex = new Set(scan?.oldIndex ?? []);
  const seenBackups = new Set([...result.kept.map((k) => k.id), ...result.removed, ...result.damagedManifests]);
  const seenRefs = new Set(result.liveRefs.map((r) => r.key));
  const seenLocks = new Set(gc.otherLocks.map((l) => l.key));
  const t0 = performance.now();
  const newLocks = (await repo.listLocks(gc.now)).filter((l) => l.key !== lock.key && !l.garbage && !seenLocks.has(l.key));
  refuseMissedLock(repo, lock.written, newLocks, "prune's first two listings of locks/");
  // Without its own lock object (§8 rule 7) prune holds the folder lock: no other writer can be beside it.
  if (lock.written) await refuseUnseenHolder(repo, newLocks, performance.now() - t0);
  gc.otherLocks = [...gc.otherLocks, ...newLocks];
  // After the locks: what a holder that ended while refuseUnseenHolder waited committed shows here.
  const [index, backups, refs] = await Promise.all([scan ? repo.listIndexObjects() : [], repo.listBackupIds(), listLiveRefKeys(repo.store)]);
  const unseen = [...index.filter((id) => !seenIndex.has(id)).map(indexKey), ...backups.filter((id) => !seenBackups.has(id)).map(manifestKey), ...refs.filter((k) => !seenRefs.has(k))].sort();
  if (unseen.length === 0) return;
  const what = unseen.map((k) => repo.objName(k)).join(', ');
  throw new KscError('KSC_E_UNAVAILABLE', `prune deletes nothing: its first listings did not show ${what} (a listing that lost a page?), which it would have decided without; run prune again`);
}

/**
 * §8 rule 1 once more, without ages: a live lock this listing shows and prune's first two did not is a
 * taker that saw prune's lock and backs off (its object goes as soon as its own listing of locks/ ended), or
 * a writer beside prune: a holder both listings missed (refreshed since prune's lock was put, so
 * refuseMissedLock cannot tell by age) or a taker whose listing missed prune's lock. Each is looked at again
 * (stat: no listing) once a taker backing off would be gone, three times as long as this listing took (1 s
 * at least, 30 s at most); one still there stops prune, which has deleted nothing.
 */
export async function refuseUnseenHolder(repo: Repository, newLocks: LockInfo[], listedMs: number): Promise<void> {
  const live = newLocks.filter((l) => !l.stale);
  if (live.length === 0) return;
  const waitMs = Math.min(30_000, Math.max(1000, 3 * listedMs));
  await new Promise((r) => setTimeout(r, waitMs));
  for (const l of live) {
    if (!(await repo.store.stat(l.key))) continue;
    throw new KscError(
      'KSC_E_LOCKED',
      `repository ${repo.name} is locked by ${l.what || 'another writer'} (${l.kind}, host ${l.host}, pid ${l.pid}: ${l.reason}), whose lock ${repo.objName(l.key)} prune's first listings of locks/ did not show and is still there ${(waitMs / 1000).toFixed(1)} s later (a writer beside prune: listings that lost a page?); prune deleted nothing; try again later`,
    );
  }
}

/**
 * Which packs stay, wait, go or are repacked. §9.2: a pack with unreferenced chunks goes once it has been
 * unreferenced for the grace period by the mark, or is that old itself and no other lock exists; the
 * others wait in the new mark. A pack whose contents are unknown stays while a kept backup misses chunks
 * (it may hold them). Reads the GC mark.
 */
async function planPacks(repo: Repository, scan: ChunkScan, live: Uint8Array, keptCopies: (slot: number) => number[], keep: Map<number, number[]>, gc: GcContext): Promise<PackPlan> {
  const { where, packs } = scan;
  const { result, now, graceMs } = gc;
  const used = new Map<string, number>();
  for (let slot = 0; slot < live.length; slot++) {
    const t = turnDue(slot); // a loop over the whole index: turns of the event loop (engines/paced.ts)
    if (t) await t;
    if (live[slot] !== 1) continue;
    for (const h of keptCopies(slot)) used.set(where.packName(h), (used.get(where.packName(h)) ?? 0) + where.blobLength(h));
  }
  // Packs holding copies prune could not choose between stay as they are (a repack would keep one).
  const pinned = new Set<string>();
  for (const hs of keep.values()) if (hs.length > 1) for (const h of hs) pinned.add(where.packName(h));
  const threshold = gc.opts.repackBelow ?? 0.5;
  const mark = await readMark(repo.store);
  const nextMark = new Map<string, number>();
  const drop: string[] = [];
  const repack: string[] = [];
  for (const [p, info] of packs) {
    const u = used.get(p) ?? 0;
    if (u > 0 && (u >= threshold * info.size || pinned.has(p))) continue;
    if (scan.unreadable.has(p)) result.packsUnreadable.push(p); // unknown contents, but no kept backup misses a chunk
    const since = mark.packs.get(p);
    const old = (since !== undefined && now - since >= graceMs) || (gc.otherLocks.length === 0 && now - info.mtimeMs >= graceMs);
    if (!old) {
      nextMark.set(p, since ?? 0);
      result.packsWaiting++;
      result.bytesWaiting += info.size;
    } else if (u === 0) drop.push(p);
    else repack.push(p);
  }
  result.packsUnreadable.sort();
  return { nextMark, drop, repack };
}

/**
 * The mark of this scan goes first (a pack's time in it is the mark's own, written after the scan); a full
 * file system may refuse it: then the old mark goes (nothing is old by an empty one) and this one is
 * written once space was freed. Returns whether it was written.
 */
async function writeScanMark(repo: Repository, nextMark: Map<string, number>): Promise<boolean> {
  try {
    await writeMark(repo.store, nextMark);
    return true;
  } catch (e) {
    if (!isKscError(e, 'KSC_E_NO_SPACE')) throw e;
    await repo.store.delete('gc/mark');
    return false;
  }
}

/**
 * Packs no index object names go first: nothing finds chunks through them, so the order of §9 rule 5 does
 * not concern them, and on a full file system this makes room for the new packs and index.
 */
async function deleteOrphanPacks(repo: Repository, scan: ChunkScan, drop: string[], result: PruneResult, steps: Steps): Promise<Set<string>> {
  const orphans = new Set(drop.filter((p) => !scan.indexedPacks.has(p)));
  for (const p of orphans) {
    await repo.store.delete(packKey(p));
    result.bytesFreed += scan.packs.get(p)!.size;
    steps.step();
  }
  return orphans;
}

/**
 * Copies the live blobs of the packs to repack into new packs, checking each blob's id on the way; a blob
 * that fails and was a chunk's only kept copy counts as missing (and is no longer live).
 */
async function repackSparse(repo: Repository, lock: RepoLock, where: ChunkIndex, live: Uint8Array, keptCopies: (slot: number) => number[], repack: string[], result: PruneResult): Promise<PackWriter> {
  const writer = repo.packWriter();
  const repackSet = new Set(repack);
  const liveByPack = new Map<string, number[]>();
  for (let slot = 0; slot < live.length; slot++) {
    const t = turnDue(slot);
    if (t) await t;
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
  return writer;
}

/**
 * One index object of every live chunk where it now lives, and every chunk of a pack that stays (a waiting
 * pack's chunks stay indexed: a writer that has not committed may need them). None when nothing is indexed.
 * The entries are gathered first, in passes over the whole index with turns of the event loop
 * (engines/paced.ts), into flat arrays (33 bytes an entry) that the encoder then reads twice.
 */
async function writeNewIndex(repo: Repository, where: ChunkIndex, live: Uint8Array, keptCopies: (slot: number) => number[], writer: PackWriter, plan: PackPlan): Promise<void> {
  const moved = new ChunkIndex();
  let step = 0;
  for (const e of writer.entries) {
    moved.add(e);
    const t = turnDue(step++);
    if (t) await t;
  }
  const repackSet = new Set(plan.repack);
  const goes = new Set([...plan.drop, ...plan.repack]);
  // A live chunk: the copies chosen above; any other: every copy in a pack that stays.
  const indexedCopies = (slot: number): number[] => (live[slot] === 1 ? keptCopies(slot) : where.copies(slot).filter((h) => where.packNumber(h) >= 0 && !goes.has(where.packName(h))));
  // Calls `add` for each entry of the new index, in slot order: copy handle `h`, or a moved location.
  const visit = async (add: (h: number, loc: ChunkLocation | null, id: Buffer | null) => void): Promise<void> => {
    for (let slot = 0; slot < live.length; slot++) {
      const t = turnDue(slot);
      if (t) await t;
      let movedDone = false;
      for (const h of indexedCopies(slot)) {
        if (!repackSet.has(where.packName(h))) add(h, null, null);
        else if (!movedDone) {
          movedDone = true;
          const id = where.idAt(slot);
          const loc = moved.get(id);
          if (loc) add(h, loc, id);
        }
      }
    }
  };
  let count = 0;
  await visit(() => void count++);
  if (count === 0) return;
  const packNames: string[] = [];
  const packNo = new Map<string, number>();
  const ids = Buffer.allocUnsafe(count * ID_BYTES);
  const pack = new Uint32Array(count);
  const offset = new Float64Array(count);
  const length = new Uint32Array(count);
  const rawLength = new Uint32Array(count);
  let i = 0;
  await visit((h, loc, id) => {
    if (i >= count) throw new Error('prune: the new index changed between its two passes');
    const p = loc ? loc.pack : where.packName(h);
    let n = packNo.get(p);
    if (n === undefined) packNo.set(p, (n = packNames.push(p) - 1));
    (id ?? where.idAt(h)).copy(ids, i * ID_BYTES);
    pack[i] = n;
    offset[i] = loc ? loc.offset : where.blobOffset(h);
    length[i] = loc ? loc.length : where.blobLength(h);
    rawLength[i] = loc ? loc.rawLength : where.rawLengthAt(h);
    i++;
  });
  if (i !== count) throw new Error('prune: the new index changed between its two passes');
  const entries = {
    *[Symbol.iterator](): Generator<IndexEntry> {
      for (let j = 0; j < count; j++) yield { id: ids.subarray(j * ID_BYTES, (j + 1) * ID_BYTES), pack: packNames[pack[j]!]!, offset: offset[j]!, length: length[j]!, rawLength: rawLength[j]! };
    },
  };
  await repo.putIndex(entries);
}
