/**
 * The reads of a bulk fetch from a backup (formats/ksc_inc.md §4.2, `kscinc pull`): chunk positions that
 * need the same blob share it, blobs are ordered by pack and offset, and neighbours are coalesced into
 * reads of at most `maxRead` bytes. Pure: the index and the ids come in, the plan goes out.
 */
import { type Blob, type Read, coalesce } from '../repo/fetch.js';
import type { ChunkIndex } from '../repo/repository.js';

export interface BulkPlan {
  /** The coalesced reads; each item's `from` is its position list's number. */
  reads: Read[];
  /** positions[i]: the chunk positions served by blob i. */
  positions: number[][];
  /** The largest read (stored bytes) and the largest unpacked total, for buffer sizes. */
  inBytes: number;
  outBytes: number;
}

/** `ks`: the positions to fetch (zero chunks left out); `missing` builds the error for an id no index has. */
export function planBulkReads(ks: number[], index: ChunkIndex, idOf: (k: number) => Buffer, missing: (k: number, id: Buffer) => Error, maxRead: number): BulkPlan {
  const bySlot = new Map<number, number[]>();
  for (const k of ks) {
    const id = idOf(k);
    const s = index.slotOf(id);
    if (s < 0) throw missing(k, id);
    const l = bySlot.get(s);
    if (l) l.push(k);
    else bySlot.set(s, [k]);
  }
  const slots = [...bySlot.keys()].sort((a, b) => index.packNumber(a) - index.packNumber(b) || index.blobOffset(a) - index.blobOffset(b));
  const positions: number[][] = [];
  const blobs: Blob[] = slots.map((s, i) => {
    positions.push(bySlot.get(s)!);
    return {
      pack: index.packName(s),
      offset: index.blobOffset(s),
      length: index.blobLength(s),
      rawLength: index.rawLengthAt(s),
      item: { id: index.idAt(s), at: 0, length: index.blobLength(s), from: i },
    };
  });
  const reads = [...coalesce(blobs, maxRead)];
  let inBytes = 0;
  let outBytes = 0;
  for (const r of reads) {
    inBytes = Math.max(inBytes, r.length);
    outBytes = Math.max(outBytes, r.raw);
  }
  return { reads, positions, inBytes, outBytes };
}
