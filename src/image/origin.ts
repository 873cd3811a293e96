/**
 * The origin record of a restored image (formats/ksc_inc.md §4.3) for engines and interfaces, which never
 * test a device's class: what the device claims to be a copy of, and recording it after a restore.
 */
import { KscImage } from './ksc.js';
import type { OriginRecord } from '../format/origin.js';
import type { BlockDevice } from './types.js';

export type { OriginRecord } from '../format/origin.js';

/** The trusted record (§4.3 rule 4) with its origin bitmap, or why it is not trusted; null without a record (or not a ksc_inc image). */
export function originOf(dev: BlockDevice): { record: OriginRecord; bitmap: string } | { problem: string } | null {
  return dev instanceof KscImage ? dev.origin : null;
}

/** §4.3 rule 1 on a ksc_inc image (every byte of the backup flushed); returns the origin bitmap, or null for another device. */
export async function recordOrigin(dev: BlockDevice, r: Omit<OriginRecord, 'bitmapSuffix'>): Promise<string | null> {
  return dev instanceof KscImage ? dev.setOrigin(r) : null;
}
