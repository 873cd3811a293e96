/**
 * The backup's options and result (the public contract), their defaults, and the check of the options a
 * caller may get wrong. Errors name the option, never a CLI flag (the CLI adds its own wording).
 */
import { KscError } from '../../errors.js';
import { poolStarted } from '../../compress/pool.js';
import { DEFAULT_BITMAP, backupBitmapNameProblem } from './bitmap-names.js';
import type { DedupeSettings } from './dedupe.js';
import type { PipelineShape } from './pipeline.js';

/** Defaults of BackupOptions.exactIds and windowChunks. */
const EXACT_IDS = 1 << 20;
const WINDOW_CHUNKS = 1 << 17;
/** Default of BackupOptions.inlineBytes. */
const INLINE_BYTES = 16 * 1024 * 1024;
/** Default of BackupOptions.batchBytes. */
const BATCH_BYTES = 4 * 1024 * 1024;
/** Default of BackupOptions.batches. */
const BATCHES = 3;

export interface BackupProgress {
  phase: 'plan' | 'read' | 'commit';
  doneBytes: number;
  totalBytes: number;
}

export interface BackupOptions {
  /** Dirty bitmap to use and hand over (ksc_inc images); default "backup"; null: none (always full). */
  bitmap?: string | null;
  /** Read every chunk even when the bitmap could be used. */
  full?: boolean;
  tags?: string[];
  /** Recorded in the manifest; default the device name. */
  source?: string;
  progress?: (p: BackupProgress) => void;
  /** Chunks per worker task (default: 4 MiB worth). */
  batchBytes?: number;
  /** Worker batches in flight (default 3). */
  batches?: number;
  /**
   * Up to this many bytes to read, the chunks are hashed and compressed on the caller's thread instead of
   * the worker pool (default: 16 MiB when the pool is not running yet, 0 when it is).
   */
  inlineBytes?: number;
  now?: () => number;
  /**
   * Most chunk ids (the index's plus this backup's new ones) to dedupe against exactly in memory (20 bytes
   * a slot); above it a Bloom filter (≈ 1.2 bytes an id) and windows of `windowChunks`.
   */
  exactIds?: number; // default 1 Mi
  /** Chunks read per window when deduplicating through the filter (default 128 Ki). */
  windowChunks?: number;
  /**
   * Bits of the filter per id (default 10: ≈ 1% of new chunks read twice). 0, for tests: the filter says
   * "maybe" to every id, so every new chunk is read twice and the parent's chunks are not checked at all.
   */
  filterBitsPerId?: number;
}

export interface BackupResult {
  id: string;
  repository: string;
  disk: string;
  parent: string | null;
  full: boolean;
  /** Why the backup was full, when it was. */
  fullReason: string | null;
  size: number;
  chunks: number;
  chunksDirty: number;
  chunksNew: number;
  /** Chunks read twice: the Bloom filter said "maybe", the index objects said no (dedupe 'filter' only). */
  chunksReread: number;
  /** How the backup deduplicated: against the index in memory, or a Bloom filter settled by the index objects. */
  dedupe: 'exact' | 'filter';
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  bytesUploaded: number;
  /** Raw bytes of the dirty non-zero chunks over the raw bytes that had to be stored. */
  dedupeRatio: number;
  durationMs: number;
  /** Bytes read per second. */
  throughput: number;
}

/** Throws KSC_E_INVALID when `bitmap` cannot be a backup bitmap's name. */
export function assertBackupBitmapName(bitmap: string): void {
  const problem = backupBitmapNameProblem(bitmap);
  if (problem) throw new KscError('KSC_E_INVALID', `backup bitmap "${bitmap}" ${problem}`);
}

/** The bitmap a backup of an image hands over: the option's, else the default; null when none can be. */
export function bitmapFor(opts: BackupOptions, image: { readOnly: boolean } | null): string | null {
  const bitmap = image && !image.readOnly && opts.bitmap !== null ? (opts.bitmap ?? DEFAULT_BITMAP) : null;
  if (bitmap !== null) assertBackupBitmapName(bitmap);
  return bitmap;
}

/** The dedupe settings of `opts`, checked (KSC_E_INVALID naming the option). */
export function dedupeSettings(opts: BackupOptions, chunkSize: number): DedupeSettings {
  for (const [name, v, min] of [
    ['exactIds', opts.exactIds, 0],
    ['windowChunks', opts.windowChunks, 1],
    ['filterBitsPerId', opts.filterBitsPerId, 0],
  ] as const) {
    if (v !== undefined && !(v >= min)) throw new KscError('KSC_E_INVALID', `backup option ${name} must be a number ≥ ${min}, not ${v}`);
  }
  const perBatch = chunksPerBatch(opts, chunkSize);
  return { exactIds: opts.exactIds ?? EXACT_IDS, bitsPerId: opts.filterBitsPerId, window: Math.max(perBatch, Math.floor(opts.windowChunks ?? WINDOW_CHUNKS)) };
}

function chunksPerBatch(opts: BackupOptions, chunkSize: number): number {
  return Math.max(1, Math.floor((opts.batchBytes ?? BATCH_BYTES) / chunkSize));
}

/** How the pipeline runs for `totalBytes` to read: a small increment is packed on this thread. */
export function pipelineShape(opts: BackupOptions, chunkSize: number, totalBytes: number): PipelineShape {
  const inline = totalBytes <= (opts.inlineBytes ?? (poolStarted() ? 0 : INLINE_BYTES));
  return { perBatch: chunksPerBatch(opts, chunkSize), batches: opts.batches ?? BATCHES, inline };
}
