/**
 * The restore engine: manifest → index → packs (formats/repository.md §9 rule 4). Chunks are fetched with
 * many ranged reads in flight (neighbouring blobs of one pack coalesced into one read), verified and
 * decompressed in workers, and written in place; all-zero chunks stay holes. Restoring over an existing
 * file writes only the chunks whose contents differ.
 */
import { rm, stat } from 'node:fs/promises';
import { KscError } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { RawDevice } from '../image/raw.js';
import { createImage, openImage } from '../image/open.js';
import { ZERO_ID } from '../hash/chunkid.js';
import { hashChunks, warmPool } from '../compress/pool.js';
import { type Blob, type Read, type ReadItem, coalesce, fetchChunks, fetchFromCopies } from '../repo/fetch.js';
import { namingTarget, pendingFiles } from '../io/newfile.js';
import { PartialRestoreError, notACopy, publish, sweepTempTargets, tempTargetPath, writeMark } from './restore-target.js';
import { ChunkIndex, Repository, packKey } from '../repo/repository.js';
import { resolveBackup } from '../repo/catalog.js';
import { mapLimit } from '../util/concurrency.js';
import { uuidToBytes } from '../util/uuid.js';

export interface RestoreOptions {
  /** Output format of a new target (default raw). An existing target keeps its format. */
  format?: 'raw' | 'ksc_inc';
  /** Ranged reads in flight (default 8). */
  concurrency?: number;
  /** Largest coalesced read (default 8 MiB). */
  maxReadBytes?: number;
  progress?: (p: { doneBytes: number; totalBytes: number }) => void;
}

export interface RestoreResult {
  backup: string;
  target: string;
  format: 'raw' | 'ksc_inc';
  size: number;
  chunks: number;
  chunksZero: number;
  chunksFetched: number;
  chunksUnchanged: number;
  bytesFetched: number;
  bytesWritten: number;
  durationMs: number;
  /** Bytes of disk restored per second (size / duration). */
  throughput: number;
  /** Damage met and worked around (a chunk read from another copy because one failed its check). */
  warnings: string[];
}

const notIndexed = (what: string, id: Buffer): KscError =>
  new KscError('KSC_E_CORRUPT', `${what}: chunk ${id.toString('hex')} is in no index object (repository damaged: run "kscinc verify")`);

/**
 * A restore's reads for the chunk positions `ks` (ids from `idAt`), held in 8 bytes a position: each
 * position's index slot, and an order sorting them by (pack, blob offset). Positions needing the same chunk
 * sit side by side in that order, so each chunk is read once; its item's from/to range lists them. The
 * reads are made as they are consumed (each call of the iterable starts afresh).
 */
function restorePlan(ks: number[], idAt: (k: number) => Buffer, index: ChunkIndex, maxRead: number, what: string): { order: Uint32Array; reads: Iterable<Read> } {
  const n = ks.length;
  const slots = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const s = index.slotOf(idAt(ks[i]!));
    if (s < 0) throw notIndexed(what, idAt(ks[i]!));
    slots[i] = s;
  }
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  order.sort((a, b) => {
    const sa = slots[a]!;
    const sb = slots[b]!;
    return index.packNumber(sa) - index.packNumber(sb) || index.blobOffset(sa) - index.blobOffset(sb);
  });
  function* blobs(): Generator<Blob> {
    for (let i = 0; i < n;) {
      const s = slots[order[i]!]!;
      let j = i + 1;
      while (j < n && slots[order[j]!] === s) j++;
      const length = index.blobLength(s);
      yield { pack: index.packName(s), offset: index.blobOffset(s), length, rawLength: index.rawLengthAt(s), item: { id: idAt(ks[order[i]!]!), at: 0, length, from: i, to: j } };
      i = j;
    }
  }
  return { order, reads: { [Symbol.iterator]: () => coalesce(blobs(), maxRead) } };
}

/**
 * Before the first write: every chunk the plan needs has a copy whose pack exists (a stat per pack, or one
 * listing when there are many). KSC_E_NOT_FOUND naming the chunk and the pack otherwise.
 */
async function checkPacks(repo: Repository, index: ChunkIndex, what: string): Promise<void> {
  const names = index.packList();
  const present = new Map<string, boolean>();
  if (names.length > 256) {
    const all = await repo.listPacks();
    for (const p of names) present.set(p, all.has(p));
  } else {
    await mapLimit(names, 16, async (p) => {
      present.set(p, (await repo.store.stat(packKey(p))) !== null);
    });
  }
  if ([...present.values()].every(Boolean)) return;
  for (let s = 0; s < index.slots; s++) {
    if (!index.hasSlot(s)) continue;
    const hs = index.extraCopies === 0 ? [s] : index.copies(s);
    if (hs.some((h) => present.get(index.packName(h)))) continue;
    throw new KscError('KSC_E_NOT_FOUND', `${what}: chunk ${index.idAt(s).toString('hex')} is in ${hs.map((h) => repo.objName(packKey(index.packName(h)))).join(', ')}, which ${hs.length > 1 ? 'are' : 'is'} missing (repository damaged: run "kscinc verify"); nothing was written`);
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

/**
 * Restores backup `which` ("latest" or an id) to the file `target` (§9.5). A new target is written under a
 * temporary name in its folder and appears under its name only when complete. An existing target must be a
 * copy of the backup's disk (else KSC_E_EXISTS, unless `force`); everything that can be checked (manifest,
 * index, every needed chunk's pack) is checked before its first write, and a failure after that throws
 * PartialRestoreError (`partial: true`) saying the target holds a mix.
 * Runs under a shared lock (§8 rule 6), so a prune cannot remove what the restore reads; it waits for
 * one that runs.
 */
export async function restoreBackup(repo: Repository, which: string, target: string, opts: RestoreOptions & { disk?: string; force?: boolean; lockWaitMs?: number } = {}): Promise<RestoreResult> {
  const lock = await repo.readerLock(`restore of ${which} to ${target}`, opts.lockWaitMs);
  try {
    return await restoreLocked(repo, which, target, opts); // every chunk is checked: a lost lock cannot make it wrong
  } finally {
    await lock?.release();
  }
}

async function restoreLocked(repo: Repository, which: string, target: string, opts: RestoreOptions & { disk?: string; force?: boolean }): Promise<RestoreResult> {
  const t0 = performance.now();
  warmPool();
  const warnings: string[] = [];
  const m = await resolveBackup(repo, which, opts.disk, (msg) => warnings.push(msg));
  const C = m.chunkSize;
  const chunks = m.ids.length;
  const what = `restore of backup ${m.meta.id}`;
  const existing = await exists(target);
  let dev: BlockDevice;
  let format: 'raw' | 'ksc_inc';
  /** The file written: the target itself when it exists, else a temporary beside it. */
  let file = target;
  // Temporaries of killed restores (and creates) of this target go, also when it exists: a kill between the
  // link that named it and the unlink of the temporary leaves the temporary beside it.
  await sweepTempTargets(target);
  if (existing) {
    dev = await openImage(target, { write: true });
    format = dev.format;
    try {
      if (dev.size !== m.size) throw new KscError('KSC_E_INVALID', `${target} is ${dev.size} bytes but backup ${m.meta.id} is ${m.size}: restore to a new file instead`);
      const why = opts.force ? null : await notACopy(dev, target, m.disk);
      if (why) throw new KscError('KSC_E_EXISTS', `${target} exists and is not a copy of disk ${m.disk}: ${why}. Restoring would overwrite it: restore to a new file, or overwrite it with option force`);
    } catch (e) {
      await dev.close();
      throw e;
    }
  } else {
    format = opts.format ?? 'raw';
    file = tempTargetPath(target);
    pendingFiles.add(file); // the CLI removes it when interrupted by a signal
    try {
      if (format === 'ksc_inc') {
        await createImage(file, { size: m.size, diskUuid: uuidToBytes(m.disk) });
        dev = await openImage(file, { write: true });
      } else {
        dev = await RawDevice.create(file, m.size);
      }
    } catch (e) {
      // §9.5 rule 1: a failed restore removes its temporary, also when making it failed.
      await rm(file, { force: true }).catch(() => undefined);
      pendingFiles.delete(file);
      throw e;
    }
  }
  /** Chunks an existing target needs changed, and how many were written (for PartialRestoreError). */
  let toChange = 0;
  let changed = 0;
  let writing = false;
  try {
    // Which chunk positions need which id; on an existing target, skip positions that already match. Only
    // non-zero chunks of the backup and chunks where the target holds data are looked at: a new target's
    // zero chunks stay holes, and an existing target's zero extents are already right for zero chunks.
    const chunksZero = chunks - m.ids.nonZeroCount();
    let chunksUnchanged = 0;
    let bytesWritten = 0;
    const idAt = (k: number): Buffer => m.ids.view(k);
    const lenAt = (k: number): number => Math.min(C, m.size - k * C);
    let candidates: number[] = [];
    if (existing) {
      // Chunks where the target holds data are hashed; the others read as zeros without reading (holes and
      // zero extents): they are right for zero ids and differ for the rest.
      const withData = new Set<number>();
      for (const e of await dev.extents(0, dev.size)) {
        if (e.state !== 'data' || e.length <= 0) continue;
        const k1 = Math.floor((e.offset + e.length - 1) / C);
        for (let k = Math.floor(e.offset / C); k <= k1; k++) withData.add(k);
      }
      const differ: number[] = [];
      m.ids.forEachNonZero((k) => {
        if (!withData.has(k)) differ.push(k);
      });
      chunksUnchanged = chunks - withData.size - differ.length; // zero ids over zeros
      const toHash = [...withData].sort((a, b) => a - b);
      const batch = Math.max(1, Math.floor((4 * 1024 * 1024) / C));
      const groups: number[][] = [];
      for (let i = 0; i < toHash.length; i += batch) groups.push(toHash.slice(i, i + batch));
      await mapLimit(groups, 3, async (g) => {
        const data = await Promise.all(g.map((k) => dev.read(k * C, lenAt(k))));
        const ids = await hashChunks(data, repo.blobKeys);
        g.forEach((k, i) => {
          if (ids[i]!.equals(idAt(k))) chunksUnchanged++;
          else differ.push(k);
        });
      });
      candidates = differ;
    } else {
      m.ids.forEachNonZero((k) => {
        candidates.push(k);
      });
    }
    // The positions to fetch (zero ids need no fetch: written as zeros over an existing target, holes in a new one).
    const fetch: number[] = [];
    const zero: number[] = [];
    for (const k of candidates) {
      if (idAt(k).equals(ZERO_ID)) {
        if (existing) zero.push(k);
      } else fetch.push(k);
    }
    candidates = [];
    toChange = zero.length + fetch.length;
    // A damaged index object only matters if a chunk we need is listed nowhere else (§6: the index is the union).
    const badIndex: string[] = [];
    // Only the entries of the chunks this restore fetches are kept: memory follows the backup, not the repository.
    const needed = new ChunkIndex({ locations: false, expected: fetch.length });
    for (const k of fetch) needed.addAt(idAt(k), 0, '', 0, 0, 0);
    const index = await repo.loadIndex((key) => badIndex.push(repo.objName(key)), { only: (b, at) => needed.hasAt(b, at) });
    const plan = restorePlan(fetch, idAt, index, opts.maxReadBytes ?? 4 * 1024 * 1024, badIndex.length ? `${what} (damaged index object ${badIndex.join(', ')})` : what);
    await checkPacks(repo, index, what);
    // Everything checkable is checked: from here on the target changes.
    if (existing && format === 'raw') await writeMark(target, m.disk, m.size, m.meta.id);
    writing = true;
    for (const k of zero) {
      await dev.writeZeroes(k * C, lenAt(k), { mayTrim: true });
      bytesWritten += lenAt(k);
      changed++;
    }
    const totalBytes = fetch.reduce((sum, k) => sum + lenAt(k), 0);
    let done = 0;
    let fetchedChunks = 0;
    // Flush in the background every 64 MiB written, so the final flush does not carry the whole restore.
    let sinceFlush = 0;
    let flushing: Promise<void> | null = null;
    const sink = async (id: Buffer, data: Buffer, item: ReadItem): Promise<void> => {
      fetchedChunks++;
      const ks: number[] = [];
      for (let p = item.from!; p < item.to!; p++) ks.push(fetch[plan.order[p]!]!);
      await Promise.all(ks.map(async (k) => {
        if (data.length !== lenAt(k)) throw new KscError('KSC_E_CORRUPT', `${what}: chunk ${id.toString('hex')} is ${data.length} bytes, position ${k} needs ${lenAt(k)}`);
        await dev.write(k * C, data);
        changed++;
        bytesWritten += data.length;
        done += data.length;
        sinceFlush += data.length;
      }));
      if (sinceFlush >= 64 * 1024 * 1024 && !flushing) {
        sinceFlush = 0;
        flushing = dev.flush().finally(() => (flushing = null));
      }
      opts.progress?.({ doneBytes: done, totalBytes });
    };
    // A read that fails its checks is fetched again chunk by chunk, from another copy where one is damaged.
    let bytesFetched = 0;
    const main = await fetchChunks(repo, plan.reads, opts.concurrency ?? 6, C, what, sink, async (r) => {
      const n = await fetchFromCopies(repo, index, r, C, what, sink, (msg) => warnings.push(msg));
      bytesFetched += n;
    });
    bytesFetched += main;
    await flushing;
    await dev.flush();
    if (!existing) {
      await dev.close();
      // §9.5 rule 2: the mark is durable before the target has its name, so a restore stopped in between
      // leaves a target that the next restore recognises as a copy of the disk.
      if (format === 'raw') await writeMark(target, m.disk, m.size, m.meta.id);
      await publish(file, target);
    }
    const durationMs = Math.round(performance.now() - t0);
    return {
      backup: m.meta.id, target, format, size: m.size, chunks, chunksZero, chunksFetched: fetchedChunks, chunksUnchanged,
      bytesFetched, bytesWritten, durationMs, throughput: durationMs > 0 ? (m.size / durationMs) * 1000 : 0, warnings,
    };
  } catch (e) {
    if (!existing) {
      // A new target that did not receive the whole backup is not a restore: its temporary goes.
      await dev.close().catch(() => undefined);
      await rm(file, { force: true }).catch(() => undefined);
      throw namingTarget(e, file, target);
    } else if (writing) {
      throw new PartialRestoreError(target, changed, toChange, e as Error);
    }
    throw e;
  } finally {
    await dev.close().catch(() => undefined);
    pendingFiles.delete(file);
  }
}
