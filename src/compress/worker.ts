/**
 * Worker-thread side of the compression pool: hashing, zero detection, LZ4 in batches (one task per
 * several MiB: per-chunk tasks cost more in messaging than the work itself). Input buffers arrive
 * transferred; results go back transferred as one buffer.
 */
import { createRequire } from 'node:module';
import { initHash, ID_BYTES } from '../hash/chunkid.js';
import { hashBatch, packBatchSync } from './batch.js';
import { decodeBlobInto, BlobError } from './codec.js';
import { compressInto, lz4Bound } from './lz4.js';

export interface PackTask {
  op: 'pack';
  /** Chunks back to back. */
  data: Uint8Array;
  lengths: number[];
  compress: boolean;
  /** An encrypted repository's keys (formats/repository.md §13): keyed ids, encrypted blobs. */
  keys?: Uint8Array;
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
  keys?: Uint8Array;
}

export interface HashTask {
  op: 'hash';
  data: Uint8Array;
  lengths: number[];
  keys?: Uint8Array;
}

/**
 * piscina's main module, loaded by the first task that moves buffers back (pack, hash, lz4): a restore's
 * workers only unpack, into shared memory, and are spared loading it (its pool, queues and histograms) as
 * they start, while the first chunks wait for them.
 */
type PiscinaClass = (typeof import('piscina'))['Piscina'];
let piscina: PiscinaClass | null = null;
// require(), not import(): the bundled worker (scripts/bundle-worker.mjs) loads no ES module at all.
const mover = (): PiscinaClass => (piscina ??= (createRequire(import.meta.url)('piscina') as typeof import('piscina')).Piscina);

/** A result that moves several buffers back to the caller (the output, and the input for reuse). */
function moved(P: PiscinaClass, value: unknown, list: ArrayBuffer[]): unknown {
  return P.move({
    get [P.transferableSymbol](): ArrayBuffer[] {
      return list;
    },
    get [P.valueSymbol](): unknown {
      return value;
    },
  } as never);
}

/**
 * pack → { out: [n ids (16 bytes each, zero id for all-zero chunks)] [n u32 blob lengths] [blobs], input }
 *   (the input buffer goes back too, so the caller reuses it: no allocation per batch on either side)
 * unpack → { lengths (0 = failed), errors: { index: reason } }; the chunks are in task.out
 * hash → [n ids]
 * warm → null
 */
/** Starts the worker (pool.ts warmPool): its hasher, and nothing a restore's workers do not need. */
export interface WarmTask {
  op: 'warm';
}

export default async function run(task: PackTask | UnpackTask | HashTask | Lz4Task | WarmTask): Promise<unknown> {
  if (task.op === 'lz4') return lz4Piece(mover(), task);
  await initHash();
  if (task.op === 'warm') return null;
  if (task.op === 'unpack') return unpack(task);
  const P = mover();
  const src = Buffer.from(task.data.buffer, task.data.byteOffset, task.data.byteLength);
  if (task.op === 'hash') {
    const ids = hashBatch(src, task.lengths, task.keys);
    return P.move(new Uint8Array(ids.buffer, ids.byteOffset, ids.byteLength));
  }
  const out = packBatchSync(src, task.lengths, task.compress, task.keys);
  const input = task.data.buffer as ArrayBuffer;
  return moved(P, { out: new Uint8Array(out.buffer as ArrayBuffer, out.byteOffset, out.byteLength), input: new Uint8Array(input) }, [out.buffer as ArrayBuffer, input]);
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
      const n = decodeBlobInto(src.subarray(at, at + len), task.ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES), task.maxRaw, out, p, task.keys);
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

/** One piece compressed for a migration (formats/migrate.md §12). */
export interface Lz4Task {
  op: 'lz4';
  data: Uint8Array;
  /** Stored forms longer than this are not returned. */
  maxStored: number;
}

/** lz4 → { out: the stored form (u32 LE length + block), empty when longer than maxStored; input } */
function lz4Piece(P: PiscinaClass, task: Lz4Task): unknown {
  const out = Buffer.allocUnsafeSlow(lz4Bound(task.data.byteLength));
  const n = compressInto(task.data, out, 0);
  const keep = n > 0 && n <= task.maxStored ? n : 0;
  const input = task.data.buffer as ArrayBuffer;
  return moved(P, { out: new Uint8Array(out.buffer as ArrayBuffer, 0, keep), input: new Uint8Array(input) }, [out.buffer as ArrayBuffer, input]);
}
