/**
 * convert: copies any image (raw, ksc_inc, a chain) into a new raw or ksc_inc image. Only ranges the source
 * map says hold data are read; all-zero blocks are skipped, so the output stays sparse. Several chunks are
 * in flight at once (reads overlap writes); memory is bounded by `inFlight × chunk`.
 */
import { KscError } from '../errors.js';
import { KscImage } from '../image/ksc.js';
import { createImage, openImage, openKsc } from '../image/open.js';
import { RawDevice } from '../image/raw.js';
import type { BlockDevice } from '../image/types.js';
import type { Progress } from './ops.js';

export interface ConvertOptions {
  format: 'raw' | 'ksc_inc';
  blockSize?: number;
  onProgress?: Progress;
  /** Chunks in flight (default 8). */
  inFlight?: number;
}

export interface ConvertResult {
  size: number;
  bytesRead: number;
  bytesWritten: number;
  durationMs: number;
}

export async function convertImage(src: string, dst: string, opts: ConvertOptions): Promise<ConvertResult> {
  const started = performance.now();
  const input = await openImage(src);
  let output: BlockDevice | null = null;
  let ok = false;
  try {
    if (opts.format === 'raw') {
      output = await RawDevice.create(dst, input.size);
    } else {
      await createImage(dst, { size: input.size, blockSize: opts.blockSize ?? (input instanceof KscImage ? input.blockSize : undefined) });
      output = await openKsc(dst, { write: true });
    }
    const r = await copyDevice(input, output, opts);
    await output.flush();
    ok = true;
    return { size: input.size, ...r, durationMs: performance.now() - started };
  } finally {
    await input.close();
    await output?.close();
    if (!ok && output) {
      const { rm } = await import('node:fs/promises');
      await rm(dst, { force: true });
    }
  }
}

/** Copies the data-bearing ranges of `input` to `output` (which must read as zeros beforehand). */
export async function copyDevice(input: BlockDevice, output: BlockDevice, opts: Pick<ConvertOptions, 'onProgress' | 'inFlight'> = {}): Promise<{ bytesRead: number; bytesWritten: number }> {
  if (output.size < input.size) throw new KscError('KSC_E_RANGE', `${output.name} is smaller than ${input.name}`);
  const unit = output instanceof KscImage ? output.blockSize : 4096;
  // 1 MiB pieces, 8 in flight: the buffers stay in the CPU's caches between the read and the write (both are
  // copies through the page cache). Measured with 4 MiB pieces: ≈ 10% more kernel time, and some runs took
  // twice as long.
  const chunk = Math.max(unit, 1 << 20);
  const inFlight = opts.inFlight ?? 8;
  const pool: Buffer[] = [];
  const zero = Buffer.alloc(unit);
  let bytesRead = 0;
  let bytesWritten = 0;
  const jobs = dataChunks(input, chunk, unit);
  // Into a ksc_inc image, a flush every `flushEvery` bytes runs in the background while copying goes on, so
  // the final flush finds little left to write (measured: faster). Into a raw file it only stalls writers.
  const flushEvery = output instanceof KscImage ? 128 << 20 : Number.POSITIVE_INFINITY;
  let sinceFlush = 0;
  const background: Promise<void>[] = [];
  const worker = async (): Promise<void> => {
    const buf = pool.pop() ?? Buffer.allocUnsafe(chunk);
    try {
      for (;;) {
        const next = await jobs.next();
        if (next.done) return;
        const { offset, length } = next.value;
        const view = buf.subarray(0, length);
        await input.readInto(offset, view);
        bytesRead += length;
        // Write maximal runs of non-zero units.
        let runStart = -1;
        for (let pos = 0; pos < length; pos += unit) {
          const n = Math.min(unit, length - pos);
          const isZero = view.subarray(pos, pos + n).equals(n === unit ? zero : zero.subarray(0, n));
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
  await Promise.all(Array.from({ length: inFlight }, worker));
  await Promise.all(background);
  return { bytesRead, bytesWritten };
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
