/**
 * Blob codec (formats/repository.md §5.2, §5.4): a 32-byte header, then the chunk stored raw or as
 * u32 raw length + one LZ4 block (lz4-napi's compressSync writes exactly that). Runs in workers.
 */
import { compressSync, uncompressSync } from 'lz4-napi';
import { chunkId, ID_BYTES } from '../hash/chunkid.js';

export const BLOB_MAGIC = 0x424c424b; // "KBLB" read as u32 LE
export const BLOB_HEADER = 32;
export const COMP_NONE = 0;
export const COMP_LZ4 = 1;

/** Builds a blob for `chunk` whose id is `id`; compressed only when that makes it smaller. */
export function encodeBlob(chunk: Buffer, id: Uint8Array, compress = true): Buffer {
  let stored: Buffer = chunk;
  let method = COMP_NONE;
  if (compress) {
    const c = compressSync(chunk);
    if (c.length < chunk.length) {
      stored = c;
      method = COMP_LZ4;
    }
  }
  const blob = Buffer.allocUnsafe(BLOB_HEADER + stored.length);
  blob.writeUInt32LE(BLOB_MAGIC, 0);
  blob[4] = method;
  blob[5] = blob[6] = blob[7] = 0;
  blob.writeUInt32LE(chunk.length, 8);
  blob.writeUInt32LE(stored.length, 12);
  blob.set(id.subarray(0, ID_BYTES), 16);
  stored.copy(blob, BLOB_HEADER);
  return blob;
}

/** Why a blob failed to decode: the caller names the object. */
export class BlobError extends Error {}

/**
 * Decodes and verifies a blob: magic, lengths, the expected id, decompression and the id of the result.
 * Throws BlobError with the reason on any mismatch.
 */
export function decodeBlob(blob: Uint8Array, expectId: Uint8Array, maxRaw: number): Buffer {
  const b = Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength);
  if (b.length < BLOB_HEADER) throw new BlobError(`blob shorter than its header (${b.length} bytes)`);
  if (b.readUInt32LE(0) !== BLOB_MAGIC) throw new BlobError('bad blob magic');
  const method = b[4]!;
  if (b[5] !== 0 || b[6] !== 0 || b[7] !== 0) throw new BlobError('blob reserved bytes not zero');
  const raw = b.readUInt32LE(8);
  const storedLen = b.readUInt32LE(12);
  if (raw < 1 || raw > maxRaw) throw new BlobError(`blob raw_length ${raw} outside 1 … ${maxRaw}`);
  if (storedLen !== b.length - BLOB_HEADER) throw new BlobError(`blob stored_length ${storedLen} but ${b.length - BLOB_HEADER} bytes follow`);
  if (!b.subarray(16, 32).equals(Buffer.from(expectId.buffer, expectId.byteOffset, ID_BYTES))) throw new BlobError('blob holds a different chunk id');
  const stored = b.subarray(BLOB_HEADER);
  let data: Buffer;
  if (method === COMP_NONE) {
    if (storedLen !== raw) throw new BlobError('uncompressed blob length differs from raw_length');
    data = Buffer.from(stored);
  } else if (method === COMP_LZ4) {
    if (storedLen < 4 || stored.readUInt32LE(0) !== raw) throw new BlobError('LZ4 size prefix differs from raw_length');
    try {
      data = uncompressSync(stored);
    } catch (e) {
      throw new BlobError(`LZ4 data does not decode: ${(e as Error).message}`);
    }
    if (data.length !== raw) throw new BlobError(`LZ4 data decodes to ${data.length} bytes, not ${raw}`);
  } else throw new BlobError(`unknown compression ${method}`);
  const id = chunkId(data);
  if (!id.equals(b.subarray(16, 32))) throw new BlobError('chunk content does not match its id (hash mismatch)');
  return data;
}
