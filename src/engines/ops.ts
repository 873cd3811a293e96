/**
 * Chain operations: snapshot (freeze an image under a new overlay), commit (merge an overlay into its
 * backing), rebase (point an image at a different backing, keeping its visible content).
 */
import * as path from 'node:path';
import { KscError } from '../errors.js';
import { BlockState } from '../format/constants.js';
import type { KscImage } from '../image/ksc.js';
import { chainOf } from '../image/capabilities.js';
import { openImage, openKsc, probeFormat, writeNewImage } from '../image/open.js';
import { buildNewFile } from '../io/newfile.js';
import type { BlockDevice } from '../image/types.js';

export type Progress = (done: number, total: number) => void;

/**
 * Creates `overlayPath` on top of `imagePath`. The overlay keeps the disk's UUID (it is the same disk)
 * and takes over its bitmaps with their bits, so dirty tracking continues in the layer that gets the
 * writes. The image is opened for writing, so it takes the writer lock (KSC_E_LOCKED while a server or
 * other writer has it), and a ksc_inc image is marked FROZEN (durably, before the overlay exists): later
 * writers refuse data changes unless forced (formats/ksc_inc.md §4.1). A raw image is only locked.
 */
export async function snapshotImage(imagePath: string, overlayPath: string, opts: { force?: boolean } = {}): Promise<void> {
  // Before the image is opened (and locked): replacing it with an overlay on itself would loop.
  if (path.resolve(imagePath) === path.resolve(overlayPath)) {
    throw new KscError('KSC_E_INVALID', `image ${overlayPath}: an image cannot be its own backing file (a snapshot onto itself loops)`);
  }
  const fmt = await probeFormat(imagePath);
  let uuid: Buffer | undefined;
  let blockSize: number | undefined;
  let base: KscImage | null = null;
  let raw: BlockDevice | null = null;
  if (fmt === 'ksc_inc') {
    base = await openKsc(imagePath, { write: true });
    uuid = base.diskUuid;
    blockSize = base.blockSize;
  } else {
    raw = await openImage(imagePath, { write: true, format: 'raw' });
  }
  try {
    // Built whole under a temporary name (with its bitmaps), then named: never an overlay without them. The
    // base is frozen first (durably), once the new file's name is known to be free.
    await buildNewFile(overlayPath, { force: opts.force }, async (temp) => {
      await base?.freeze();
      await writeNewImage(temp, { backing: imagePath, backingFormat: fmt, diskUuid: uuid, blockSize, finalName: overlayPath });
      if (base && base.bitmapList.some((b) => b !== null)) {
        const top = await openKsc(temp, { write: true });
        try {
          await base.copyBitmapsTo(top);
        } finally {
          await top.close();
        }
      }
    });
  } finally {
    await base?.close();
    await raw?.close();
  }
}

/**
 * Writes every block the overlay holds into its backing, makes the backing durable, then empties the
 * overlay (keeping only blocks that reach past the backing's end, which the backing cannot hold). A crash at any point leaves the overlay's visible content intact: until the backing is
 * durable, the overlay still holds every block; afterwards the backing holds them.
 */
export async function commitImage(overlayPath: string, onProgress?: Progress): Promise<{ blocks: number; bytes: number }> {
  const top = await openKsc(overlayPath, { write: true, backingWritable: true });
  try {
    const backing = top.backing;
    if (!backing) throw new KscError('KSC_E_INVALID', `image ${overlayPath}: has no backing file to commit into`);
    const B = top.blockSize;
    let blocks = 0;
    let bytes = 0;
    const total = top.size;
    const committed = new Set<number>();
    for await (const b of top.allocatedBlocks()) {
      const start = b.block * B;
      if (start >= backing.size) continue; // past the backing's end: only the overlay can hold it
      const len = Math.min(B, top.size - start, backing.size - start);
      if (b.state === BlockState.Data) await backing.write(start, await top.read(start, len));
      else await backing.writeZeroes(start, len);
      // A block that straddles the backing's end stays in the overlay too: dropping it would turn its tail
      // (past the backing's end) into zeros.
      if (start + Math.min(B, top.size - start) <= backing.size) committed.add(b.block);
      blocks++;
      bytes += len;
      onProgress?.(start + len, total);
    }
    onProgress?.(total, total); // the last block may end before the disk does
    await backing.flush();
    await top.dropBlocks(committed);
    return { blocks, bytes };
  } finally {
    await top.close();
  }
}

/**
 * Makes `newBacking` (or none) the backing of `imagePath`. Safe mode first copies into the image every
 * block whose content would change, so the image reads the same afterwards; `unsafe` only rewrites the
 * header (for when the caller knows the new backing holds the same data, e.g. after moving a file).
 */
export async function rebaseImage(imagePath: string, newBacking: string | null, opts: { unsafe?: boolean; format?: 'raw' | 'ksc_inc'; onProgress?: Progress } = {}): Promise<{ copiedBytes: number }> {
  const img = await openKsc(imagePath, { write: true });
  let next: BlockDevice | null = null;
  let copied = 0;
  try {
    const fmt = newBacking === null ? null : (opts.format ?? (await probeFormat(newBacking)));
    if (newBacking !== null) {
      const abs = path.resolve(newBacking);
      if (abs === path.resolve(imagePath)) throw new KscError('KSC_E_LOOP', `rebase ${imagePath}: an image cannot be its own backing`);
      next = await openImage(abs, { format: fmt! });
      if (await chainContains(next, imagePath)) throw new KscError('KSC_E_LOOP', `rebase ${imagePath}: ${newBacking} is backed by ${imagePath}`);
    }
    if (!opts.unsafe) copied = await copyDiffering(img, next, opts.onProgress);
    const stored = newBacking === null ? null : path.relative(path.dirname(path.resolve(imagePath)), path.resolve(newBacking)) || path.basename(newBacking);
    const old = img.backing;
    await img.setBacking(stored, fmt, next);
    next = null;
    await old?.close();
    return { copiedBytes: copied };
  } finally {
    await next?.close();
    await img.close();
  }
}

async function chainContains(dev: BlockDevice, file: string): Promise<boolean> {
  const target = path.resolve(file);
  for (const d of chainOf(dev)) {
    if (path.resolve(d.name) === target) return true;
  }
  return false;
}

/** For blocks the image does not hold, copies the old backing's content where the new one differs. */
async function copyDiffering(img: KscImage, next: BlockDevice | null, onProgress?: Progress): Promise<number> {
  const B = img.blockSize;
  const old = img.backing;
  let copied = 0;
  const readVia = async (dev: BlockDevice | null, start: number, len: number): Promise<Buffer> => {
    const buf = Buffer.alloc(len);
    const avail = dev ? Math.max(0, Math.min(len, dev.size - start)) : 0;
    if (avail > 0) await dev!.readInto(start, buf.subarray(0, avail));
    return buf;
  };
  for (const e of await img.extents(0, img.size)) {
    if (e.depth === 0) continue; // held by the image itself
    for (let pos = e.offset; pos < e.offset + e.length;) {
      const len = Math.min(B - (pos % B), e.offset + e.length - pos);
      const before = await readVia(old, pos, len);
      const after = await readVia(next, pos, len);
      if (!before.equals(after)) {
        await img.write(pos, before);
        copied += len;
      }
      pos += len;
      onProgress?.(pos, img.size);
    }
  }
  onProgress?.(img.size, img.size);
  await img.flush();
  return copied;
}
