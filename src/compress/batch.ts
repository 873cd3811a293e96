/**
 * The work done on one batch of chunks — zero check, chunk id, LZ4 into one output buffer — shared by the
 * worker threads and by the caller's thread (small jobs, where starting workers costs more than the work).
 */
import { chunkId, ID_BYTES } from '../hash/chunkid.js';
import { writeBlobHeader, BLOB_HEADER, COMP_LZ4, COMP_NONE } from './codec.js';
import { compressInto, lz4Bound } from './lz4.js';
import { encryptInto, keyedId, NONCE, TAG } from '../crypto/aead.js';

/**
 * The keys of an encrypted repository as the workers take them (formats/repository.md §13.2, keys.ts
 * workerKeys): K_data first, then the chunk-id keys. Absent: an unencrypted repository.
 */
export type BlobKeys = Uint8Array | undefined;

/** The id of `chunk` into `out` at `at`: keyed (§13.6) or not (§2). */
function idOf(chunk: Buffer, out: Buffer, at: number, keys: BlobKeys): void {
  if (keys) keyedId(keys, chunk, out, at);
  else chunkId(chunk, out, at);
}

const ZERO = Buffer.alloc(65536);

export function isZero(b: Buffer): boolean {
  // Compare 64 KiB slices against a zero buffer: memcmp speed, early exit on data.
  for (let o = 0; o < b.length; o += ZERO.length) {
    const n = Math.min(ZERO.length, b.length - o);
    if (!b.subarray(o, o + n).equals(n === ZERO.length ? ZERO : ZERO.subarray(0, n))) return false;
  }
  return true;
}

/**
 * Chunk ids of chunks lying back to back in `src` (the zero id for an all-zero chunk). The hasher must be
 * initialised (initHash).
 */
export function hashBatch(src: Buffer, lengths: number[], keys?: BlobKeys): Buffer {
  const ids = Buffer.alloc(lengths.length * ID_BYTES);
  let off = 0;
  for (let i = 0; i < lengths.length; i++) {
    const chunk = src.subarray(off, off + lengths[i]!);
    off += lengths[i]!;
    if (!isZero(chunk)) idOf(chunk, ids, i * ID_BYTES, keys);
  }
  return ids;
}

/**
 * A packed chunk: its 16-byte id (all zeros for an all-zero chunk, whose blob is then empty) and its blob.
 * With `tail`, the blob is `blob` (its 32-byte header) followed by `tail`: the chunk stored as it is, a
 * view of the caller's input (LZ4 could not shrink it; it was not copied), which must then stay unchanged
 * for as long as the blob is used.
 */
export interface PackedChunk {
  id: Buffer;
  blob: Buffer;
  tail?: Buffer;
}

/**
 * packBatchSync for the caller's own thread and an unencrypted repository: the same ids and blob bytes,
 * but a chunk LZ4 cannot shrink is not copied: its blob is a header and a `tail` view of `src` (§5.2's
 * stored form), so `src` must not be reused while the blobs are. Fresh pages are dear (a page fault per
 * 4 KiB); for random data this writes ≈ 32 bytes a chunk instead of the whole chunk.
 */
export function packBatchViews(src: Buffer, lengths: number[], compress: boolean): PackedChunk[] {
  const n = lengths.length;
  const ids = Buffer.alloc(n * ID_BYTES);
  const zero: boolean[] = [];
  let cap = 0;
  let off = 0;
  for (let i = 0; i < n; i++) {
    const chunk = src.subarray(off, off + lengths[i]!);
    off += lengths[i]!;
    zero.push(isZero(chunk));
    if (zero[i]) continue;
    idOf(chunk, ids, i * ID_BYTES, undefined);
    cap += BLOB_HEADER + (compress ? lz4Bound(chunk.length) : 0);
  }
  // A failed LZ4 attempt leaves its room to the next chunk: only what is kept advances `p`.
  const out = Buffer.allocUnsafeSlow(cap);
  const chunks: PackedChunk[] = [];
  let p = 0;
  off = 0;
  for (let i = 0; i < n; i++) {
    const len = lengths[i]!;
    const chunk = src.subarray(off, off + len);
    const id = ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES);
    off += len;
    if (zero[i]) {
      chunks.push({ id, blob: out.subarray(0, 0) });
      continue;
    }
    const stored = compress ? compressInto(chunk, out, p + BLOB_HEADER) : 0;
    writeBlobHeader(out, p, stored === 0 ? COMP_NONE : COMP_LZ4, len, stored === 0 ? len : stored, ids, i * ID_BYTES);
    chunks.push(stored === 0 ? { id, blob: out.subarray(p, p + BLOB_HEADER), tail: chunk } : { id, blob: out.subarray(p, p + BLOB_HEADER + stored) });
    p += BLOB_HEADER + stored;
  }
  return chunks;
}

/**
 * Packs chunks lying back to back in `src` into one buffer:
 *   [n ids (16 bytes each, the zero id for all-zero chunks)] [n u32 LE blob lengths (0: all zeros)] [blobs]
 * Each blob is a 32-byte header and the chunk, LZ4-compressed when `compress` and smaller, else stored.
 * The hasher must be initialised (initHash).
 */
export function packBatchSync(src: Buffer, lengths: number[], compress: boolean, keys?: BlobKeys): Buffer {
  const dataKey = keys ? Buffer.from(keys.buffer, keys.byteOffset, 32) : null;
  // §13.5: an encrypted blob's stored bytes are nonce ‖ ciphertext ‖ tag; the plain stored bytes are made
  // after the nonce's room and encrypted in place.
  const extra = dataKey ? NONCE + TAG : 0;
  const body = BLOB_HEADER + (dataKey ? NONCE : 0);
  const n = lengths.length;
  const head = n * ID_BYTES + n * 4;
  const ids = Buffer.alloc(n * ID_BYTES);
  const zero: boolean[] = [];
  let cap = head;
  let off = 0;
  for (let i = 0; i < n; i++) {
    const chunk = src.subarray(off, off + lengths[i]!);
    off += lengths[i]!;
    zero.push(isZero(chunk));
    if (zero[i]) continue;
    idOf(chunk, ids, i * ID_BYTES, keys);
    cap += BLOB_HEADER + extra + Math.max(chunk.length, lz4Bound(chunk.length));
  }
  const out = Buffer.allocUnsafeSlow(cap);
  ids.copy(out, 0);
  let p = head;
  off = 0;
  for (let i = 0; i < n; i++) {
    const len = lengths[i]!;
    const chunk = src.subarray(off, off + len);
    off += len;
    if (zero[i]) {
      out.writeUInt32LE(0, n * ID_BYTES + i * 4);
      continue;
    }
    let stored = compress ? compressInto(chunk, out, p + body) : 0;
    let method = COMP_LZ4;
    if (stored === 0) {
      chunk.copy(out, p + body);
      stored = len;
      method = COMP_NONE;
    }
    writeBlobHeader(out, p, method, len, stored + extra, ids, i * ID_BYTES, dataKey !== null);
    if (dataKey) stored = encryptInto(dataKey, out.subarray(p, p + BLOB_HEADER), out.subarray(p + body, p + body + stored), out, p + BLOB_HEADER);
    out.writeUInt32LE(BLOB_HEADER + stored, n * ID_BYTES + i * 4);
    p += BLOB_HEADER + stored;
  }
  return out;
}
