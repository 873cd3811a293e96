/**
 * Opening images by path: format probing, backing-chain resolution (relative names resolve against the
 * image's folder; loops and chains deeper than 64 are refused), and creation of new images.
 */
import type { LocalBaseRef } from '../format/local-base.js';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { KscError, isKscError } from '../errors.js';
import { type FileOpener, openHostFile } from '../io/file.js';
import { buildNewFile, firstMissingFolder } from '../io/newfile.js';
import { HEADER_SLOTS, MAGIC, MAX_CHAIN_DEPTH } from '../format/constants.js';
import { KscImage, type CreateKscOptions } from './ksc.js';
import { FOREIGN_PROBE_BYTES, foreignError, foreignFormat } from './foreign.js';
import { RawDevice } from './raw.js';
import type { BackupBacking } from './repobacking.js';
import { OfflineBackupBacking } from './offline-backing.js';
import type { BackupRef } from '../format/header.js';
import type { BlockDevice } from './types.js';
import type { HandoverRecord } from './ksc/handover.js';

export type ImageFormat = 'raw' | 'ksc_inc';

export interface OpenImageOptions {
  /** Open the top image for writing (its backing chain is always read-only unless backingWritable). */
  write?: boolean;
  /** Open the immediate backing for writing too (commit; a frozen backing takes the commit). */
  backingWritable?: boolean;
  /** Allow writes to a frozen top image (§4.1 FROZEN). */
  force?: boolean;
  /** Open for writing even an image marked migrated away (§4.1 MIGRATED_AWAY); default: KSC_E_MIGRATED. */
  migratedAway?: boolean;
  /** Format of the top image; default: probed from its first bytes. */
  format?: ImageFormat;
  opener?: FileOpener;
  /** The top image's handover record (formats/ksc_inc.md §9 rule 11), from the writer that handed it over. */
  handover?: HandoverRecord;
  /** The top image, opened for writing after a crash: run its leak sweep in the background (§8.1). */
  deferSweep?: boolean;
  /**
   * Read-only opens only: when the repository of a live restore (§4.2) cannot be opened, open the image over
   * a stand-in whose reads fail with the reason (offline-backing.ts), for its metadata (`kscinc info`).
   */
  offlineBackup?: boolean;
}

/**
 * Reads the first bytes of a file to tell ksc_inc from raw. Other formats' images (qcow2, vmdk, vhdx, vdi,
 * vpc, qed, LUKS) are refused with KSC_E_FORMAT: read as raw they would show their metadata as disk data.
 */
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
    const start = Buffer.alloc(FOREIGN_PROBE_BYTES);
    const got = await f.read(start, 0);
    const size = await f.size();
    let tail: Buffer | null = null;
    if (size >= 1024) {
      tail = Buffer.alloc(512);
      if ((await f.read(tail, size - 512)) !== 512) tail = null;
    }
    const foreign = foreignFormat(start.subarray(0, got), tail);
    if (foreign) throw foreignError(file, foreign);
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
    const missing = firstMissingFolder(file);
    if (missing) throw new KscError('KSC_E_NOT_FOUND', `${file}: folder ${missing} does not exist`, { cause: e });
    throw new KscError('KSC_E_NOT_FOUND', depth === 0 ? `${file}: no such file` : `backing file ${file} not found`, { cause: e });
  }
  // Its kind (a regular file, not of /proc or /sys) is checked on what is opened (io/file.ts openHostFile).
  if (seen.has(real)) throw new KscError('KSC_E_LOOP', `${file}: backing chain loops back to ${real}`);
  seen.add(real);
  const opener = opts.opener ?? openHostFile;
  const fmt = format ?? (await probeFormat(file, opener));
  if (fmt === 'raw') return RawDevice.open(file, { write, opener });
  // Read the header first (read-only) to find the backing, open the chain, then open this image.
  const probe = await opener(file, { write: false });
  let backingName: string | null;
  let backingFormat: ImageFormat;
  let backup: { ref: BackupRef; size: number; localBase: LocalBaseRef | null } | null = null;
  try {
    const { header } = await KscImage.readHeader(probe);
    backingName = header.backingFormat === 0 ? null : header.backingName;
    backingFormat = header.backingFormat === 1 ? 'raw' : 'ksc_inc';
    if (header.backingFormat === 3 && header.backup) backup = { ref: header.backup, size: header.virtualSize, localBase: header.localBase ?? null };
  } finally {
    await probe.close();
  }
  let backing: BlockDevice | null = null;
  /** The live restore's backing when this image has one (its repository code is loaded only then). */
  let live: BackupBacking | null = null;
  if (backup) {
    // §4.2: a live restore. The top image opened for writing holds the repository (rule 5) and fills.
    // repobacking.js (and the repository code under it) is imported here, not at the top: the other images,
    // and so convert, info and the like, never load it (CLI start-up, bench/README.md session 16).
    const { BackupBacking } = await import('./repobacking.js');
    const ref = backup.ref;
    const localBase = backup.localBase ? await openLocalBase(file, backup.localBase, opener) : undefined;
    backing = await BackupBacking.open(file, backingName!, ref, backup.size, { hold: write && depth === 0, localBase }).catch(async (e: unknown) => {
      await localBase?.dev.close();
      if (write || !opts.offlineBackup || !isKscError(e)) throw e;
      return new OfflineBackupBacking(`backup ${ref.id} in ${backingName!}`, backup!.size, ref.chunkSize, e);
    });
    if (backing instanceof BackupBacking) live = backing;
  } else if (backingName !== null) {
    const bpath = resolveBackingPath(file, backingName);
    try {
      backing = await openChain(bpath, backingFormat, depth === 0 && !!opts.backingWritable, { ...opts, force: true }, seen, depth + 1);
    } catch (e) {
      if (isKscError(e, 'KSC_E_NOT_FOUND')) throw new KscError('KSC_E_NOT_FOUND', `image ${file}: backing file ${backingName} (${bpath}) not found`, { cause: e });
      throw e;
    }
  }
  try {
    const img = await KscImage.open(file, {
      write,
      backing,
      opener,
      force: !!opts.force,
      migratedAway: !!opts.migratedAway,
      handover: depth === 0 ? opts.handover : undefined,
      deferSweep: depth === 0 && !!opts.deferSweep,
    });
    if (write && live) {
      const b = live;
      b.setFill(
        (off, data) => img.fillFromBacking(off, data).then(() => undefined),
        (off, n) => img.extents(off, n),
      );
      img.onRead = (off, n) => b.noteRead(off, n);
    }
    return img;
  } catch (e) {
    await backing?.close();
    throw e;
  }
}

/** §4.2 rule 9: the local raw base a live restore names, opened read-only (KSC_E_NOT_FOUND naming it when absent). */
async function openLocalBase(file: string, ref: LocalBaseRef, opener: FileOpener): Promise<{ ref: LocalBaseRef; dev: BlockDevice }> {
  try {
    return { ref, dev: await RawDevice.open(ref.name, { write: false, opener }) };
  } catch (e) {
    if (isKscError(e, 'KSC_E_NOT_FOUND') || (e as NodeJS.ErrnoException).code === 'ENOENT')
      throw new KscError('KSC_E_NOT_FOUND', `image ${file}: its local base ${ref.name} (formats/ksc_inc.md §4.2 rule 9) not found`, { cause: e });
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
  /** Replace an existing file (default: KSC_E_EXISTS). */
  force?: boolean;
  /**
   * The name the new image will take when it is built under another one (writeNewImage in a temporary
   * file): that file may not be in the backing chain either (an image that would back itself).
   */
  finalName?: string;
}

/**
 * Creates a ksc_inc image; the backing is stored relative to the new image's folder. The image is built
 * under a temporary name and appears whole or not at all (io/newfile.ts); an existing `file` is refused
 * unless `force`.
 */
export async function createImage(file: string, opts: CreateImageOptions): Promise<void> {
  if (opts.opener) return writeNewImage(file, opts); // a test's file layer: no renames outside it
  await buildNewFile(file, { force: opts.force, before: () => refuseSelfBacking(file, opts.backing) }, (temp) => writeNewImage(temp, { ...opts, finalName: file }));
}

/** KSC_E_LOOP when `backing` is `file` itself (checked before "already exists": that is the real mistake). */
async function refuseSelfBacking(file: string, backing: string | undefined): Promise<void> {
  if (backing === undefined) return;
  const real = (p: string): Promise<string> => fsp.realpath(p).catch(() => path.resolve(p));
  if ((await real(file)) === (await real(backing))) throw new KscError('KSC_E_LOOP', `${file}: an image cannot be its own backing file`);
}

/**
 * Writes a new ksc_inc image at `file`, which must not exist, in place (not atomic: for builders that run
 * inside buildNewFile). Same options as createImage; the backing is stored relative to `file`'s folder.
 */
export async function writeNewImage(file: string, opts: CreateImageOptions): Promise<void> {
  const create: CreateKscOptions = { size: opts.size ?? 0, blockSize: opts.blockSize, diskUuid: opts.diskUuid, intentRegion: opts.intentRegion, opener: opts.opener };
  if (opts.backing !== undefined) {
    const abs = path.resolve(opts.backing);
    const fmt = opts.backingFormat ?? (await probeFormat(abs, opts.opener));
    const self = new Set([path.resolve(file)]);
    if (opts.finalName !== undefined) self.add(await fsp.realpath(opts.finalName).catch(() => path.resolve(opts.finalName!)));
    const dev = await openChain(abs, fmt, false, { opener: opts.opener }, self, 1);
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

/** The hand-over of a writable ksc_inc image for a hot upgrade (§9 rule 11); null for any other device. */
export function handOverOf(dev: BlockDevice): (() => Promise<HandoverRecord | null>) | null {
  return dev instanceof KscImage && !dev.readOnly ? () => dev.handOver() : null;
}

/** The flush before a hot upgrade's handover (§9 rule 11): prepareHandOver of a ksc_inc image, flush of any other. */
export function prepareHandOverOf(dev: BlockDevice): Promise<void> {
  if (dev.readOnly) return Promise.resolve();
  return dev instanceof KscImage ? dev.prepareHandOver() : dev.flush();
}
