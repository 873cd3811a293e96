/**
 * Chunk ids (formats/repository.md §2): two XXH64 hashes with independent seeds, 128 bits, each half
 * big-endian. xxhash-wasm is instantiated once per thread (main thread and each worker).
 */
import xxhash from 'xxhash-wasm';

/** §2: the second seed is ASCII "kscinc!1" as a big-endian u64. */
export const SEED_B = 0x6b7363696e632131n;
export const ID_BYTES = 16;
export const ZERO_ID = Buffer.alloc(ID_BYTES);

type H64 = (data: Uint8Array, seed?: bigint) => bigint;
let h64: H64 | null = null;
let loading: Promise<H64> | null = null;

/**
 * The module's own memory and XXH64 function, when they could be had: the data is then copied into the
 * wasm memory once and hashed there with both seeds. h64Raw copies it in for each seed, and those copies
 * cost as much as the hashing itself (issue 19: 8.7 % of an unencrypted restore's CPU, the hash 7.9 %).
 */
let direct: { mem: WasmMemory; xxh64: (at: number, length: number, seed: bigint) => bigint; view: Uint8Array } | null = null;
const U64 = (1n << 64n) - 1n;

/** The little of the WebAssembly global used here (this project's TypeScript libraries do not declare it). */
interface WasmMemory {
  readonly buffer: ArrayBuffer;
}
interface WasmApi {
  instantiate: (...args: unknown[]) => Promise<unknown>;
  Memory: abstract new (...args: never[]) => WasmMemory;
}
const wasm = (globalThis as unknown as { WebAssembly: WasmApi }).WebAssembly;

/** Loads the wasm hasher (idempotent). Must be awaited once before chunkId(). */
export async function initHash(): Promise<void> {
  if (h64) return;
  loading ??= load();
  await loading;
}

/**
 * xxhash-wasm does not export its instance: it is seen as WebAssembly.instantiate returns it (the function
 * is put back at once). Used only when it has the expected exports and hashes a sample as h64Raw does;
 * else every id goes through h64Raw.
 */
async function load(): Promise<H64> {
  const instantiate = wasm.instantiate;
  let exports: Record<string, unknown> | null = null;
  const seen = async (...args: unknown[]): Promise<unknown> => {
    const r = (await instantiate.apply(wasm, args)) as { instance?: { exports: Record<string, unknown> }; exports?: Record<string, unknown> };
    exports = r.instance?.exports ?? r.exports ?? null;
    return r;
  };
  wasm.instantiate = seen;
  let x: Awaited<ReturnType<typeof xxhash>>;
  try {
    x = await xxhash();
  } finally {
    if (wasm.instantiate === seen) wasm.instantiate = instantiate;
  }
  h64 = x.h64Raw;
  const ex = exports as Record<string, unknown> | null;
  if (ex && ex.mem instanceof wasm.Memory && typeof ex.xxh64 === 'function') {
    const d = { mem: ex.mem, xxh64: ex.xxh64 as (at: number, length: number, seed: bigint) => bigint, view: new Uint8Array(ex.mem.buffer) };
    const sample = Buffer.from('kscinc chunk id sample: the direct path must agree with h64Raw');
    d.view.set(sample);
    const same = (d.xxh64(0, sample.length, 0n) & U64) === x.h64Raw(sample, 0n) && (d.xxh64(0, sample.length, SEED_B) & U64) === x.h64Raw(sample, SEED_B);
    if (same) direct = d;
  }
  return x.h64Raw;
}

/** Whether ids are hashed in the wasm memory with one copy (after initHash; for tests and benchmarks). */
export const directHashing = (): boolean => direct !== null;

/** The 16-byte id of `data` (§2). */
export function chunkId(data: Uint8Array, out: Buffer = Buffer.allocUnsafe(ID_BYTES), at = 0): Buffer {
  if (!h64) throw new Error('chunkId() before initHash()');
  const d = direct;
  if (d && data.length <= d.mem.buffer.byteLength) {
    if (d.view.buffer !== d.mem.buffer) d.view = new Uint8Array(d.mem.buffer); // the memory grew
    d.view.set(data);
    out.writeBigUInt64BE(d.xxh64(0, data.length, 0n) & U64, at);
    out.writeBigUInt64BE(d.xxh64(0, data.length, SEED_B) & U64, at + 8);
    return out;
  }
  // Larger than the wasm memory so far: h64Raw grows it (the direct path then fits the next time).
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
