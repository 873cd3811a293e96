/**
 * convert: copies any image (raw, ksc_inc, a chain) into a new raw or ksc_inc image. Only ranges the source
 * map says hold data are read; all-zero blocks are skipped, so the output stays sparse. Several chunks are
 * in flight at once (reads overlap writes); memory is bounded by `inFlight × chunk`.
 */
import { realpath } from 'node:fs/promises';
import { KscError } from '../errors.js';
import { openImage, openKsc, writeNewImage } from '../image/open.js';
import { buildNewFile, checkNewTarget } from '../io/newfile.js';
import { RawDevice } from '../image/raw.js';
import type { BlockDevice } from '../image/types.js';
import { allocationOf, chainOf } from '../image/capabilities.js';
import type { Progress } from './ops.js';
import { DEFAULT_BLOCK_BITS } from '../format/constants.js';
import { pieceReader } from './convert-direct.js';

export interface ConvertOptions {
  format: 'raw' | 'ksc_inc';
  blockSize?: number;
  onProgress?: Progress;
  /** Chunks in flight (default 8). */
  inFlight?: number;
  /** Replace an existing `dst` (default: refuse with KSC_E_EXISTS before reading anything). */
  force?: boolean;
  /** Awaited before each chunk is copied: pacing (and tests that interrupt a convert half-way). */
  beforeChunk?: () => Promise<void>;
}

export interface ConvertResult {
  size: number;
  bytesRead: number;
  bytesWritten: number;
  durationMs: number;
}

/**
 * Copies `src` (any image or chain) into a new image `dst`. The output is built under a temporary name in
 * dst's folder, flushed, closed and only then renamed to `dst` (io/newfile.ts): an interrupted convert
 * leaves no file under `dst` that looks finished, and a failed one removes what it wrote.
 */
export async function convertImage(src: string, dst: string, opts: ConvertOptions): Promise<ConvertResult> {
  const started = performance.now();
  await checkNewTarget(dst, { force: opts.force }); // before reading anything
  const input = await openImage(src);
  try {
    await refuseChainMember(input, dst);
    return await buildNewFile(dst, { force: opts.force }, async (temp) => {
      // The output is made (a ksc_inc image's header and tables written and synced: three fdatasyncs) while the
      // first pieces of the source are read: neither waits for the other (bench/README.md, session 16).
      const blockSize = opts.format === 'raw' ? null : (opts.blockSize ?? allocationOf(input)?.clusterSize ?? 2 ** DEFAULT_BLOCK_BITS);
      const making = makeOutput(temp, input.size, blockSize);
      making.catch(() => undefined); // a failure is reported where the output is awaited, never as unhandled
      try {
        const r = await copyInto(input, making, { unit: blockSize ?? RAW_UNIT, ownMap: blockSize !== null }, opts);
        await (await making).flush();
        return { size: input.size, ...r, durationMs: performance.now() - started };
      } finally {
        await (await making.catch(() => null))?.close();
      }
    });
  } finally {
    await input.close();
  }
}

/** A new raw file (blockSize null) or ksc_inc image of `size` bytes at `temp`, open for writing. */
async function makeOutput(temp: string, size: number, blockSize: number | null): Promise<BlockDevice> {
  if (blockSize === null) return RawDevice.create(temp, size);
  await writeNewImage(temp, { size, blockSize });
  return openKsc(temp, { write: true });
}

/** With option force, `dst` must not be the source or a file of its backing chain (others may share it). */
async function refuseChainMember(input: BlockDevice, dst: string): Promise<void> {
  const target = await realpath(dst).catch(() => null);
  if (target === null) return;
  for (const d of chainOf(input)) {
    if ((await realpath(d.name).catch(() => d.name)) === target) {
      throw new KscError('KSC_E_INVALID', `${dst}: is ${d === input ? 'the source image' : "in the source's backing chain"}: convert to another file`);
    }
  }
}

/** The size of the pieces copyDevice reads and writes (above io/file.ts's CACHED_READ_MAX: see copyDevice). */
const PIECE = 2 << 20;
/** The unit of zero detection into a device without an allocation map of its own (a raw file). */
const RAW_UNIT = 4096;

type CopyOptions = Pick<ConvertOptions, 'onProgress' | 'inFlight' | 'beforeChunk'>;

/** Copies the data-bearing ranges of `input` to `output` (which must read as zeros beforehand). */
export async function copyDevice(input: BlockDevice, output: BlockDevice, opts: CopyOptions = {}): Promise<{ bytesRead: number; bytesWritten: number }> {
  if (output.size < input.size) throw new KscError('KSC_E_RANGE', `${output.name} is smaller than ${input.name}`);
  const cluster = allocationOf(output)?.clusterSize ?? null;
  return copyInto(input, Promise.resolve(output), { unit: cluster ?? RAW_UNIT, ownMap: cluster !== null }, opts);
}

/**
 * copyDevice into an output that may still be being made: pieces are read at once and each waits for the
 * output only before it is written. `unit`: the output's allocation unit (its cluster size, or RAW_UNIT);
 * `ownMap`: the output keeps its own allocation map (a ksc_inc image).
 */
async function copyInto(input: BlockDevice, target: Promise<BlockDevice>, shape: { unit: number; ownMap: boolean }, opts: CopyOptions): Promise<{ bytesRead: number; bytesWritten: number }> {
  const { unit, ownMap } = shape;
  // 2 MiB pieces (as qemu-img convert's), 8 in flight. A piece above 1 MiB is read on the thread pool only:
  // HostFile.read copies what the page cache already holds (the kernel's readahead) on the calling thread
  // for reads up to 1 MiB, which for a whole disk made the main thread copy most of it, one piece at a time,
  // while the pool waited (bench/README.md, session 14: half the main thread's busy time, ≈ 10 % less CPU).
  // Measured with 4 MiB pieces (session 4): ≈ 10 % more kernel time, and some runs took twice as long.
  const chunk = Math.max(unit, PIECE);
  const inFlight = opts.inFlight ?? 8;
  // A raw source's pieces the page cache does not hold are read with O_DIRECT (convert-direct.ts).
  const reader = await pieceReader(input, chunk, inFlight);
  const pool: Buffer[] = [];
  const zero = Buffer.alloc(unit);
  let bytesRead = 0;
  let bytesWritten = 0;
  const jobs = dataChunks(input, chunk, unit);
  // Into a device with its own allocation map (a ksc_inc image), a flush every `flushEvery` bytes runs in the
  // background while copying goes on, so the final flush finds little left to write (measured: faster). Into
  // a raw file it only stalls writers.
  const flushEvery = ownMap ? 128 << 20 : Number.POSITIVE_INFINITY;
  let sinceFlush = 0;
  const background: Promise<void>[] = [];
  const worker = async (): Promise<void> => {
    const buf = pool.pop() ?? reader.buffer(); // `words` below is aligned: the buffer starts on a page
    try {
      for (;;) {
        await opts.beforeChunk?.();
        const next = await jobs.next();
        if (next.done) return;
        const { offset, length } = next.value;
        const view = buf.subarray(0, length);
        const words = new Int32Array(buf.buffer, buf.byteOffset, length >>> 2);
        await reader.readInto(offset, buf, length);
        bytesRead += length;
        const output = await target;
        // Write maximal runs of non-zero units.
        let runStart = -1;
        for (let pos = 0; pos < length; pos += unit) {
          const isZero = isZeroUnit(view, words, pos, Math.min(unit, length - pos), zero);
          if (!isZero && runStart < 0) runStart = pos;
          if (isZero && runStart >= 0) {
            await output.write(offset + runStart, view.subarray(runStart, pos));
            bytesWritten += pos - runStart;
            runStart = -1;
          }
        }
        if (runStart >= 0) {
          await output.write(offset + runStart, view.subarray(runStart, length));
          bytesWritten += length - runStart;
        }
        sinceFlush += length;
        if (sinceFlush >= flushEvery) {
          sinceFlush = 0;
          background.push(output.flush());
        }
        opts.onProgress?.(offset + length, input.size);
      }
    } finally {
      pool.push(buf);
    }
  };
  try {
    await Promise.all(Array.from({ length: inFlight }, worker));
  } finally {
    await reader.close();
  }
  await Promise.all(background);
  opts.onProgress?.(input.size, input.size); // the last data may end before the disk does
  return { bytesRead, bytesWritten };
}

/**
 * Whether `view[pos, pos + n)` is all zeros (`zero`: at least n zero bytes; `words`: view as 32-bit words).
 * Data rarely starts with a zero word, so most units are told apart by one load, without a call; only the
 * rest are compared (4 KiB units of a raw output: 6× less main-thread time than a subarray and equals each).
 */
function isZeroUnit(view: Buffer, words: Int32Array, pos: number, n: number, zero: Buffer): boolean {
  if (n >= 4 && words[pos >>> 2] !== 0) return false;
  return view.compare(zero, 0, n, pos, pos + n) === 0;
}

/**
 * Yields chunk-aligned pieces of the ranges that hold data, one at a time (safe to share between
 * concurrent workers: each `next()` hands out a distinct piece).
 */
async function* dataChunks(dev: BlockDevice, chunk: number, unit: number): AsyncGenerator<{ offset: number; length: number }> {
  const window = 1 << 30;
  let covered = 0; // pieces are widened to whole units, so never hand out a byte twice
  for (let w = 0; w < dev.size; w += window) {
    const extents = await dev.extents(w, Math.min(window, dev.size - w));
    let pending: { offset: number; length: number } | null = null;
    for (const e of extents) {
      if (e.state !== 'data') continue;
      const start = Math.max(covered, Math.floor(e.offset / unit) * unit);
      const stop = Math.min(dev.size, Math.ceil((e.offset + e.length) / unit) * unit);
      for (let pos = start; pos < stop;) {
        const end = Math.min(stop, Math.floor(pos / chunk) * chunk + chunk);
        if (pending && pending.offset + pending.length === pos && Math.floor(pending.offset / chunk) === Math.floor(pos / chunk)) {
          pending.length += end - pos;
        } else {
          if (pending) yield pending;
          pending = { offset: pos, length: end - pos };
        }
        pos = end;
      }
      covered = Math.max(covered, stop);
    }
    if (pending) yield pending;
  }
}
