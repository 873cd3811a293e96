/**
 * The process's worker pool (piscina) for hashing and LZ4: one pool, sized to the cores, created on first
 * use and destroyed by closePool(). Batches go in as one transferred buffer and come back as one.
 */
import { availableParallelism } from 'node:os';
import { createRequire } from 'node:module';
import type { Piscina } from 'piscina';
import { KscError } from '../errors.js';
import { ID_BYTES, initHash } from '../hash/chunkid.js';
import { workerEntry } from '../util/worker-entry.js';
import { type BlobKeys, type PackedChunk, packBatchSync, packBatchViews } from './batch.js';

export type { BlobKeys, PackedChunk } from './batch.js';

/** The running pool: its workers have all loaded their module once `loading` settles; `ready` once one has. */
let current: { pool: Piscina; loading: Promise<void>; ready: boolean; failed: Promise<never> } | null = null;
/** How long closePool waits for workers still loading before it terminates them all the same. */
const LOAD_WAIT_MS = 30_000;

export function poolSize(): number {
  const env = Number(process.env.KSCINC_WORKERS);
  return Number.isInteger(env) && env > 0 ? env : Math.max(1, availableParallelism());
}

function getPool(): Piscina {
  if (!current) {
    // Loaded on first use: commands that never compress do not pay for it at start-up.
    const { Piscina: Pool } = createRequire(import.meta.url)('piscina') as typeof import('piscina');
    const filename = workerEntry(import.meta.url, 'compress-worker.cjs', 'compress/worker.js');
    const pool = new Pool({ filename, minThreads: poolSize(), maxThreads: poolSize(), idleTimeout: 5_000 });
    // A worker that cannot load its file (missing: dist/ copied in part; broken) makes the pool emit
    // 'error': unheard, that ended the process with a stack trace. Every task then fails with this error.
    // Once a worker is up, the pool's 'error' is one worker's own failure while it held no task (piscina
    // rejects a task whose worker fails, and replaces the worker): not a reason to fail every later task (a
    // schedule daemon would fail each backup until restarted).
    let fail: (e: KscError) => void = () => undefined;
    const failed = new Promise<never>((_, reject) => (fail = reject));
    failed.catch(() => undefined);
    const run = { pool, loading: Promise.resolve(), ready: false, failed };
    pool.on('error', (e: Error) => {
      if (!run.ready) fail(new KscError('KSC_E_UNAVAILABLE', `a worker thread could not load ${filename}: ${e.message} (rebuild with npm run build, or copy dist/ whole)`, { cause: e }));
    });
    // One warm task per worker, sent before any other task so each lands on its own worker (one task per
    // worker at a time): once they have all settled, every worker has loaded its module, and a worker runs
    // any other task only after its warm task. closePool waits for them: a belt now that the workers run a
    // CommonJS build (scripts/bundle-worker.mjs), which they may be terminated in at any point, but needed
    // when they fall back to the ES module (a build by tsc alone): Node 20 aborts the whole process when a
    // worker is terminated inside require() of an ES module. Cost: bench/README.md, session 17.
    const warm: Promise<void>[] = [];
    for (let i = 0; i < poolSize(); i++) {
      warm.push(
        pool.run({ op: 'warm' }).then(
          () => void (run.ready = true),
          () => undefined,
        ),
      );
    }
    run.loading = Promise.race([Promise.all(warm), failed]).then(
      () => undefined,
      () => undefined,
    );
    current = run;
  }
  return current.pool;
}

/** `task` run by the pool, or the pool's failure to start a worker. */
function runInPool(task: object, opts?: { transferList?: ArrayBuffer[] }): Promise<unknown> {
  const pool = getPool();
  return Promise.race([pool.run(task, opts as never), current!.failed]);
}

/**
 * Starts the workers and their hashers now (in the background), so a job's first batch does not wait for
 * them: call at the start of a backup or restore, before the repository reads. Does nothing when the pool
 * is already running.
 */
export function warmPool(): void {
  getPool();
}

/**
 * True once a worker of the pool is up (its warm task has finished). Until then a caller with a
 * single small job (a live restore's first read) does it on its own thread rather than wait for them.
 */
export function poolReady(): boolean {
  return current?.ready ?? false;
}

/** True once the workers were started (by warmPool or a first task) and not closed since. */
export function poolStarted(): boolean {
  return current !== null;
}

export async function closePool(): Promise<void> {
  const run = current;
  current = null;
  if (!run) return;
  // Not while a worker loads its module (see getPool). A worker that cannot load fails its warm task; one
  // that hangs is terminated after LOAD_WAIT_MS. Replacement workers (after one died) are not waited for.
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([run.loading, new Promise<void>((resolve) => (timer = setTimeout(resolve, LOAD_WAIT_MS)))]);
  clearTimeout(timer);
  await run.pool.destroy();
}

/** Concatenates buffers into one fresh, transferable buffer. */
function concatOwned(parts: Buffer[]): Uint8Array<ArrayBuffer> {
  const total = parts.reduce((s, b) => s + b.length, 0);
  const out = Buffer.allocUnsafeSlow(total);
  let p = 0;
  for (const b of parts) p += b.copy(out, p);
  return new Uint8Array(out.buffer as ArrayBuffer, 0, total);
}

/**
 * Hashes, zero-checks and (optionally) compresses a batch of chunks in a worker. `batch` holds the chunks
 * back to back from its start and must own its whole ArrayBuffer (it is transferred to the worker and
 * comes back as `input`, for the caller to reuse). The blobs are views into one result buffer; packed on
 * this thread (`inline`, unencrypted), a chunk LZ4 cannot shrink is a header and a `tail` view of the
 * batch (packBatchViews), and `input` is then null: the batch stays with the blobs, not to be reused.
 */
export async function packBatch(
  batch: Uint8Array<ArrayBuffer>,
  lengths: number[],
  compress = true,
  opts: { inline?: boolean; keys?: BlobKeys } = {},
): Promise<{ chunks: PackedChunk[]; input: Buffer | null }> {
  if (batch.byteOffset !== 0 || batch.byteLength !== batch.buffer.byteLength) throw new Error('packBatch needs a buffer that owns its whole ArrayBuffer');
  let res: Buffer;
  let input: Buffer;
  if (opts.inline) {
    // On this thread: for a few MiB, starting workers costs more than the work.
    await initHash();
    input = Buffer.from(batch.buffer, 0, batch.byteLength);
    if (!opts.keys) {
      const chunks = packBatchViews(input, lengths, compress);
      return { chunks, input: chunks.some((c) => c.tail) ? null : input };
    }
    res = packBatchSync(input, lengths, compress, opts.keys);
  } else {
    const r = (await runInPool({ op: 'pack', data: batch, lengths, compress, keys: opts.keys }, { transferList: [batch.buffer] })) as { out: Uint8Array; input: Uint8Array };
    res = Buffer.from(r.out.buffer, r.out.byteOffset, r.out.byteLength);
    input = Buffer.from(r.input.buffer, r.input.byteOffset, r.input.byteLength);
  }
  const n = lengths.length;
  const chunks: PackedChunk[] = [];
  let p = n * ID_BYTES + n * 4;
  for (let i = 0; i < n; i++) {
    const len = res.readUInt32LE(n * ID_BYTES + i * 4);
    chunks.push({ id: res.subarray(i * ID_BYTES, (i + 1) * ID_BYTES), blob: res.subarray(p, p + len) });
    p += len;
  }
  return { chunks, input };
}

/** packBatch for separate chunk buffers (copied into one batch). */
export async function packChunks(chunks: Buffer[], compress = true, keys?: BlobKeys): Promise<PackedChunk[]> {
  const data = concatOwned(chunks);
  return (
    await packBatch(
      data,
      chunks.map((c) => c.length),
      compress,
      { keys },
    )
  ).chunks;
}

/** Hashes a batch of chunks in a worker (zero id for all-zero chunks). */
export async function hashChunks(chunks: Buffer[], keys?: BlobKeys): Promise<Buffer[]> {
  const data = concatOwned(chunks);
  const res = Buffer.from((await runInPool({ op: 'hash', data, lengths: chunks.map((c) => c.length), keys }, { transferList: [data.buffer] })) as Uint8Array);
  return chunks.map((_, i) => res.subarray(i * ID_BYTES, (i + 1) * ID_BYTES));
}

export type Unpacked = { ok: true; data: Buffer } | { ok: false; error: string };

/**
 * A reusable pair of shared buffers for one read in flight: fetched bytes go into `input`, a worker decodes
 * them into `output`. Shared memory is neither copied nor transferred, and nothing is allocated per read
 * (fresh buffers per read kept the main thread's garbage collector busy during restores).
 */
export class SharedSlot {
  readonly input: Buffer;
  readonly output: Buffer;
  constructor(inputBytes: number, outputBytes: number) {
    this.input = Buffer.from(new SharedArrayBuffer(inputBytes));
    this.output = Buffer.from(new SharedArrayBuffer(outputBytes));
  }
}

/**
 * Decodes the blobs at `ranges` of `slot.input` into `slot.output` (back to back, in order) in a worker.
 * The caller must not touch the slot until this resolves. Data views point into `slot.output`.
 */
export async function unpackInto(slot: SharedSlot, ranges: [number, number][], ids: Buffer[], maxRaw: number, keys?: BlobKeys): Promise<Unpacked[]> {
  const idBuf = concatOwned(ids);
  const r = (await runInPool({ op: 'unpack', data: slot.input, ranges, ids: idBuf, maxRaw, out: slot.output, keys }, { transferList: [idBuf.buffer] })) as {
    lengths: number[];
    errors: Record<string, string>;
  };
  const out: Unpacked[] = [];
  let p = 0;
  for (let i = 0; i < ranges.length; i++) {
    const e = r.errors[i];
    if (e !== undefined) {
      out.push({ ok: false, error: e });
      continue;
    }
    out.push({ ok: true, data: slot.output.subarray(p, p + r.lengths[i]!) });
    p += r.lengths[i]!;
  }
  return out;
}

/**
 * Compresses one piece in a worker into the stored form (u32 LE length + one LZ4 block; formats/nbd.md §3.2).
 * `data` is copied into a transferable buffer unless it owns its whole ArrayBuffer (then it is moved to the
 * worker and back: use the returned `data`, not the argument). `stored` is null when longer than `maxStored`.
 */
export async function compressPiece(data: Buffer, maxStored: number): Promise<{ stored: Buffer | null; data: Buffer }> {
  const owned = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength && !(data.buffer instanceof SharedArrayBuffer);
  const input = owned ? new Uint8Array(data.buffer as ArrayBuffer, 0, data.byteLength) : concatOwned([data]);
  const r = (await runInPool({ op: 'lz4', data: input, maxStored }, { transferList: [input.buffer] })) as { out: Uint8Array; input: Uint8Array };
  const back = Buffer.from(r.input.buffer, r.input.byteOffset, r.input.byteLength);
  return { stored: r.out.byteLength > 0 ? Buffer.from(r.out.buffer, r.out.byteOffset, r.out.byteLength) : null, data: back };
}
