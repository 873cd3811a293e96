/**
 * Opening images by path: format probing, backing-chain resolution (relative names resolve against the
 * image's folder; loops and chains deeper than 64 are refused), and creation of new images.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { KscError, isKscError } from '../errors.js';
import { type FileOpener, openHostFile } from '../io/file.js';
import { HEADER_SLOTS, MAGIC, MAX_CHAIN_DEPTH } from '../format/constants.js';
import { KscImage, type CreateKscOptions } from './ksc.js';
import { RawDevice } from './raw.js';
import type { BlockDevice } from './types.js';

export type ImageFormat = 'raw' | 'ksc_inc';

export interface OpenImageOptions {
  /** Open the top image for writing (its backing chain is always read-only unless backingWritable). */
  write?: boolean;
  /** Open the immediate backing for writing too (commit; a frozen backing takes the commit). */
  backingWritable?: boolean;
  /** Allow writes to a frozen top image (§4.1 FROZEN). */
  force?: boolean;
  /** Format of the top image; default: probed from its first bytes. */
  format?: ImageFormat;
  opener?: FileOpener;
}

/** Reads the first bytes of a file to tell ksc_inc from raw. */
export async function probeFormat(file: string, opener: FileOpener = openHostFile): Promise<ImageFormat> {
  const f = await opener(file, { write: false });
  try {
    // Either header slot carrying the magic makes it ksc_inc: a damaged slot A must not turn the image into a
    // "raw disk" that exposes its metadata.
    const head = Buffer.alloc(8);
    for (const slot of HEADER_SLOTS) {
      const n = await f.read(head, slot);
      if (n === 8 && head.equals(MAGIC)) return 'ksc_inc';
    }
    return 'raw';
  } finally {
    await f.close();
  }
}

/** Where a backing name stored in `image` points: relative names are relative to the image's folder. */
export function resolveBackingPath(imagePath: string, backingName: string): string {
  return path.isAbsolute(backingName) ? backingName : path.join(path.dirname(path.resolve(imagePath)), backingName);
}

/** Opens a raw or ksc_inc image with its whole backing chain. */
export async function openImage(file: string, opts: OpenImageOptions = {}): Promise<BlockDevice> {
  return openChain(file, opts.format, !!opts.write, opts, new Set(), 0);
}

/** Opens a ksc_inc image (fails with KSC_E_FORMAT for anything else). */
export async function openKsc(file: string, opts: Omit<OpenImageOptions, 'format'> = {}): Promise<KscImage> {
  const dev = await openImage(file, { ...opts });
  if (!(dev instanceof KscImage)) {
    await dev.close();
    throw new KscError('KSC_E_FORMAT', `${file}: is a raw image, not ksc_inc`);
  }
  return dev;
}

async function openChain(file: string, format: ImageFormat | undefined, write: boolean, opts: OpenImageOptions, seen: Set<string>, depth: number): Promise<BlockDevice> {
  if (depth > MAX_CHAIN_DEPTH) throw new KscError('KSC_E_RANGE', `${file}: backing chain is deeper than ${MAX_CHAIN_DEPTH}`);
  let real: string;
  try {
    real = await fsp.realpath(file);
  } catch (e) {
    throw new KscError('KSC_E_NOT_FOUND', depth === 0 ? `${file}: no such file` : `backing file ${file} not found`, { cause: e });
  }
  if (seen.has(real)) throw new KscError('KSC_E_LOOP', `${file}: backing chain loops back to ${real}`);
  seen.add(real);
  const opener = opts.opener ?? openHostFile;
  const fmt = format ?? (await probeFormat(file, opener));
  if (fmt === 'raw') return RawDevice.open(file, { write, opener });
  // Read the header first (read-only) to find the backing, open the chain, then open this image.
  const probe = await opener(file, { write: false });
  let backingName: string | null;
  let backingFormat: ImageFormat;
  try {
    const { header } = await KscImage.readHeader(probe);
    backingName = header.backingFormat === 0 ? null : header.backingName;
    backingFormat = header.backingFormat === 1 ? 'raw' : 'ksc_inc';
  } finally {
    await probe.close();
  }
  let backing: BlockDevice | null = null;
  if (backingName !== null) {
    const bpath = resolveBackingPath(file, backingName);
    try {
      backing = await openChain(bpath, backingFormat, depth === 0 && !!opts.backingWritable, { ...opts, force: true }, seen, depth + 1);
    } catch (e) {
      if (isKscError(e, 'KSC_E_NOT_FOUND')) throw new KscError('KSC_E_NOT_FOUND', `image ${file}: backing file ${backingName} (${bpath}) not found`, { cause: e });
      throw e;
    }
  }
  try {
    return await KscImage.open(file, { write, backing, opener, force: !!opts.force });
  } catch (e) {
    await backing?.close();
    throw e;
  }
}

export interface CreateImageOptions {
  /** Virtual size; defaults to the backing's size. */
  size?: number;
  blockSize?: number;
  /** Backing image path as the caller names it (relative to the working directory, or absolute). */
  backing?: string;
  backingFormat?: ImageFormat;
  diskUuid?: Buffer;
  intentRegion?: number;
  opener?: FileOpener;
}

/** Creates a ksc_inc image; the backing is stored relative to the new image's folder. */
export async function createImage(file: string, opts: CreateImageOptions): Promise<void> {
  const create: CreateKscOptions = { size: opts.size ?? 0, blockSize: opts.blockSize, diskUuid: opts.diskUuid, intentRegion: opts.intentRegion, opener: opts.opener };
  if (opts.backing !== undefined) {
    const abs = path.resolve(opts.backing);
    const fmt = opts.backingFormat ?? (await probeFormat(abs, opts.opener));
    const dev = await openChain(abs, fmt, false, { opener: opts.opener }, new Set([path.resolve(file)]), 1);
    try {
      create.size = opts.size ?? dev.size;
    } finally {
      await dev.close();
    }
    create.backingName = path.relative(path.dirname(path.resolve(file)), abs) || path.basename(abs);
    create.backingFormat = fmt;
  } else if (opts.size === undefined) {
    throw new KscError('KSC_E_INVALID', `${file}: a size is needed when there is no backing file`);
  }
  await KscImage.create(file, create);
}
