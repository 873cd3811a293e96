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
import type { Manifest } from '../repo/manifest.js';
import { mapLimit } from '../util/concurrency.js';
import { BitSet } from '../util/bitset.js';
import { uuidToBytes } from '../util/uuid.js';
import { recordRestoreOrigin } from './restore-origin.js';

export interface RestoreOptions {
  /** Output format of a new target (default raw). An existing target keeps its format. */
  format?: 'raw' | 'ksc_inc';
  /** Ranged reads in flight (default 8). */
  concurrency?: number;
  /** Largest coalesced read (default 8 MiB). */
  maxReadBytes?: number;
  progress?: (p: { doneBytes: number; totalBytes: number }) => void;
  /** The repository's location recorded in a ksc_inc target's origin record (formats/ksc_inc.md §4.3; default its store's name). */
  location?: string;
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
  /** A ksc_inc target: the bitmap that tracks its changes since this backup (formats/ksc_inc.md §4.3). */
  originBitmap?: string;
}

const notIndexed = (what: string, id: Buffer): KscError => new KscError('KSC_E_CORRUPT', `${what}: chunk ${id.toString('hex')} is in no index object (repository damaged: run "kscinc verify")`);

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
    throw new KscError(
      'KSC_E_NOT_FOUND',
      `${what}: chunk ${index.idAt(s).toString('hex')} is in ${hs.map((h) => repo.objName(packKey(index.packName(h)))).join(', ')}, which ${hs.length > 1 ? 'are' : 'is'} missing (repository damaged: run "kscinc verify"); nothing was written`,
    );
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

/** The target a restore writes: the target itself when it exists, else a temporary beside it (`file`). */
interface OpenTarget {
  dev: BlockDevice;
  format: 'raw' | 'ksc_inc';
  file: string;
}

/** What a restore changed of the target so far (for its result and for PartialRestoreError). */
interface Progress {
  /** Chunks the target needs changed, and how many were written. */
  toChange: number;
  changed: number;
  bytesWritten: number;
  /** The target has begun to change (an existing target then holds a mix when the restore fails). */
  writing: boolean;
}

/**
 * The steps, in order: resolve the backup; sweep temporaries of killed restores; open the existing target
 * (checking it is a copy) or create a temporary; find the chunks that differ; load the index entries they
 * need and check their packs; then write (the mark of an existing raw target, zeros, fetched chunks),
 * flush, and publish a new target under its name.
 */
async function restoreLocked(repo: Repository, which: string, target: string, opts: RestoreOptions & { disk?: string; force?: boolean }): Promise<RestoreResult> {
  const t0 = performance.now();
  warmPool();
  const warnings: string[] = [];
  const m = await resolveBackup(repo, which, opts.disk, (msg) => warnings.push(msg));
  const chunks = m.ids.length;
  const what = `restore of backup ${m.meta.id}`;
  const existing = await exists(target);
  // Temporaries of killed restores (and creates) of this target go, also when it exists: a kill between the
  // link that named it and the unlink of the temporary leaves the temporary beside it.
  await sweepTempTargets(target);
  const { dev, format, file } = existing ? await openExisting(target, m, !!opts.force) : await createTemporary(target, m, opts.format ?? 'raw');
  const p: Progress = { toChange: 0, changed: 0, bytesWritten: 0, writing: false };
  try {
    const chunksZero = chunks - m.ids.nonZeroCount();
    const { fetch, zero, chunksUnchanged } = await chunksToChange(repo, dev, m, existing);
    p.toChange = zero.length + fetch.length;
    const { index, plan } = await loadPlan(repo, m, fetch, what, opts.maxReadBytes);
    // Everything checkable is checked: from here on the target changes.
    if (existing && format === 'raw') await writeMark(target, target, m.disk, m.size, m.meta.id);
    p.writing = true;
    await writeZeros(dev, m, zero, p);
    const fetched = await fetchAndWrite(repo, dev, { m, fetch, index, plan, what, p, warnings, opts, existing });
    // §9.5 rule 2: a new raw target's mark is durable before the target has its name, so a restore stopped
    // in between leaves a target that the next restore recognises as a copy of the disk. It is written
    // while the data is flushed (two syncs waited for at once, not one after the other: issue 19).
    const mark = !existing && format === 'raw' ? writeMark(target, file, m.disk, m.size, m.meta.id) : null;
    const [flushed, marked] = await Promise.allSettled([dev.flush(), mark]);
    if (flushed.status === 'rejected') throw flushed.reason;
    if (marked.status === 'rejected') throw marked.reason;
    const originBitmap = format === 'ksc_inc' ? await recordRestoreOrigin(dev, repo, m, opts.location ?? repo.name) : null;
    if (!existing) {
      await dev.close();
      await publish(file, target);
    }
    const durationMs = Math.round(performance.now() - t0);
    return {
      backup: m.meta.id,
      target,
      format,
      size: m.size,
      chunks,
      chunksZero,
      chunksFetched: fetched.chunks,
      chunksUnchanged,
      bytesFetched: fetched.bytes,
      bytesWritten: p.bytesWritten,
      durationMs,
      throughput: durationMs > 0 ? (m.size / durationMs) * 1000 : 0,
      warnings,
      ...(originBitmap ? { originBitmap } : {}),
    };
  } catch (e) {
    throw await failure(e, existing, dev, file, target, p);
  } finally {
    await dev.close().catch(() => undefined);
    pendingFiles.delete(file);
  }
}

/** An existing target, opened for writing: it must be the backup's size and (unless `force`) a copy of its disk. */
async function openExisting(target: string, m: Manifest, force: boolean): Promise<OpenTarget> {
  const dev = await openImage(target, { write: true });
  try {
    if (dev.size !== m.size) throw new KscError('KSC_E_INVALID', `${target} is ${dev.size} bytes but backup ${m.meta.id} is ${m.size}: restore to a new file instead`);
    const why = force ? null : await notACopy(dev, target, m.disk);
    if (why) throw new KscError('KSC_E_EXISTS', `${target} exists and is not a copy of disk ${m.disk}: ${why}. Restoring would overwrite it: restore to a new file, or overwrite it with option force`);
  } catch (e) {
    await dev.close();
    throw e;
  }
  return { dev, format: dev.format, file: target };
}

/** A new target: a temporary beside it, of the backup's size and disk UUID, removed if making it fails. */
async function createTemporary(target: string, m: Manifest, format: 'raw' | 'ksc_inc'): Promise<OpenTarget> {
  const file = tempTargetPath(target);
  pendingFiles.add(file); // the CLI removes it when interrupted by a signal
  try {
    if (format === 'ksc_inc') {
      await createImage(file, { size: m.size, diskUuid: uuidToBytes(m.disk) });
      return { dev: await openImage(file, { write: true }), format, file };
    }
    return { dev: await RawDevice.create(file, m.size), format, file };
  } catch (e) {
    // §9.5 rule 1: a failed restore removes its temporary, also when making it failed.
    await rm(file, { force: true }).catch(() => undefined);
    pendingFiles.delete(file);
    throw e;
  }
}

/**
 * Which chunk positions need which id; on an existing target, skip positions that already match. Only
 * non-zero chunks of the backup and chunks where the target holds data are looked at: a new target's zero
 * chunks stay holes, and an existing target's zero extents are already right for zero chunks. Returns the
 * positions to fetch and those to write as zeros (zero ids need no fetch: written as zeros over an existing
 * target, holes in a new one).
 */
async function chunksToChange(repo: Repository, dev: BlockDevice, m: Manifest, existing: boolean): Promise<{ fetch: number[]; zero: number[]; chunksUnchanged: number }> {
  const C = m.chunkSize;
  let chunksUnchanged = 0;
  let candidates: number[] = [];
  if (existing) {
    // Chunks where the target holds data are hashed; the others read as zeros without reading (holes and
    // zero extents): they are right for zero ids and differ for the rest.
    // A bit set, not a Set<number>: V8 caps a Set at 2^24 members, a 1 TiB disk of 64 KiB chunks.
    const withData = new BitSet(m.ids.length);
    for (const e of await dev.extents(0, dev.size)) {
      if (e.state !== 'data' || e.length <= 0) continue;
      withData.addRange(Math.floor(e.offset / C), Math.floor((e.offset + e.length - 1) / C));
    }
    const differ: number[] = [];
    m.ids.forEachNonZero((k) => {
      if (!withData.has(k)) differ.push(k);
    });
    chunksUnchanged = m.ids.length - withData.count - differ.length; // zero ids over zeros
    const toHash = [...withData.values()];
    const batch = Math.max(1, Math.floor((4 * 1024 * 1024) / C));
    const groups: number[][] = [];
    for (let i = 0; i < toHash.length; i += batch) groups.push(toHash.slice(i, i + batch));
    await mapLimit(groups, 3, async (g) => {
      const data = await Promise.all(g.map((k) => dev.read(k * C, chunkLength(m, k))));
      const ids = await hashChunks(data, repo.blobKeys);
      g.forEach((k, i) => {
        if (ids[i]!.equals(m.ids.view(k))) chunksUnchanged++;
        else differ.push(k);
      });
    });
    candidates = differ;
  } else {
    m.ids.forEachNonZero((k) => {
      candidates.push(k);
    });
  }
  const fetch: number[] = [];
  const zero: number[] = [];
  for (const k of candidates) {
    if (m.ids.view(k).equals(ZERO_ID)) {
      if (existing) zero.push(k);
    } else fetch.push(k);
  }
  return { fetch, zero, chunksUnchanged };
}

/** The bytes of chunk position `k` (the last one may be short). */
const chunkLength = (m: Manifest, k: number): number => Math.min(m.chunkSize, m.size - k * m.chunkSize);

/**
 * The index entries of the chunks to fetch (only those: memory follows the backup, not the repository),
 * the reads, and the check that every needed pack exists. A damaged index object only matters if a chunk
 * we need is listed nowhere else (§6: the index is the union).
 */
async function loadPlan(repo: Repository, m: Manifest, fetch: number[], what: string, maxReadBytes: number | undefined): Promise<{ index: ChunkIndex; plan: ReturnType<typeof restorePlan> }> {
  const idAt = (k: number): Buffer => m.ids.view(k);
  const badIndex: string[] = [];
  const needed = new ChunkIndex({ locations: false, expected: fetch.length });
  for (const k of fetch) needed.addAt(idAt(k), 0, '', 0, 0, 0);
  const index = await repo.loadIndex((key) => badIndex.push(repo.objName(key)), { only: (b, at) => needed.hasAt(b, at), expected: fetch.length });
  const plan = restorePlan(fetch, idAt, index, maxReadBytes ?? 4 * 1024 * 1024, badIndex.length ? `${what} (damaged index object ${badIndex.join(', ')})` : what);
  await checkPacks(repo, index, what);
  return { index, plan };
}

async function writeZeros(dev: BlockDevice, m: Manifest, zero: number[], p: Progress): Promise<void> {
  for (const k of zero) {
    await dev.writeZeroes(k * m.chunkSize, chunkLength(m, k), { mayTrim: true });
    p.bytesWritten += chunkLength(m, k);
    p.changed++;
  }
}

interface FetchJob {
  m: Manifest;
  fetch: number[];
  index: ChunkIndex;
  plan: ReturnType<typeof restorePlan>;
  what: string;
  p: Progress;
  warnings: string[];
  opts: RestoreOptions;
  /** The target existed (it is written in place). */
  existing: boolean;
}

/**
 * Fetches the planned chunks and writes each to every position that needs it, flushing in the background
 * every 64 MiB written (so the final flush does not carry the whole restore). A read that fails its checks
 * is fetched again chunk by chunk, from another copy where one is damaged. Returns the chunks and bytes fetched.
 */
async function fetchAndWrite(repo: Repository, dev: BlockDevice, job: FetchJob): Promise<{ chunks: number; bytes: number }> {
  const { m, fetch, plan, what, p, opts } = job;
  const C = m.chunkSize;
  const totalBytes = fetch.reduce((sum, k) => sum + chunkLength(m, k), 0);
  let done = 0;
  let chunks = 0;
  let sinceFlush = 0;
  let flushing: Promise<void> | null = null;
  // A new raw file gets writes of WRITE_MIN … WRITE_MAX bytes: runs of small chunks merged, chunks of
  // 2 and 4 MiB split, others whole. An existing target keeps one write per chunk: stopped at any step
  // it holds each chunk's old or new contents (§9.5 rule 4). A ksc_inc target too (its own write path
  // places the chunks).
  const piece = dev.format === 'raw' && !job.existing ? Math.min(WRITE_MAX, Math.max(C, WRITE_MIN)) : C;
  const writer = new ExtentWriter(dev, C, piece, (bytes, positions) => {
    p.changed += positions;
    p.bytesWritten += bytes;
    done += bytes;
    sinceFlush += bytes;
    if (sinceFlush >= 64 * 1024 * 1024 && !flushing) {
      sinceFlush = 0;
      flushing = dev.flush().finally(() => (flushing = null));
    }
    opts.progress?.({ doneBytes: done, totalBytes });
  });
  const sink = async (id: Buffer, data: Buffer, item: ReadItem): Promise<void> => {
    chunks++;
    const ks: number[] = [];
    for (let i = item.from!; i < item.to!; i++) ks.push(fetch[plan.order[i]!]!);
    for (const k of ks) {
      if (data.length !== chunkLength(m, k)) throw new KscError('KSC_E_CORRUPT', `${what}: chunk ${id.toString('hex')} is ${data.length} bytes, position ${k} needs ${chunkLength(m, k)}`);
    }
    await Promise.all(ks.map((k) => writer.write(k, data)));
  };
  let bytes = 0;
  const main = await fetchChunks(repo, plan.reads, opts.concurrency ?? 6, C, what, sink, async (r) => {
    const n = await fetchFromCopies(repo, job.index, r, C, what, sink, (msg) => job.warnings.push(msg));
    bytes += n;
  });
  bytes += main;
  await flushing;
  return { chunks, bytes };
}

/**
 * Writes chunks to their positions in writes of `piece` bytes. The chunks a read decodes reach write() in
 * one go (fetchChunks hands them to its sink synchronously): they are gathered until the current job
 * yields and sorted by position; every run of consecutive positions whose bytes also lie back to back in
 * memory (the read's output buffer) is cut into `piece`-sized writes, all issued at once (small chunks
 * are merged, large ones split; with `piece` the chunk size, one write per chunk). Each write() resolves
 * when its chunk is written, so the caller keeps its buffer until then.
 */
class ExtentWriter {
  private pending: { k: number; data: Buffer; resolve: () => void; reject: (e: unknown) => void }[] = [];

  constructor(
    private readonly dev: BlockDevice,
    private readonly chunkSize: number,
    private readonly piece: number,
    private readonly written: (bytes: number, positions: number) => void,
  ) {}

  write(k: number, data: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.pending.push({ k, data, resolve, reject }) === 1) queueMicrotask(() => this.drain());
    });
  }

  private drain(): void {
    const batch = this.pending.sort((a, b) => a.k - b.k);
    this.pending = [];
    for (let i = 0; i < batch.length;) {
      let j = i + 1;
      let length = batch[i]!.data.length;
      while (j < batch.length && batch[j]!.k === batch[j - 1]!.k + 1 && batch[j - 1]!.data.length === this.chunkSize && follows(batch[j - 1]!.data, batch[j]!.data)) {
        length += batch[j]!.data.length;
        j++;
      }
      const run = batch.slice(i, j);
      const first = run[0]!.data;
      const buf = j - i === 1 ? first : Buffer.from(first.buffer, first.byteOffset, length);
      const offset = run[0]!.k * this.chunkSize;
      // Never rejects: a failed write (or progress callback) fails the run's chunks.
      const settle = async (): Promise<void> => {
        try {
          const writes: Promise<void>[] = [];
          for (let at = 0; at < length; at += this.piece) writes.push(this.dev.write(offset + at, buf.subarray(at, Math.min(length, at + this.piece))));
          await Promise.all(writes);
          this.written(length, run.length);
        } catch (e) {
          for (const w of run) w.reject(e);
          return;
        }
        for (const w of run) w.resolve();
      };
      void settle();
      i = j;
    }
  }
}

/**
 * The sizes of a new raw target's writes. Runs of small chunks (64, 128 KiB) are merged up to WRITE_MIN
 * (fewer system calls); chunks above WRITE_MAX are split. On this project's machines (a Firecracker guest,
 * Linux 6.18, ext4; bench/README.md, issue 19) a buffered write into fresh page-cache folios as large as
 * the write cost up to 8× the kernel CPU per byte at 4 MiB (`dd bs=4M` 1.44 s of system time for 586 MiB,
 * 0.14 s when run again). Session 13 also split 1 MiB chunks into 256 KiB writes issued one after another;
 * measured again in session 14 that cost 0.03–0.06 s of CPU per 586 MiB and twice the context switches,
 * and 1 MiB writes were not dearer than 256 KiB ones, so they are written whole.
 */
const WRITE_MIN = 256 * 1024;
const WRITE_MAX = 1024 * 1024;

/** Whether `b` starts in memory where `a` ends. */
const follows = (a: Buffer, b: Buffer): boolean => a.buffer === b.buffer && a.byteOffset + a.length === b.byteOffset;

/**
 * The error a failed restore throws. A new target that did not receive the whole backup is not a restore:
 * its temporary goes, and messages name the file the user asked for, not its temporary name. An existing
 * target that began to change holds a mix: PartialRestoreError.
 */
async function failure(e: unknown, existing: boolean, dev: BlockDevice, file: string, target: string, p: Progress): Promise<unknown> {
  if (!existing) {
    await dev.close().catch(() => undefined);
    await rm(file, { force: true }).catch(() => undefined);
    // Messages name the file the user asked for, not its temporary name.
    return namingTarget(e, file, target);
  } else if (p.writing) {
    return new PartialRestoreError(target, p.changed, p.toChange, e as Error);
  }
  return e;
}
