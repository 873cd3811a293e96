/**
 * The origin record of a restored image (formats/ksc_inc.md §4.3), the image side: whether the record is
 * trustworthy now (rule 4: the record whole, bitmaps kept, its bitmap present, enabled and consistent),
 * setting it after a restore (rule 1) and clearing it before a bitmap step that would make it lie (rule 3).
 */
import { randomBytes } from 'node:crypto';
import { type OriginRecord, originBitmapName } from '../../format/origin.js';
import * as bitmaps from './bitmaps.js';
import type { KscCore } from './core.js';
import { flush } from './flush.js';

/** The origin claim as a reader may use it (rule 4), or why not; null when the image has no record. */
export type OriginView = { record: OriginRecord; bitmap: string } | { problem: string };

export function originView(c: KscCore): OriginView | null {
  const slot = c.header.origin;
  if (!slot || slot.state === 'none') return null;
  if (slot.state === 'damaged') return { problem: `origin record damaged: ${slot.reason}` };
  const name = originBitmapName(slot.record);
  const info = bitmaps.bitmapInfo(c, name);
  if (!info) return { problem: `origin bitmap ${name} is missing` };
  if (!info.enabled) return { problem: `origin bitmap ${name} is disabled` };
  if (!info.consistent || info.damage) return { problem: `origin bitmap ${name} is inconsistent${info.damage ? ` (${info.damage})` : ''}` };
  return { record: slot.record, bitmap: name };
}

/** Writes the header with `origin` (or without a record, for null), after a flush. */
async function writeOrigin(c: KscCore, origin: OriginRecord | null): Promise<void> {
  await flush(c);
  await c.flushMutex.run(() => c.writeHeader({ ...c.header, origin: origin ? { state: 'ok', record: origin } : { state: 'none' } }));
}

/**
 * Rule 1: records that the image now holds exactly backup `r` (the caller flushed every byte of it): a new,
 * enabled, empty origin bitmap; the header naming it; the previous origin bitmap removed. Returns the bitmap.
 */
export async function setOrigin(c: KscCore, r: Omit<OriginRecord, 'bitmapSuffix'>, granularity: number): Promise<string> {
  c.writable();
  const prev = c.header.origin?.state === 'ok' ? originBitmapName(c.header.origin.record) : null;
  const record: OriginRecord = { ...r, bitmapSuffix: randomBytes(8) };
  const name = originBitmapName(record);
  await bitmaps.addBitmap(c, name, { granularity, enabled: true });
  await writeOrigin(c, record);
  if (prev && bitmaps.hasBitmap(c, prev)) await bitmaps.removeBitmap(c, prev);
  return name;
}

/** Rule 3: clears the record first when bitmap `name` is the origin bitmap and is about to lose bits or stop tracking. */
export async function dropOriginFor(c: KscCore, name: string): Promise<void> {
  const slot = c.header.origin;
  if (slot?.state !== 'ok' || originBitmapName(slot.record) !== name) return;
  c.writable();
  await writeOrigin(c, null);
}
