/**
 * Free-list codec (formats/ksc_inc.md §8): runs of free clusters, one sealed 16-byte entry each (tag 7,
 * index = position). The list fills whole 4 KiB pages, zero-padded, so a shorter list written over a
 * longer one leaves no stale entry behind. Pure: no I/O.
 */
import { corrupt } from '../errors.js';
import { FIRST_FREE_OFFSET, TAG_FREE } from './constants.js';
import { seal, sealOk } from './seal.js';

export const FREE_ENTRY_SIZE = 16;

/** A run of `count` consecutive clusters starting at host offset `offset`. */
export interface FreeRun {
  offset: number;
  count: number;
}

/** Bytes a list of `entries` entries occupies on disk: whole 4 KiB pages. */
export function freeListBytes(entries: number): number {
  return Math.ceil((entries * FREE_ENTRY_SIZE) / 4096) * 4096;
}

/** Encodes `runs` into a zero-padded buffer of `bytes` bytes (at least freeListBytes(runs.length)). */
export function encodeFreeList(runs: readonly FreeRun[], bytes = freeListBytes(runs.length)): Buffer {
  const buf = Buffer.alloc(bytes);
  runs.forEach((r, i) => {
    const rec = buf.subarray(i * FREE_ENTRY_SIZE, (i + 1) * FREE_ENTRY_SIZE);
    rec.writeBigUInt64LE(BigInt(r.offset), 0);
    rec.writeUInt32LE(r.count, 8);
    seal(rec, TAG_FREE, i);
  });
  return buf;
}

/**
 * Decodes `entries` entries of `buf` into cluster offsets. Every entry must be sealed, cluster-aligned,
 * past the header area and inside a file of `fileSize` bytes; otherwise KSC_E_CORRUPT naming `path`.
 */
export function decodeFreeList(buf: Buffer, entries: number, clusterSize: number, fileSize: number, path: string): number[] {
  if (buf.length < entries * FREE_ENTRY_SIZE) throw corrupt(path, 'free list', 'is truncated');
  const end = Math.ceil(fileSize / clusterSize) * clusterSize;
  const out: number[] = [];
  for (let i = 0; i < entries; i++) {
    const rec = buf.subarray(i * FREE_ENTRY_SIZE, (i + 1) * FREE_ENTRY_SIZE);
    if (!sealOk(rec, TAG_FREE, i)) throw corrupt(path, 'free list', `entry ${i} checksum mismatch`);
    const off = Number(rec.readBigUInt64LE(0));
    const count = rec.readUInt32LE(8);
    if (off % clusterSize !== 0 || off < FIRST_FREE_OFFSET || count < 1 || off + count * clusterSize > end) {
      throw corrupt(path, 'free list', `entry ${i} is outside the file`);
    }
    for (let c = 0; c < count; c++) out.push(off + c * clusterSize);
  }
  return out;
}
