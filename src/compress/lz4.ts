/**
 * LZ4 blocks in the stored form of formats/repository.md §5.4 (u32 LE raw length, then one block), written
 * into and read from caller-owned buffers. Uses liblz4 through the native addon when it was built with it
 * (about twice lz4-napi's speed here, and no per-chunk allocation); otherwise lz4-napi, whose output is
 * the same format.
 */
import { createRequire } from 'node:module';
import type * as Lz4Napi from 'lz4-napi';
import { nativeOps } from '../io/native.js';

let napi: typeof Lz4Napi | null = null;
/** lz4-napi, loaded the first time the addon's liblz4 is not there to do the work. */
export function lz4napi(): typeof Lz4Napi {
  napi ??= createRequire(import.meta.url)('lz4-napi') as typeof Lz4Napi;
  return napi;
}

/** The most bytes compressInto() can write for `n` input bytes (LZ4_compressBound + the 4-byte prefix). */
export function lz4Bound(n: number): number {
  return n + Math.floor(n / 255) + 16 + 4;
}

export function lz4Native(): boolean {
  return typeof nativeOps()?.lz4Compress === 'function';
}

/** Compresses `src` into `dst` at `at`; returns the bytes written, or 0 when it would not be smaller than `src`. */
export function compressInto(src: Uint8Array, dst: Buffer, at: number): number {
  const n = nativeOps();
  if (n?.lz4Compress) return n.lz4Compress(src, dst, at);
  const c = lz4napi().compressSync(Buffer.from(src.buffer, src.byteOffset, src.byteLength));
  if (c.length >= src.byteLength || at + c.length > dst.length) return 0;
  c.copy(dst, at);
  return c.length;
}

/**
 * Decodes `stored` (prefix + block) into `dst` at `at`; returns the raw length, or -1 when it is malformed
 * or does not fit.
 */
export function decompressInto(stored: Uint8Array, dst: Buffer, at: number): number {
  const n = nativeOps();
  if (n?.lz4Decompress) return n.lz4Decompress(stored, dst, at);
  if (stored.byteLength < 4) return -1;
  const raw = Buffer.from(stored.buffer, stored.byteOffset, 4).readUInt32LE(0);
  if (raw > dst.length - at) return -1;
  let out: Buffer;
  try {
    out = lz4napi().uncompressSync(Buffer.from(stored.buffer, stored.byteOffset, stored.byteLength));
  } catch {
    return -1;
  }
  if (out.length !== raw) return -1;
  out.copy(dst, at);
  return raw;
}
