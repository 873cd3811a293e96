/**
 * The base record a backup writes into its manifest (formats/repository.md §7.2 `base`, formats/ksc_inc.md
 * §4.2 rule 9): when the disk is a ksc_inc overlay directly over a raw base, the base's path (a hint), size,
 * fingerprint v1, and the runs of chunks the overlay holds no block of (they read the base at the point in
 * time). Taken after the point in time is frozen: a block the overlay gains later only makes fewer chunks
 * base chunks (conservative); with a backing a block never returns to UNALLOCATED.
 */
import { statSync } from 'node:fs';
import * as path from 'node:path';
import type { BlockDevice } from '../../image/types.js';
import type { Manifest } from '../../repo/manifest.js';
import { type BaseRecord, MAX_BASE_RUNS_JSON, baseRuns, parseBaseRecord } from '../../repo/base-record.js';
import { baseOf, fingerprintV1 } from '../migrate-base.js';

/** The record for `dev` (chunks of `chunkSize`), or null when it has no raw base directly below it. */
export async function baseRecordOf(dev: BlockDevice, chunkSize: number, parent: Manifest | null): Promise<BaseRecord | null> {
  const b = baseOf(dev);
  if (!b || b.depth !== 1 || b.base.format !== 'raw') return null;
  const file = path.resolve(b.base.name);
  let st: { size: number; mtimeMs: number };
  try {
    st = statSync(file);
  } catch {
    return null; // not a file of this host (a device served from elsewhere): no record
  }
  if (st.size !== b.base.size) return null;
  const chunks = Math.ceil(dev.size / chunkSize);
  const above = (await dev.extents(0, dev.size)).filter((e) => e.depth === 0);
  const runs = baseRuns(above, chunkSize, chunks);
  if (JSON.stringify(runs).length > MAX_BASE_RUNS_JSON) return null;
  const prev = parent ? parseBaseRecord(parent) : null;
  const fingerprint = prev && prev.path === file && prev.size === st.size && prev.mtimeMs === st.mtimeMs ? prev.fingerprint : await fingerprintV1(b.base);
  return { path: file, size: st.size, fingerprint, mtimeMs: st.mtimeMs, chunks: runs };
}
