/**
 * Blob codec (formats/repository.md §5.2, §5.4): a 32-byte header, then the chunk stored raw or as
 * u32 raw length + one LZ4 block (lz4-napi's compressSync writes exactly that). Runs in workers.
 */
import { decompressInto, lz4napi } from './lz4.js';
import { chunkId, ID_BYTES } from '../hash/chunkid.js';
import { AuthError, decryptInto, keyedId, NONCE, TAG } from '../crypto/aead.js';

export const BLOB_MAGIC = 0x424c424b; // "KBLB" read as u32 LE
export const BLOB_MAGIC_ENCRYPTED = 0x454c424b; // "KBLE" read as u32 LE (§13.5)
export const BLOB_HEADER = 32;
export const COMP_NONE = 0;
export const COMP_LZ4 = 1;

/** Builds a blob for `chunk` whose id is `id`; compressed only when that makes it smaller. */
export function encodeBlob(chunk: Buffer, id: Uint8Array, compress = true): Buffer {
  let stored: Buffer = chunk;
  let method = COMP_NONE;
  if (compress) {
    const c = lz4napi().compressSync(chunk);
    if (c.length < chunk.length) {
      stored = c;
      method = COMP_LZ4;
    }
  }
  const blob = Buffer.allocUnsafe(BLOB_HEADER + stored.length);
  writeBlobHeader(blob, 0, method, chunk.length, stored.length, id, 0);
  stored.copy(blob, BLOB_HEADER);
  return blob;
}

/** §5.2: the 32-byte blob header at `at`; the id is read from `ids` at `idAt`. */
export function writeBlobHeader(out: Buffer, at: number, method: number, rawLength: number, storedLength: number, ids: Uint8Array, idAt: number, encrypted = false): void {
  out.writeUInt32LE(encrypted ? BLOB_MAGIC_ENCRYPTED : BLOB_MAGIC, at);
  out[at + 4] = method;
  out[at + 5] = out[at + 6] = out[at + 7] = 0;
  out.writeUInt32LE(rawLength, at + 8);
  out.writeUInt32LE(storedLength, at + 12);
  out.set(ids.subarray(idAt, idAt + ID_BYTES), at + 16);
}

/** Why a blob failed to decode: the caller names the object. */
export class BlobError extends Error {}

/**
 * Decodes and verifies a blob into `dst` at `at`: magic, lengths, the expected id, decompression and the id
 * of the result. Returns the raw length; throws BlobError with the reason on any mismatch.
 */
export function decodeBlobInto(blob: Uint8Array, expectId: Uint8Array, maxRaw: number, dst: Buffer, at: number, keys?: Uint8Array): number {
  const b = Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength);
  const raw = blobRawLength(b, maxRaw, keys !== undefined);
  const method = b[4]!;
  let storedLen = b.readUInt32LE(12);
  if (!b.subarray(16, 32).equals(Buffer.from(expectId.buffer, expectId.byteOffset, ID_BYTES))) throw new BlobError('blob holds a different chunk id');
  if (raw > dst.length - at) throw new BlobError(`blob raw_length ${raw} does not fit the output`);
  let stored = b.subarray(BLOB_HEADER);
  if (keys) {
    // §13.5: authenticate before anything else reads the stored bytes. Stored (uncompressed) bytes are
    // decrypted straight into dst, compressed ones into this thread's scratch buffer.
    const direct = method === COMP_NONE && storedLen - NONCE - TAG === raw;
    if (!direct && scratch.length < storedLen) scratch = Buffer.allocUnsafeSlow(Math.max(storedLen, 2 * scratch.length));
    const into = direct ? dst : scratch;
    const from = direct ? at : 0;
    try {
      storedLen = decryptInto(Buffer.from(keys.buffer, keys.byteOffset, 32), b.subarray(0, BLOB_HEADER), stored, into, from);
    } catch (e) {
      if (!(e instanceof AuthError)) throw e;
      if (direct) dst.fill(0, at, at + raw); // no unauthenticated byte stays behind
      throw new BlobError(e.message);
    }
    if (direct) return checkId(dst, at, raw, b, keys);
    stored = scratch.subarray(0, storedLen);
  }
  if (method === COMP_NONE) {
    if (storedLen !== raw) throw new BlobError('uncompressed blob length differs from raw_length');
    stored.copy(dst, at);
  } else if (method === COMP_LZ4) {
    if (storedLen < 4 || stored.readUInt32LE(0) !== raw) throw new BlobError('LZ4 size prefix differs from raw_length');
    if (decompressInto(stored, dst, at) !== raw) throw new BlobError(`LZ4 data does not decode to ${raw} bytes`);
  } else throw new BlobError(`unknown compression ${method}`);
  return checkId(dst, at, raw, b, keys);
}

/** This thread's room for decrypted compressed bytes (grown, never shrunk: a worker decodes blob after blob). */
let scratch = Buffer.alloc(0);

/** The raw length, when the decoded chunk at `dst[at, at + raw)` has the id of blob header `b`; else BlobError. */
function checkId(dst: Buffer, at: number, raw: number, b: Buffer, keys: Uint8Array | undefined): number {
  const id = Buffer.allocUnsafe(ID_BYTES);
  if (keys) keyedId(keys, dst.subarray(at, at + raw), id, 0);
  else chunkId(dst.subarray(at, at + raw), id, 0);
  if (!id.equals(b.subarray(16, 32))) throw new BlobError('chunk content does not match its id (hash mismatch)');
  return raw;
}

/** Checks a blob's header (magic, reserved bytes, lengths); returns its raw length. Throws BlobError. */
export function blobRawLength(b: Buffer, maxRaw: number, encrypted = false): number {
  if (b.length < BLOB_HEADER) throw new BlobError(`blob shorter than its header (${b.length} bytes)`);
  const magic = b.readUInt32LE(0);
  if (magic !== (encrypted ? BLOB_MAGIC_ENCRYPTED : BLOB_MAGIC)) {
    throw new BlobError(
      magic === BLOB_MAGIC_ENCRYPTED
        ? 'blob is encrypted (KBLE) in a repository read without its key'
        : magic === BLOB_MAGIC
          ? 'blob is not encrypted (KBLB) in an encrypted repository'
          : 'bad blob magic',
    );
  }
  if (b[5] !== 0 || b[6] !== 0 || b[7] !== 0) throw new BlobError('blob reserved bytes not zero');
  const raw = b.readUInt32LE(8);
  const storedLen = b.readUInt32LE(12);
  if (raw < 1 || raw > maxRaw) throw new BlobError(`blob raw_length ${raw} outside 1 … ${maxRaw}`);
  if (storedLen !== b.length - BLOB_HEADER) throw new BlobError(`blob stored_length ${storedLen} but ${b.length - BLOB_HEADER} bytes follow`);
  return raw;
}

/** decodeBlobInto() into a new buffer. */
export function decodeBlob(blob: Uint8Array, expectId: Uint8Array, maxRaw: number): Buffer {
  const raw = blobRawLength(Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength), maxRaw);
  const out = Buffer.allocUnsafe(raw);
  decodeBlobInto(blob, expectId, maxRaw, out, 0);
  return out;
}
