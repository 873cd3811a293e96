/**
 * The manifest's base record (formats/repository.md §7.2 member `base`, formats/ksc_inc.md §4.2 rule 9): the
 * raw base a backed-up overlay read through to, and which chunks were wholly the base's. Pure: no I/O.
 */
import type { Manifest } from './manifest.js';

export interface BaseRecord {
  /** The base's path on the backed-up host: a hint only. */
  path: string;
  size: number;
  /** Fingerprint v1 (formats/migrate.md §2), `v1:SIZE:HEX`. */
  fingerprint: string;
  mtimeMs: number;
  /** Runs [first, count] of base chunks, ascending and disjoint. */
  chunks: [number, number][];
}

/** Above this much JSON a writer leaves the record out (§7.2). */
export const MAX_BASE_RUNS_JSON = 256 * 1024;

/** The manifest's base record, or null when it has none or one that breaks §7.2 (treated as absent). */
export function parseBaseRecord(m: Pick<Manifest, 'meta' | 'size' | 'chunkSize'>): BaseRecord | null {
  const b = m.meta.base as Partial<BaseRecord> | undefined | null;
  if (typeof b !== 'object' || b === null) return null;
  const { path, size, fingerprint, mtimeMs, chunks } = b;
  if (typeof path !== 'string' || typeof fingerprint !== 'string' || typeof mtimeMs !== 'number') return null;
  if (!Number.isSafeInteger(size) || size! < 1 || !fingerprint.startsWith(`v1:${size}:`) || !/^v1:\d+:[0-9a-f]{64}$/.test(fingerprint)) return null;
  if (!Array.isArray(chunks)) return null;
  const n = Math.ceil(m.size / m.chunkSize);
  let next = 0;
  for (const r of chunks as unknown[]) {
    if (!Array.isArray(r) || r.length !== 2) return null;
    const [first, count] = r as [unknown, unknown];
    if (!Number.isSafeInteger(first) || !Number.isSafeInteger(count)) return null;
    if ((first as number) < next || (count as number) < 1 || (first as number) + (count as number) > n) return null;
    next = (first as number) + (count as number);
  }
  return { path, size: size!, fingerprint, mtimeMs, chunks: chunks as [number, number][] };
}

/** Whether chunk `k` is a base chunk: binary search over the runs. */
export function isBaseChunk(runs: readonly [number, number][], k: number): boolean {
  let lo = 0;
  let hi = runs.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const [first, count] = runs[mid]!;
    if (k < first) hi = mid - 1;
    else if (k >= first + count) lo = mid + 1;
    else return true;
  }
  return false;
}

/** The runs of chunks (of `chunkSize` bytes, `chunks` of them) not touched by any of `above`, extents sorted by offset. */
export function baseRuns(above: readonly { offset: number; length: number }[], chunkSize: number, chunks: number): [number, number][] {
  const runs: [number, number][] = [];
  let k = 0;
  const add = (from: number, to: number): void => {
    if (to > from) runs.push([from, to - from]);
  };
  for (const e of above) {
    const first = Math.floor(e.offset / chunkSize);
    const last = Math.floor((e.offset + e.length - 1) / chunkSize);
    add(k, Math.min(first, chunks));
    k = Math.max(k, last + 1);
  }
  add(k, chunks);
  return runs;
}
