/**
 * How much of its backup a live-restored image holds itself (formats/ksc_inc.md §4.2): the chunks that
 * still read through the backing (what a pull fetches), and the share of the backup that is local (what
 * `kscinc info` and `kscinc status` show). Zero chunks of the backup never count: they cost nothing.
 */
import { KscImage } from './ksc.js';
import type { BlockDevice } from './types.js';
import { BackupBacking } from './repobacking.js';

export interface LocalShare {
  backup: string;
  /** Non-zero chunks of the backup, and how many of them the image holds in every block. */
  totalChunks: number;
  localChunks: number;
  /** The same in bytes of the disk. */
  totalBytes: number;
  localBytes: number;
}

/** Chunks that still read (some of their bytes) through the backing, in order. */
export async function remainingChunks(img: KscImage, b: BackupBacking): Promise<number[]> {
  const C = b.blockSize;
  const out = new Set<number>();
  for (const e of await img.extents(0, img.size)) {
    if (e.depth === 0 || e.state !== 'data') continue;
    for (let k = Math.floor(e.offset / C); k * C < e.offset + e.length; k++) if (!b.isZeroChunk(k) && !b.isBaseChunk(k)) out.add(k);
  }
  return [...out].sort((x, y) => x - y);
}

/** Bytes of the disk chunk `k` of `b` covers (the last one may be short). */
export function chunkBytes(b: BackupBacking, k: number): number {
  return Math.min(b.blockSize, b.size - k * b.blockSize);
}

/** Non-zero chunks of the backup that are fetched (not base chunks) and the bytes they cover. */
export function backupTotals(b: BackupBacking): { chunks: number; bytes: number } {
  let bytes = 0;
  let chunks = 0;
  b.manifest.ids.forEachNonZero((k) => {
    if (b.isBaseChunk(k)) return; // §4.2 rule 9: read from the local base, never fetched
    bytes += chunkBytes(b, k);
    chunks++;
  });
  return { chunks, bytes };
}

/** The share of its backup `img` holds; null when its backing is not a backup. */
export async function localShare(img: KscImage): Promise<LocalShare | null> {
  const b = img.backing;
  if (!(b instanceof BackupBacking)) return null;
  const left = await remainingChunks(img, b);
  const t = backupTotals(b);
  let leftBytes = 0;
  for (const k of left) leftBytes += chunkBytes(b, k);
  return { backup: b.manifest.meta.id, totalChunks: t.chunks, localChunks: t.chunks - left.length, totalBytes: t.bytes, localBytes: t.bytes - leftBytes };
}

/** `dev` as a live restore open for writing (a ksc_inc image over a backup, §4.2); null for any other device. */
export function writableLiveRestore(dev: BlockDevice): { img: KscImage; backing: BackupBacking } | null {
  return dev instanceof KscImage && !dev.readOnly && dev.backing instanceof BackupBacking ? { img: dev, backing: dev.backing } : null;
}
