/**
 * The backup engine: reads the chunks a disk's dirty bitmap marks (all chunks for a full backup), hashes,
 * deduplicates and compresses them in workers, packs and uploads them, then commits an index object and a
 * manifest (formats/repository.md §9). The bitmap handover (§10) keeps every change tracked whatever
 * happens: writes during the backup go to the live bitmap, and a failed backup merges the frozen bits back.
 *
 * This module is the orchestrator; the parts live in backup/:
 *   bitmap-names.ts  the handover's bitmap names and the rule for a backup bitmap's name
 *   handover.ts      the bitmap handover on the image (plan, freeze, commit, undo)
 *   freeze.ts        the point in time: quiesce, hand over, find the chunks to read, install the view
 *   frozen-view.ts   copy-before-write of the chunks still to read
 *   dedupe.ts        what the repository holds: exact (dedupe.ts) or through a filter (dedupe-filter.ts)
 *   parent.ts        which backup an incremental starts from
 *   pipeline.ts      read → hash/compress in workers → dedupe → pack → upload
 *   options.ts       the options, the result, their defaults and checks
 */
import { baseRecordOf } from './backup/base-record.js';
import { resolve } from 'node:path';
import type { BlockDevice } from '../image/types.js';
import { bitmapsOf, changeGateOf, identityOf } from '../image/capabilities.js';
import { chunkId, initHash, ZERO_ID } from '../hash/chunkid.js';
import { warmPool } from '../compress/pool.js';
import type { PackWriter, RepoLock, Repository } from '../repo/repository.js';
import { backupId, chunkCount, type Manifest } from '../repo/manifest.js';
import type { IndexEntry } from '../repo/index-object.js';
import { ChunkList, storeForList } from '../repo/chunklist.js';
import { bytesToUuid } from '../util/uuid.js';
import { bytesOf } from './backup/chunk-sets.js';
import { adoptOrphans, loadDedupe, type Dedupe, type DedupeSettings } from './backup/dedupe.js';
import { PointInTime } from './backup/freeze.js';
import { Handover } from './backup/handover.js';
import { bitmapFor, dedupeSettings, pipelineShape, type BackupOptions, type BackupResult } from './backup/options.js';
import { searchParent, type ParentKey } from './backup/parent.js';
import { BatchPipeline, type PipelineStats } from './backup/pipeline.js';

export { FROZEN_SUFFIX, TOKEN_SEPARATOR, DEFAULT_BITMAP, MAX_BACKUP_BITMAP_NAME, backupBitmapNameProblem, isHandoverBitmap } from './backup/bitmap-names.js';
export { recoverFrozenBitmap } from './backup/handover.js';
export type { BackupOptions, BackupResult, BackupProgress } from './backup/options.js';

/** §7.4: the UUID of a disk without one. */
export async function diskUuidOf(dev: BlockDevice): Promise<string> {
  const identity = identityOf(dev);
  if (identity) return bytesToUuid(identity.diskUuid);
  await initHash();
  return bytesToUuid(chunkId(Buffer.from(resolve(dev.name), 'utf8')));
}

/** What a backup holds that must be let go however it ends. */
interface Held {
  lock: RepoLock | null;
  writer: PackWriter | null;
  /** The new chunk list (its segment store, shared with the parent's list, is closed at the end). */
  list: ChunkList | null;
}

/** The repository as the backup found it: what it holds, the orphans adopted, the parent (or why none). */
interface RepoSide {
  dedupe: Dedupe;
  adopted: IndexEntry[];
  parent: Manifest | null;
  why: string | null;
}

/**
 * The repository side: the shared lock (into `held` at once, so it is released whatever follows), what the
 * repository holds, orphans adopted, and the parent when `key` is given. A damaged index object is skipped:
 * the packs only it named are adopted like orphans (§9 rule 6). The listings run side by side (a pack
 * landing in between is adopted twice at worst: harmless), and so do the index and the parent's manifest.
 */
async function prepareRepository(repo: Repository, held: Held, what: string, chunks: number, settings: DedupeSettings, key: ParentKey | null): Promise<RepoSide> {
  held.lock = await repo.lock('shared', what);
  const search = key ? searchParent(repo, repo.listBackupIds(), key) : null;
  const [dedupe, packs] = await Promise.all([loadDedupe(repo, chunks, settings), repo.listPackIds()]);
  const adopted = await adoptOrphans(repo, dedupe, packs);
  const { parent, why } = search ? await search.vouch(dedupe) : { parent: null, why: null };
  return { dedupe, adopted, parent, why };
}

/**
 * §9 rules 1–3: the index object naming the packs (and `indexExtra`, adopted orphans) gets its key once the
 * last packs have landed, the manifest once that index object is durable and the lock still held (§8 rule 4);
 * each is made meanwhile (on a local folder: written and synced as a part, which no reader sees). A lock lost
 * while the manifest went up (the process paused there) may have let a prune delete what it names, so the
 * manifest is taken back and the backup fails (the caller then undoes the handover). `manifest` is made once
 * the last pack is sealed (its stats time the backup until then).
 */
async function commitBackup(repo: Repository, writer: PackWriter, lock: RepoLock, indexExtra: IndexEntry[], manifest: () => Omit<Manifest, 'root'>): Promise<void> {
  const indexed = writer.flushIndex(indexExtra).then(() => lock.check());
  let m: Omit<Manifest, 'root'>;
  try {
    m = manifest();
  } catch (e) {
    await indexed.catch(() => undefined);
    throw e;
  }
  await repo.putManifest(m, indexed);
  try {
    lock.check();
  } catch (e) {
    await repo.deleteManifest(m.meta.id).catch(() => undefined);
    throw e;
  }
}

/** The result, in the order callers print it. */
function resultOf(
  b: Pick<BackupResult, 'id' | 'repository' | 'disk' | 'parent' | 'full' | 'fullReason' | 'size' | 'chunks' | 'chunksDirty' | 'dedupe' | 'durationMs'>,
  s: PipelineStats,
  bytesUploaded: number,
): BackupResult {
  return {
    id: b.id,
    repository: b.repository,
    disk: b.disk,
    parent: b.parent,
    full: b.full,
    fullReason: b.fullReason,
    size: b.size,
    chunks: b.chunks,
    chunksDirty: b.chunksDirty,
    chunksNew: s.chunksNew,
    chunksReread: s.chunksReread,
    dedupe: b.dedupe,
    bytesRead: s.bytesRead,
    bytesNew: s.bytesNew,
    bytesStored: s.bytesStored,
    bytesUploaded,
    dedupeRatio: s.bytesNew > 0 ? s.dirtyNonZeroBytes / s.bytesNew : 1,
    durationMs: b.durationMs,
    throughput: b.durationMs > 0 ? (s.bytesRead / b.durationMs) * 1000 : 0,
  };
}

/** Backs up `dev` into `repo`. The device stays usable (and writable, when it offers a change gate) throughout. */
export async function backupDevice(dev: BlockDevice, repo: Repository, opts: BackupOptions = {}): Promise<BackupResult> {
  const now = opts.now ?? Date.now;
  const t0 = performance.now();
  const started = now();
  const id = backupId(started);
  const C = repo.chunkSize;
  const chunks = chunkCount(dev.size, C);
  const bitmaps = bitmapsOf(dev);
  const bitmap = bitmapFor(opts, bitmaps ? dev : null);
  const settings = dedupeSettings(opts, C);
  await initHash();
  const disk = await diskUuidOf(dev);
  opts.progress?.({ phase: 'plan', doneBytes: 0, totalBytes: 0 });
  const handover = new Handover(bitmaps, dev.readOnly, bitmap);
  const pit = new PointInTime(dev, changeGateOf(dev), { chunkSize: C, chunks }, handover, { now, started });
  const held: Held = { lock: null, writer: null, list: null };
  try {
    // Which backup of this disk is the bitmap's reference point (§10)? What the image alone can tell.
    const plan = await handover.plan(C, opts.full === true);
    let fullReason = plan.fullReason;
    if (fullReason) warmPool(); // the workers start while the plan is made

    // The repository side runs while the image is frozen for an incremental, when the image allows one:
    // most backups are. Should the repository then call for a full backup, that freeze is undone (the bits
    // merge back) and a full one made.
    const key = !fullReason && plan.token !== null ? { disk, token: plan.token, bitmap, size: dev.size } : null;
    const repoSide = prepareRepository(repo, held, `backup ${id} of ${opts.source ?? dev.name}`, chunks, settings, key);
    const [r, f] = await Promise.allSettled([repoSide, fullReason ? null : pit.freeze(true)]);
    if (r.status === 'rejected') throw r.reason;
    if (f.status === 'rejected') throw f.reason;
    const { adopted, parent } = r.value;
    fullReason ??= r.value.why;
    const full = fullReason !== null;
    let frozen = f.value;
    if (full && frozen) {
      await pit.thaw();
      frozen = null;
    }
    if (full) warmPool();
    frozen ??= await pit.freeze(!full);

    // An incremental's list starts as its parent's (segments shared, copied only where a chunk changes);
    // only the chunks read change it (and dirty chunks without data become zero ids): O(dirty), not O(disk).
    // A large list keeps most of its segments in a temporary file (a clone shares its parent's).
    const ids = (held.list = parent ? parent.ids.clone() : new ChunkList(chunks, storeForList(chunks)));
    const { dirty, read } = frozen;
    for (const k of dirty ?? []) if (!read.has(k)) ids.set(k, ZERO_ID);

    const totalBytes = bytesOf(read, C, dev.size);
    const shape = pipelineShape(opts, C, totalBytes);
    if (!shape.inline) warmPool();
    // Exact while the index and this backup's new chunks fit the bound; otherwise through a Bloom filter.
    const dedupe = r.value.dedupe.fit(read.count, settings);
    const indexExtra = await dedupe.start(repo, adopted);
    const writer = (held.writer = repo.packWriter());
    const lock = held.lock!;
    const pipeline = new BatchPipeline({ dev, chunkSize: C, view: pit.view, ids, dedupe, writer, lock, progress: opts.progress }, shape, totalBytes);
    const baseRecord = await baseRecordOf(dev, C, parent ?? null);
    await pipeline.run(read);
    await pit.releaseView();
    const stats = pipeline.stats;
    opts.progress?.({ phase: 'commit', doneBytes: stats.bytesRead, totalBytes: stats.totalBytes });

    let durationMs = 0;
    await commitBackup(repo, writer, lock, indexExtra, () => {
      durationMs = Math.round(performance.now() - t0);
      const meta = {
        id,
        parent: parent?.meta.id ?? null,
        tags: opts.tags ?? [],
        source: opts.source ?? dev.name,
        bitmap,
        stats: { bytesRead: stats.bytesRead, bytesNew: stats.bytesNew, bytesStored: stats.bytesStored, chunksDirty: read.count, durationMs },
        ...(baseRecord ? { base: baseRecord } : {}),
      };
      return { full, disk, timeMs: pit.frozenAt, size: dev.size, chunkSize: C, bitmapToken: handover.newToken, ids, meta };
    });
    await handover.commit(); // §10 step 3: the new token, then drop the frozen bits
    const base = { id, repository: repo.name, disk, parent: parent?.meta.id ?? null, full, fullReason, size: dev.size, chunks, chunksDirty: read.count, dedupe: dedupe.kind, durationMs };
    return resultOf(base, stats, writer.bytesUploaded);
  } catch (e) {
    await pit.releaseView();
    await held.writer?.abandon();
    await handover.undo().catch(() => undefined); // §10 step 4: nothing drops out of tracking
    throw e;
  } finally {
    held.list?.store?.close();
    await held.lock?.release();
  }
}
