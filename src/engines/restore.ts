/**
 * The restore engine: manifest → index → packs (formats/repository.md §9 rule 4). Chunks are fetched with
 * many ranged reads in flight (neighbouring blobs of one pack coalesced into one read), verified and
 * decompressed in workers, and written in place; all-zero chunks stay holes. Restoring over an existing
 * file writes only the chunks whose contents differ.
 */
import { rm, stat } from 'node:fs/promises';
import { KscError, isDamage } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { RawDevice } from '../image/raw.js';
import { createImage, openImage } from '../image/open.js';
import { ZERO_ID } from '../hash/chunkid.js';
import { hashChunks, unpackInto, warmPool, SharedSlot } from '../compress/pool.js';
import { BLOB_HEADER } from '../compress/codec.js';
import { ChunkIndex, Repository, mapLimit, packKey } from '../repo/repository.js';
import type { Manifest } from '../repo/format.js';
import { uuidToBytes } from '../util/uuid.js';
import { isoUtc } from '../util/time.js';

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
}

export interface BackupSummary {
  id: string;
  disk: string;
  time: string;
  size: number;
  full: boolean;
  parent: string | null;
  tags: string[];
  bytesStored: number;
  bytesNew: number;
  source: string;
}

export function summarize(m: Manifest): BackupSummary {
  return {
    id: m.meta.id, disk: m.disk, time: isoUtc(m.timeMs), size: m.size, full: m.full, parent: m.meta.parent,
    tags: m.meta.tags, bytesStored: m.meta.stats.bytesStored, bytesNew: m.meta.stats.bytesNew, source: m.meta.source,
  };
}

/**
 * Every backup, oldest first; a damaged manifest is reported through `onDamage` (thrown when absent).
 * `pick` keeps what the caller needs of each manifest as it is read (8 at a time), so a repository of many
 * backups need not be held whole.
 */
export async function listBackups(repo: Repository, onDamage?: (id: string, e: KscError) => void): Promise<Manifest[]>;
export async function listBackups<T>(repo: Repository, onDamage: ((id: string, e: KscError) => void) | undefined, pick: (m: Manifest) => T): Promise<T[]>;
export async function listBackups<T>(repo: Repository, onDamage?: (id: string, e: KscError) => void, pick?: (m: Manifest) => T): Promise<(T | Manifest)[]> {
  const ids = await repo.listBackupIds();
  const got: ({ v: T | Manifest } | null)[] = new Array(ids.length).fill(null);
  await mapLimit(ids, 8, async (id, i) => {
    try {
      const m = await repo.readManifest(id);
      got[i] = { v: pick ? pick(m) : m };
    } catch (e) {
      if (onDamage && isDamage(e)) onDamage(id, e);
      else throw e;
    }
  });
  return got.filter((x) => x !== null).map((x) => x!.v);
}

/** Resolves "latest" (of `disk` when given) or a backup id to its manifest. */
export async function resolveBackup(repo: Repository, which: string, disk?: string): Promise<Manifest> {
  if (which !== 'latest') {
    const m = await repo.readManifest(which);
    if (disk && m.disk !== disk) throw new KscError('KSC_E_INVALID', `backup ${which} is of disk ${m.disk}, not ${disk}`);
    return m;
  }
  const ids = (await repo.listBackupIds()).reverse();
  let found: string | null = null;
  const disks = new Set<string>();
  for (const id of ids) {
    const m = await repo.readManifestInfo(id); // headers only: the chunk list of the one found is read below
    disks.add(m.disk);
    if (!disk || m.disk === disk) {
      found ??= id;
      if (disk) break;
    }
  }
  if (!found) throw new KscError('KSC_E_NOT_FOUND', disk ? `no backup of disk ${disk} in ${repo.name}` : `no backups in ${repo.name}`);
  if (!disk && disks.size > 1) throw new KscError('KSC_E_INVALID', `${repo.name} holds backups of ${disks.size} disks (${[...disks].join(', ')}): say which with --disk UUID`);
  return repo.readManifest(found);
}

/** One chunk of a coalesced read. `from`/`to`: for a restore, the range of its plan's order holding the positions that need it. */
interface ReadItem {
  id: Buffer;
  at: number;
  length: number;
  from?: number;
  to?: number;
}

export interface Read {
  pack: string;
  offset: number;
  length: number;
  /** Sum of the items' raw lengths (what the read decodes to). */
  raw: number;
  items: ReadItem[];
}

/** A coalesced read decodes to at most this much (several small blobs can stand for many MiB). */
const MAX_READ_RAW = 16 * 1024 * 1024;
/** Blobs closer than this in a pack are read together (the gap is read and dropped). */
const MAX_READ_GAP = 256 * 1024;

interface Blob {
  pack: string;
  offset: number;
  length: number;
  rawLength: number;
  item: ReadItem;
}

/** Merges blobs sorted by (pack, offset) into reads of at most `maxRead` bytes, as they are consumed. */
function* coalesce(blobs: Iterable<Blob>, maxRead: number): Generator<Read> {
  let cur: Read | null = null;
  for (const b of blobs) {
    const gap = cur && cur.pack === b.pack ? b.offset - (cur.offset + cur.length) : -1;
    if (cur && gap >= 0 && gap <= MAX_READ_GAP && b.offset + b.length - cur.offset <= maxRead && cur.raw + b.rawLength <= MAX_READ_RAW) {
      cur.length = b.offset + b.length - cur.offset;
      cur.raw += b.rawLength;
    } else {
      if (cur) yield cur;
      cur = { pack: b.pack, offset: b.offset, length: b.length, raw: b.rawLength, items: [] };
    }
    b.item.at = b.offset - cur.offset;
    cur.items.push(b.item);
  }
  if (cur) yield cur;
}

const notIndexed = (what: string, id: Buffer): KscError =>
  new KscError('KSC_E_CORRUPT', `${what}: chunk ${id.toString('hex')} is in no index object (repository damaged: run "kscinc verify")`);

/** Coalesced reads (of at most 16 MiB) of the chunks in index `slots`, which are all in one pack, sorted by offset. */
export function readsOf(slots: number[], index: ChunkIndex): Read[] {
  return [...coalesce(slots.map((s) => ({
    pack: index.packName(s), offset: index.blobOffset(s), length: index.blobLength(s), rawLength: index.rawLengthAt(s),
    item: { id: index.idAt(s), at: 0, length: index.blobLength(s) },
  })), 16 * 1024 * 1024)];
}

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

/** Fetches and decodes the reads; calls `sink` with each chunk (verified against its id). */
export async function fetchChunks(repo: Repository, reads: Iterable<Read>, concurrency: number, maxRaw: number, what: string,
  sink: (id: Buffer, data: Buffer, item: ReadItem) => Promise<void>): Promise<number> {
  let fetched = 0;
  // One pair of shared buffers per read in flight, reused (see SharedSlot), sized by a first pass over the
  // reads (an iterable that is not an array is made twice).
  let inputBytes = 0;
  let outputBytes = 0;
  for (const r of reads) {
    inputBytes = Math.max(inputBytes, r.length);
    outputBytes = Math.max(outputBytes, r.raw);
  }
  const free: SharedSlot[] = [];
  const store = repo.store;
  await mapLimit(reads, concurrency, async (r) => {
    const key = packKey(r.pack);
    const slot = free.pop() ?? new SharedSlot(inputBytes, Math.max(outputBytes, BLOB_HEADER));
    try {
      const target = slot.input.subarray(0, r.length);
      if (store.getRangeInto) await store.getRangeInto(key, r.offset, target);
      else {
        const got = await store.getRange(key, r.offset, r.length);
        if (got.length !== r.length) throw new KscError('KSC_E_CORRUPT', `repository object ${repo.objName(key)}: ${got.length} bytes at offset ${r.offset}, ${r.length} expected`);
        got.copy(target);
      }
      fetched += r.length;
      const res = await unpackInto(slot, r.items.map((it) => [it.at, it.length]), r.items.map((it) => it.id), maxRaw);
      for (let i = 0; i < res.length; i++) {
        const x = res[i]!;
        if (!x.ok) throw new KscError('KSC_E_CORRUPT', `repository object ${repo.objName(key)}: chunk ${r.items[i]!.id.toString('hex')} at offset ${r.offset + r.items[i]!.at}: ${x.error} (${what})`);
      }
      await Promise.all(res.map((x, i) => sink(r.items[i]!.id, (x as { data: Buffer }).data, r.items[i]!)));
    } finally {
      free.push(slot); // every sink has finished with the slot's views (or the read failed)
    }
  });
  return fetched;
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

/** Restores backup `which` ("latest" or an id) to the file `target`. */
/** Under a shared lock (§8 rule 6), so a prune cannot remove what the restore reads; it waits for one that runs. */
export async function restoreBackup(repo: Repository, which: string, target: string, opts: RestoreOptions & { disk?: string; lockWaitMs?: number } = {}): Promise<RestoreResult> {
  const lock = await repo.readerLock(`restore of ${which} to ${target}`, opts.lockWaitMs);
  try {
    return await restoreLocked(repo, which, target, opts); // every chunk is checked: a lost lock cannot make it wrong
  } finally {
    await lock?.release();
  }
}

async function restoreLocked(repo: Repository, which: string, target: string, opts: RestoreOptions & { disk?: string }): Promise<RestoreResult> {
  const t0 = performance.now();
  warmPool();
  const m = await resolveBackup(repo, which, opts.disk);
  const C = m.chunkSize;
  const chunks = m.ids.length;
  const what = `restore of backup ${m.meta.id}`;
  const existing = await exists(target);
  let dev: BlockDevice;
  let format: 'raw' | 'ksc_inc';
  if (existing) {
    dev = await openImage(target, { write: true });
    format = dev.format;
    if (dev.size !== m.size) {
      await dev.close();
      throw new KscError('KSC_E_INVALID', `${target} is ${dev.size} bytes but backup ${m.meta.id} is ${m.size}: restore to a new file instead`);
    }
  } else {
    format = opts.format ?? 'raw';
    if (format === 'ksc_inc') {
      await createImage(target, { size: m.size, diskUuid: uuidToBytes(m.disk) });
      dev = await openImage(target, { write: true });
    } else {
      dev = await RawDevice.create(target, m.size);
    }
  }
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
        const ids = await hashChunks(data);
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
    for (const k of candidates) {
      const id = idAt(k);
      if (id.equals(ZERO_ID)) {
        if (existing) {
          await dev.writeZeroes(k * C, lenAt(k), { mayTrim: true });
          bytesWritten += lenAt(k);
        }
        continue;
      }
      fetch.push(k);
    }
    candidates = [];
    // A damaged index object only matters if a chunk we need is listed nowhere else (§6: the index is the union).
    const badIndex: string[] = [];
    // Only the entries of the chunks this restore fetches are kept: memory follows the backup, not the repository.
    const needed = new ChunkIndex({ locations: false, expected: fetch.length });
    for (const k of fetch) needed.addAt(idAt(k), 0, '', 0, 0, 0);
    const index = await repo.loadIndex((key) => badIndex.push(repo.objName(key)), { only: (b, at) => needed.hasAt(b, at) });
    const plan = restorePlan(fetch, idAt, index, opts.maxReadBytes ?? 4 * 1024 * 1024, badIndex.length ? `${what} (damaged index object ${badIndex.join(', ')})` : what);
    const totalBytes = fetch.reduce((sum, k) => sum + lenAt(k), 0);
    let done = 0;
    let fetchedChunks = 0;
    // Flush in the background every 64 MiB written, so the final flush does not carry the whole restore.
    let sinceFlush = 0;
    let flushing: Promise<void> | null = null;
    const bytesFetched = await fetchChunks(repo, plan.reads, opts.concurrency ?? 6, C, what, async (id, data, item) => {
      fetchedChunks++;
      const ks: number[] = [];
      for (let p = item.from!; p < item.to!; p++) ks.push(fetch[plan.order[p]!]!);
      await Promise.all(ks.map(async (k) => {
        if (data.length !== lenAt(k)) throw new KscError('KSC_E_CORRUPT', `${what}: chunk ${id.toString('hex')} is ${data.length} bytes, position ${k} needs ${lenAt(k)}`);
        await dev.write(k * C, data);
        bytesWritten += data.length;
        done += data.length;
        sinceFlush += data.length;
      }));
      if (sinceFlush >= 64 * 1024 * 1024 && !flushing) {
        sinceFlush = 0;
        flushing = dev.flush().finally(() => (flushing = null));
      }
      opts.progress?.({ doneBytes: done, totalBytes });
    });
    await flushing;
    await dev.flush();
    const durationMs = Math.round(performance.now() - t0);
    return {
      backup: m.meta.id, target, format, size: m.size, chunks, chunksZero, chunksFetched: fetchedChunks, chunksUnchanged,
      bytesFetched, bytesWritten, durationMs, throughput: durationMs > 0 ? (m.size / durationMs) * 1000 : 0,
    };
  } catch (e) {
    if (!existing) {
      // A new target that did not receive the whole backup is not a restore: remove it.
      await dev.close().catch(() => undefined);
      await rm(target, { force: true }).catch(() => undefined);
    }
    throw e;
  } finally {
    await dev.close().catch(() => undefined);
  }
}
