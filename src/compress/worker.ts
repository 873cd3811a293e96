/**
 * Worker-thread side of the compression pool: hashing, zero detection, LZ4 in batches (one task per
 * several MiB: per-chunk tasks cost more in messaging than the work itself). Input buffers arrive
 * transferred; results go back transferred as one buffer.
 */
import { Piscina } from 'piscina';
import { chunkId, initHash, ID_BYTES } from '../hash/chunkid.js';
import { decodeBlob, encodeBlob, BlobError } from './codec.js';

export interface PackTask {
  op: 'pack';
  /** Chunks back to back. */
  data: Uint8Array;
  lengths: number[];
  compress: boolean;
}
export interface UnpackTask {
  op: 'unpack';
  /** Blobs back to back. */
  data: Uint8Array;
  lengths: number[];
  /** Expected ids, 16 bytes each. */
  ids: Uint8Array;
  maxRaw: number;
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

/**
 * pack → [n ids (16 bytes each, zero id for all-zero chunks)] [n u32 blob lengths] [blobs]
 * unpack → [n u32 status lengths: raw length, or 0 + error] [chunks] ; errors as JSON after the chunks
 * hash → [n ids]
 */
export default async function run(task: PackTask | UnpackTask | HashTask): Promise<unknown> {
  await initHash();
  const src = Buffer.from(task.data.buffer, task.data.byteOffset, task.data.byteLength);
  const n = task.lengths.length;
  if (task.op === 'hash' || task.op === 'pack') {
    const ids = Buffer.alloc(n * ID_BYTES);
    const blobs: Buffer[] = [];
    let off = 0;
    for (let i = 0; i < n; i++) {
      const chunk = src.subarray(off, off + task.lengths[i]!);
      off += task.lengths[i]!;
      if (isZero(chunk)) {
        blobs.push(Buffer.alloc(0));
        continue;
      }
      chunkId(chunk, ids, i * ID_BYTES);
      if (task.op === 'pack') blobs.push(encodeBlob(chunk, ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES), task.compress));
    }
    if (task.op === 'hash') return Piscina.move(new Uint8Array(ids.buffer, ids.byteOffset, ids.byteLength));
    const total = blobs.reduce((s, b) => s + b.length, 0);
    const out = Buffer.allocUnsafeSlow(n * ID_BYTES + n * 4 + total);
    ids.copy(out, 0);
    let p = n * ID_BYTES + n * 4;
    for (let i = 0; i < n; i++) {
      out.writeUInt32LE(blobs[i]!.length, n * ID_BYTES + i * 4);
      blobs[i]!.copy(out, p);
      p += blobs[i]!.length;
    }
    return Piscina.move(new Uint8Array(out.buffer, out.byteOffset, out.byteLength));
  }
  const parts: Buffer[] = [];
  const status = Buffer.alloc(n * 4);
  const errors: Record<number, string> = {};
  let off = 0;
  for (let i = 0; i < n; i++) {
    const blob = src.subarray(off, off + task.lengths[i]!);
    off += task.lengths[i]!;
    try {
      const data = decodeBlob(blob, task.ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES), task.maxRaw);
      status.writeUInt32LE(data.length, i * 4);
      parts.push(data);
    } catch (e) {
      if (!(e instanceof BlobError)) throw e;
      errors[i] = e.message;
    }
  }
  const err = Buffer.from(JSON.stringify(errors));
  const out = Buffer.allocUnsafeSlow(4 + status.length + parts.reduce((s, b) => s + b.length, 0) + err.length);
  out.writeUInt32LE(err.length, 0);
  status.copy(out, 4);
  let p = 4 + status.length;
  for (const d of parts) p += d.copy(out, p);
  err.copy(out, p);
  return Piscina.move(new Uint8Array(out.buffer, out.byteOffset, out.byteLength));
}
