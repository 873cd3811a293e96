/**
 * Reading chunks out of packs, the repository side of restore, verify and prune's copy choice: blobs of
 * one pack close together are coalesced into one ranged read, many reads are in flight, each blob is
 * checked and decompressed in the workers (formats/repository.md §5.2), and a read that fails its checks
 * can be retried chunk by chunk from the chunk's other copies (§6.1).
 */
import { KscError, isDamage } from '../errors.js';
import { unpackInto, SharedSlot } from '../compress/pool.js';
import { BLOB_HEADER } from '../compress/codec.js';
import { mapLimit } from '../util/concurrency.js';
import type { ChunkIndex } from './chunkindex.js';
import { packKey } from './constants.js';
import type { Repository } from './repository.js';

/** One chunk of a coalesced read. `from`/`to`: for a restore, the range of its plan's order holding the positions that need it. */
export interface ReadItem {
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

export interface Blob {
  pack: string;
  offset: number;
  length: number;
  rawLength: number;
  item: ReadItem;
}

/** Merges blobs sorted by (pack, offset) into reads of at most `maxRead` bytes, as they are consumed. */
export function* coalesce(blobs: Iterable<Blob>, maxRead: number): Generator<Read> {
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

/** Coalesced reads (of at most 16 MiB) of the chunks in index `slots`, which are all in one pack, sorted by offset. */
export function readsOf(slots: number[], index: ChunkIndex): Read[] {
  return [
    ...coalesce(
      slots.map((s) => ({
        pack: index.packName(s),
        offset: index.blobOffset(s),
        length: index.blobLength(s),
        rawLength: index.rawLengthAt(s),
        item: { id: index.idAt(s), at: 0, length: index.blobLength(s) },
      })),
      16 * 1024 * 1024,
    ),
  ];
}

/**
 * Fetches and decodes the reads; calls `sink` with each chunk (verified against its id). A read that fails
 * its checks (or whose pack is missing) goes to `onFail` when given, which then owns its items (none of
 * them has reached `sink`); otherwise the error is thrown.
 */
export async function fetchChunks(
  repo: Repository,
  reads: Iterable<Read>,
  concurrency: number,
  maxRaw: number,
  what: string,
  sink: (id: Buffer, data: Buffer, item: ReadItem) => Promise<void>,
  onFail?: (r: Read, e: KscError) => Promise<void>,
): Promise<number> {
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
    let res: Awaited<ReturnType<typeof unpackInto>>;
    let released = false;
    try {
      try {
        const target = slot.input.subarray(0, r.length);
        if (store.getRangeInto) await store.getRangeInto(key, r.offset, target);
        else {
          const got = await store.getRange(key, r.offset, r.length);
          if (got.length !== r.length) throw new KscError('KSC_E_CORRUPT', `repository object ${repo.objName(key)}: ${got.length} bytes at offset ${r.offset}, ${r.length} expected`);
          got.copy(target);
        }
        fetched += r.length;
        res = await unpackInto(
          slot,
          r.items.map((it) => [it.at, it.length]),
          r.items.map((it) => it.id),
          maxRaw,
          repo.blobKeys,
        );
        for (let i = 0; i < res.length; i++) {
          const x = res[i]!;
          if (!x.ok)
            throw new KscError('KSC_E_CORRUPT', `repository object ${repo.objName(key)}: chunk ${r.items[i]!.id.toString('hex')} at offset ${r.offset + r.items[i]!.at}: ${x.error} (${what})`);
        }
      } catch (e) {
        if (!onFail || !isDamage(e)) throw e;
        released = true;
        free.push(slot); // nothing holds a view of it: onFail reads with slots of its own
        await onFail(r, e);
        return;
      }
      await Promise.all(res.map((x, i) => sink(r.items[i]!.id, (x as { data: Buffer }).data, r.items[i]!)));
    } finally {
      if (!released) free.push(slot); // every sink has finished with the slot's views (or the read failed)
    }
  });
  return fetched;
}

/**
 * For a read that failed its checks: fetches each of its chunks alone, from its first copy that passes
 * (§6: any copy whose blob checks out is good), into `sink`. Calls `note` for every copy that failed when
 * another was used. Throws when every copy of a chunk fails: the single copy's error, or KSC_E_CORRUPT
 * naming them all. Returns the bytes read.
 */
export async function fetchFromCopies(
  repo: Repository,
  index: ChunkIndex,
  r: Read,
  maxRaw: number,
  what: string,
  sink: (id: Buffer, data: Buffer, item: ReadItem) => Promise<void>,
  note: (msg: string) => void,
): Promise<number> {
  let bytes = 0;
  for (const item of r.items) {
    const s = index.slotOf(item.id);
    const hs = s < 0 ? [] : index.copies(s);
    const errors: { pack: string; e: KscError }[] = [];
    let done = false;
    for (const h of hs) {
      const read: Read = { pack: index.packName(h), offset: index.blobOffset(h), length: index.blobLength(h), raw: index.rawLengthAt(h), items: [{ ...item, at: 0, length: index.blobLength(h) }] };
      try {
        bytes += await fetchChunks(repo, [read], 1, maxRaw, what, sink);
        done = true;
      } catch (e) {
        if (!isDamage(e)) throw e;
        errors.push({ pack: read.pack, e });
        continue;
      }
      for (const x of errors)
        note(`chunk ${item.id.toString('hex')}: the copy in ${repo.objName(packKey(x.pack))} failed its check (${x.e.message}); used the copy in ${repo.objName(packKey(read.pack))}`);
      break;
    }
    if (done) continue;
    if (errors.length === 1) throw errors[0]!.e;
    const code = errors.every((x) => x.e.code === 'KSC_E_NOT_FOUND') ? 'KSC_E_NOT_FOUND' : 'KSC_E_CORRUPT';
    throw new KscError(code, `${what}: every copy of chunk ${item.id.toString('hex')} failed its check: ${errors.map((x) => x.e.message).join('; ')}`);
  }
  return bytes;
}
