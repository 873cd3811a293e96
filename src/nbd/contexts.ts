/**
 * Meta contexts (formats/nbd.md §3): which an export offers and the status extents of each. The list is
 * computed at each LIST/SET_META_CONTEXT from the image's bitmaps at that moment, so a bitmap created while
 * serving is offered without a restart. A selection maps the id it was given to a context *name*, so ids
 * never move under a client whatever bitmaps come and go; a selected bitmap removed later answers EINVAL.
 * Internal bitmaps of the backup handover (`NAME#TOKEN`, `NAME~frozen`, formats/repository.md §10) are never
 * offered: they come and go with every backup.
 */
import { KscError } from '../errors.js';
import { FROZEN_SUFFIX, TOKEN_SEPARATOR } from '../engines/backup.js';
import type { BlockDevice } from '../image/types.js';
import { STATE_DIRTY, STATE_HOLE, STATE_ZERO, type StatusExtent } from './wire.js';

export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

/** True for the backup handover's own bitmaps, which no client should select. */
export function internalBitmap(name: string): boolean {
  return name.includes(TOKEN_SEPARATOR) || name.endsWith(FROZEN_SUFFIX);
}

/** The user bitmaps of `device` now, limited to `allow` when given. */
export function exportedBitmaps(device: BlockDevice, allow: readonly string[] | undefined): string[] {
  const names = (device.dirtyBitmaps?.bitmapNames() ?? []).filter((n) => !internalBitmap(n));
  return allow ? names.filter((n) => allow.includes(n)) : names;
}

/** Context names an export offers now: base:allocation, qemu:allocation-depth, then its bitmaps in directory order. */
export function contextsOf(device: BlockDevice, allow: readonly string[] | undefined): string[] {
  return ['base:allocation', 'qemu:allocation-depth', ...exportedBitmaps(device, allow).map((b) => DIRTY_BITMAP_PREFIX + b)];
}

/** Extents of one context over [off, off+len), merged, covering the range exactly. */
export async function statusOf(ctx: string, dev: BlockDevice, off: number, len: number): Promise<StatusExtent[]> {
  const out: StatusExtent[] = [];
  const push = (length: number, flags: number): void => {
    if (length <= 0) return;
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += length;
    else out.push({ length, flags });
  };
  if (ctx === 'base:allocation') {
    for (const e of await dev.extents(off, len)) push(e.length, e.state === 'data' ? 0 : STATE_HOLE | STATE_ZERO);
  } else if (ctx === 'qemu:allocation-depth') {
    for (const e of await dev.extents(off, len)) push(e.length, e.depth === null || e.state === 'unallocated' ? 0 : e.depth + 1);
  } else if (ctx.startsWith(DIRTY_BITMAP_PREFIX)) {
    const name = ctx.slice(DIRTY_BITMAP_PREFIX.length);
    const bitmaps = dev.dirtyBitmaps;
    if (!bitmaps?.hasBitmap(name)) throw new KscError('KSC_E_INVALID', `bitmap "${name}" was removed since it was selected`);
    let pos = off;
    for (const d of await bitmaps.bitmapExtents(name, off, len)) {
      push(d.offset - pos, 0);
      push(d.length, STATE_DIRTY);
      pos = d.offset + d.length;
    }
    push(off + len - pos, 0);
  } else {
    push(len, 0);
  }
  return out;
}
