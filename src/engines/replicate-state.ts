/**
 * The replica's consistent-point record in the source image (formats/migrate.md §11.2 step 6): an empty,
 * disabled bitmap `kscinc-replica#ID@HEX` naming the destination (its incoming id, or `-` for an NBD server
 * without one) and the consistent point of the last completed cycle, in ms since 1970 (hex). Written only
 * after the destination acknowledged the FLUSH that made that point durable there, so the record is never
 * newer than what the replica holds. The rest of the replication's state is the migration's (§10.2).
 */
import type { DirtyBitmaps } from '../image/capabilities.js';

const PREFIX = 'kscinc-replica#';
/**
 * A staged cycle's bits (formats/migrate.md §11.7): every round's frozen bits go here before they are dropped,
 * until the destination committed the cycle; a cycle that did not commit merges them back (disabled, internal).
 */
export const CYCLE_BITS = 'kscinc-cycle~frozen';
const RECORD = /^kscinc-replica#([0-9a-f]{32}|-)@([0-9a-f]{1,13})$/;

const idText = (id: string | null): string => id ?? '-';

/** The recorded consistent point (ms since 1970) for destination `id`, or null. */
export function consistentPoint(bitmaps: DirtyBitmaps, id: string | null): number | null {
  let best: number | null = null;
  for (const name of bitmaps.bitmapNames()) {
    const m = RECORD.exec(name);
    if (m && m[1] === idText(id)) best = Math.max(best ?? 0, parseInt(m[2]!, 16));
  }
  return best;
}

/** Records consistent point `t` for destination `id` (one management step: the new record in, every older one out). */
export async function recordConsistent(bitmaps: DirtyBitmaps, id: string | null, t: number): Promise<void> {
  const name = `${PREFIX}${idText(id)}@${Math.max(0, Math.floor(t)).toString(16)}`;
  const old = bitmaps.bitmapNames().filter((n) => n.startsWith(PREFIX) && n !== name);
  if (old.length === 0 && bitmaps.hasBitmap(name)) return;
  await bitmaps.updateBitmaps(bitmaps.hasBitmap(name) ? [] : [name], old);
}

/** Removes every consistent-point record (the replication's state is dropped, or starts over). */
export async function removeConsistent(bitmaps: DirtyBitmaps): Promise<void> {
  const old = bitmaps.bitmapNames().filter((n) => n.startsWith(PREFIX));
  if (old.length > 0) await bitmaps.updateBitmaps([], old);
}

/** Puts a staged cycle's bits that never committed back into the migration bitmap (a superset: sent again). */
export async function mergeCycleBits(bitmaps: DirtyBitmaps, into: string): Promise<void> {
  if (!bitmaps.hasBitmap(CYCLE_BITS)) return;
  await bitmaps.mergeBitmap(CYCLE_BITS, into);
  await bitmaps.removeBitmap(CYCLE_BITS);
}
