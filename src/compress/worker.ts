/**
 * Worker-thread side of the compression pool: hashing, zero detection, LZ4 in batches (one task per
 * several MiB: per-chunk tasks cost more in messaging than the work itself). Input buffers arrive
 * transferred; results go back transferred as one buffer.
 */
import { Piscina } from 'piscina';
import { chunkId, initHash, ID_BYTES } from '../hash/chunkid.js';
import { decodeBlobInto, blobRawLength, writeBlobHeader, BlobError, BLOB_HEADER, COMP_LZ4, COMP_NONE } from './codec.js';
import { compressInto, lz4Bound } from './lz4.js';

export interface PackTask {
  op: 'pack';
  /** Chunks back to back. */
  data: Uint8Array;
  lengths: number[];
  compress: boolean;
}
/** Decodes blobs from shared memory into shared memory: nothing is allocated or transferred per batch. */
export interface UnpackTask {
  op: 'unpack';
  data: Uint8Array;
  ranges: [number, number][];
  ids: Uint8Array;
  maxRaw: number;
  /** Decoded chunks go here back to back (a view of a SharedArrayBuffer, like `data`). */
  out: Uint8Array;
}

export interface HashTask {
  op: 'hash';
  data: Uint8Array;
  lengths: number[];
}

function isZero(b: Buffer): boolean {
  // Compare 64 KiB slices against a zero buffer: memcmp speed, early exit on data.
  for (let o = 0; o < b.length; o += ZERO.length) {
    const n = Math.min(ZERO.length, b.length - o);
    if (!b.subarray(o, o + n).equals(n === ZERO.length ? ZERO : ZERO.subarray(0, n))) return false;
  }
  return true;
}
const ZERO = Buffer.alloc(65536);

/** A result that moves several buffers back to the caller (the output, and the input for reuse). */
class Moved {
  constructor(private readonly value: unknown, private readonly list: ArrayBuffer[]) {}
  get [Piscina.transferableSymbol](): ArrayBuffer[] {
    return this.list;
  }
  get [Piscina.valueSymbol](): unknown {
    return this.value;
  }
}

/**
 * pack → { out: [n ids (16 bytes each, zero id for all-zero chunks)] [n u32 blob lengths] [blobs], input }
 *   (the input buffer goes back too, so the caller reuses it: no allocation per batch on either side)
 * unpack → { lengths (0 = failed), errors: { index: reason } }; the chunks are in task.out
 * hash → [n ids]
 */
export default async function run(task: PackTask | UnpackTask | HashTask): Promise<unknown> {
  await initHash();
  if (task.op === 'unpack') return unpack(task);
  const src = Buffer.from(task.data.buffer, task.data.byteOffset, task.data.byteLength);
  const n = task.lengths.length;
  if (task.op === 'hash') {
    const ids = Buffer.alloc(n * ID_BYTES);
    let off = 0;
    for (let i = 0; i < n; i++) {
      const chunk = src.subarray(off, off + task.lengths[i]!);
      off += task.lengths[i]!;
      if (!isZero(chunk)) chunkId(chunk, ids, i * ID_BYTES);
    }
    return Piscina.move(new Uint8Array(ids.buffer, ids.byteOffset, ids.byteLength));
  }
  if (task.op === 'pack') {
    // Zero-check and hash, then compress straight into one output buffer sized for the worst case.
    const head = n * ID_BYTES + n * 4;
    const ids = Buffer.alloc(n * ID_BYTES);
    const zero: boolean[] = [];
    let cap = head;
    let off = 0;
    for (let i = 0; i < n; i++) {
      const chunk = src.subarray(off, off + task.lengths[i]!);
      off += task.lengths[i]!;
      zero.push(isZero(chunk));
      if (zero[i]) continue;
      chunkId(chunk, ids, i * ID_BYTES);
      cap += BLOB_HEADER + Math.max(chunk.length, lz4Bound(chunk.length));
    }
    const out = Buffer.allocUnsafeSlow(cap);
    ids.copy(out, 0);
    let p = head;
    off = 0;
    for (let i = 0; i < n; i++) {
      const len = task.lengths[i]!;
      const chunk = src.subarray(off, off + len);
      off += len;
      if (zero[i]) {
        out.writeUInt32LE(0, n * ID_BYTES + i * 4);
        continue;
      }
      let stored = task.compress ? compressInto(chunk, out, p + BLOB_HEADER) : 0;
      let method = COMP_LZ4;
      if (stored === 0) {
        chunk.copy(out, p + BLOB_HEADER);
        stored = len;
        method = COMP_NONE;
      }
      writeBlobHeader(out, p, method, len, stored, ids, i * ID_BYTES);
      out.writeUInt32LE(BLOB_HEADER + stored, n * ID_BYTES + i * 4);
      p += BLOB_HEADER + stored;
    }
    const input = task.data.buffer as ArrayBuffer;
    return Piscina.move(new Moved({ out: new Uint8Array(out.buffer as ArrayBuffer, out.byteOffset, out.byteLength), input: new Uint8Array(input) }, [out.buffer as ArrayBuffer, input]) as never);
  }
}

function unpack(task: UnpackTask): { lengths: number[]; errors: Record<number, string> } {
  const src = Buffer.from(task.data.buffer, task.data.byteOffset, task.data.byteLength);
  const out = Buffer.from(task.out.buffer, task.out.byteOffset, task.out.byteLength);
  const lengths: number[] = [];
  const errors: Record<number, string> = {};
  let p = 0;
  for (let i = 0; i < task.ranges.length; i++) {
    const [at, len] = task.ranges[i]!;
    try {
      const n = decodeBlobInto(src.subarray(at, at + len), task.ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES), task.maxRaw, out, p);
      lengths.push(n);
      p += n;
    } catch (e) {
      if (!(e instanceof BlobError)) throw e;
      errors[i] = e.message;
      lengths.push(0);
    }
  }
  return { lengths, errors };
}
