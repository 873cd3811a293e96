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

/**
 * Bytes of the device statusOf asks about first, per extent a reply can hold: one block may be one extent
 * (every other block written), so a window of (most + 1) blocks of 4 KiB is enough on the most fragmented
 * image; each next window is twice the last, so a sparse range takes a few calls, not one per window.
 */
const WINDOW_PER_EXTENT = 4096;

/**
 * Extents of one context over [off, off+len), merged, covering the range exactly — or, when `most` is given,
 * at least its first `most` extents exactly (a reply holds no more, execute.ts): the device is asked in
 * growing windows and statusOf stops once it holds more than `most` extents, so a BLOCK_STATUS over 4 GiB of a
 * fragmented image costs what its reply holds, not every extent of the range. Extents merge across windows
 * (same flags), so the first `most` are those one call over the whole range gives; the last one kept past
 * them may end early at a window's end.
 */
export async function statusOf(ctx: string, dev: BlockDevice, off: number, len: number, most = Infinity): Promise<StatusExtent[]> {
  const out: StatusExtent[] = [];
  const push = (length: number, flags: number): void => {
    if (length <= 0) return;
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += length;
    else out.push({ length, flags });
  };
  const window = windowOf(ctx, dev, push);
  const end = off + len;
  let size = Number.isFinite(most) ? Math.max(dev.blockSize, WINDOW_PER_EXTENT) * (most + 1) : len;
  for (let at = off; at < end && out.length <= most; size *= 2) {
    const n = Math.min(size, end - at);
    await window(at, n);
    at += n;
  }
  return out;
}

/** What adds the extents of `ctx` over one window [at, at+n) to the list (through `push`, which merges). */
function windowOf(ctx: string, dev: BlockDevice, push: (length: number, flags: number) => void): (at: number, n: number) => Promise<void> {
  if (ctx === 'base:allocation') {
    return async (at, n) => {
      for (const e of await dev.extents(at, n)) push(e.length, e.state === 'data' ? 0 : STATE_HOLE | STATE_ZERO);
    };
  }
  if (ctx === 'qemu:allocation-depth') {
    return async (at, n) => {
      for (const e of await dev.extents(at, n)) push(e.length, e.depth === null || e.state === 'unallocated' ? 0 : e.depth + 1);
    };
  }
  if (ctx.startsWith(DIRTY_BITMAP_PREFIX)) {
    const name = ctx.slice(DIRTY_BITMAP_PREFIX.length);
    return async (at, n) => {
      const bitmaps = dev.dirtyBitmaps;
      if (!bitmaps?.hasBitmap(name)) throw new KscError('KSC_E_INVALID', `bitmap "${name}" was removed since it was selected`);
      let pos = at;
      for (const d of await bitmaps.bitmapExtents(name, at, n)) {
        push(d.offset - pos, 0);
        push(d.length, STATE_DIRTY);
        pos = d.offset + d.length;
      }
      push(at + n - pos, 0);
    };
  }
  return async (_at, n) => push(n, 0);
}
