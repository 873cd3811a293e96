/**
 * Chunk ids (formats/repository.md §2): two XXH64 hashes with independent seeds, 128 bits, each half
 * big-endian. With the native addon, native/kscinc_xxh64.c hashes the caller's bytes in place, both seeds in
 * one pass; without it (KSCINC_NO_NATIVE=1, or no compiler), xxhash-wasm's h64Raw, which copies the data
 * into its wasm memory for each seed. Each thread (main thread, each worker) chooses once, in initHash().
 */
import { nativeOps, type NativeOps } from '../io/native.js';

/** §2: the second seed is ASCII "kscinc!1" as a big-endian u64. */
export const SEED_B = 0x6b7363696e632131n;
export const ID_BYTES = 16;
export const ZERO_ID = Buffer.alloc(ID_BYTES);

type H64 = (data: Uint8Array, seed?: bigint) => bigint;
/** The thread's hasher once initHash() chose it: the addon's, or xxhash-wasm's h64Raw. */
let native: NonNullable<NativeOps['xxh64Id']> | null = null;
let h64: H64 | null = null;
let loading: Promise<void> | null = null;

/** Chooses and loads the hasher (idempotent). Must be awaited once before chunkId(). */
export async function initHash(): Promise<void> {
  if (native || h64) return;
  const ops = nativeOps();
  if (ops && typeof ops.xxh64Id === 'function') {
    native = ops.xxh64Id.bind(ops);
    return;
  }
  // Imported only here: with the addon, a thread (each worker too) neither loads nor compiles the wasm.
  loading ??= import('xxhash-wasm').then(async ({ default: xxhash }) => {
    h64 = (await xxhash()).h64Raw;
  });
  await loading;
}

/** The hasher initHash() chose for this thread (for tests and benchmarks); null before it. */
export const hashBackend = (): 'native' | 'wasm' | null => (native ? 'native' : h64 ? 'wasm' : null);

/** The 16-byte id of `data` (§2). */
export function chunkId(data: Uint8Array, out: Buffer = Buffer.allocUnsafe(ID_BYTES), at = 0): Buffer {
  if (native) {
    native(data, SEED_B, out, at);
    return out;
  }
  if (!h64) throw new Error('chunkId() before initHash()');
  out.writeBigUInt64BE(h64(data, 0n), at);
  out.writeBigUInt64BE(h64(data, SEED_B), at + 8);
  return out;
}

export function isZeroId(id: Uint8Array, at = 0): boolean {
  for (let i = 0; i < ID_BYTES; i++) if (id[at + i] !== 0) return false;
  return true;
}

/** §7.3: Merkle root over ids (a buffer of 16-byte ids), fan-out 256. */
export function merkleRoot(ids: Buffer): Buffer {
  const n = ids.length / ID_BYTES;
  if (n === 0) return Buffer.alloc(ID_BYTES);
  let level = ids;
  do {
    const count = level.length / ID_BYTES;
    const next = Buffer.allocUnsafe(Math.ceil(count / 256) * ID_BYTES);
    for (let i = 0, o = 0; i < count; i += 256, o += ID_BYTES) {
      chunkId(level.subarray(i * ID_BYTES, Math.min(count, i + 256) * ID_BYTES), next, o);
    }
    level = next;
  } while (level.length > ID_BYTES);
  return level;
}
