/**
 * Live restore (formats/ksc_inc.md §4.2, issue 18): a new ksc_inc image whose backing is a backup in a
 * repository, ready to serve at once. Creating it reads the manifest and nothing else (no chunk, no index):
 * blocks are fetched when read (src/image/repobacking.ts) and filled into the image then.
 */
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { KscError } from '../errors.js';
import { KscImage } from '../image/ksc.js';
import { buildNewFile } from '../io/newfile.js';
import type { Repository } from '../repo/repository.js';
import { uuidToBytes } from '../util/uuid.js';
import { resolveBackup } from '../repo/catalog.js';
import { deleteLiveRef, putLiveRef } from '../repo/liverefs.js';
import type { Manifest } from '../repo/manifest.js';
import { parseBaseRecord } from '../repo/base-record.js';
import { RawDevice } from '../image/raw.js';
import { fingerprintBytes, fingerprintText, type LocalBaseRef } from '../format/local-base.js';
import { fingerprintV1 } from './migrate-base.js';

export interface LiveRestoreOptions {
  /** With "latest": the disk whose newest backup to use. */
  disk?: string;
  /** Block size of the new image (default 64 KiB; at most the chunk size, so every fetched chunk fills whole blocks). */
  blockSize?: number;
  /**
   * §4.2 rule 9: a local copy of the backed-up disk's raw base (the manifest's base record): base chunks
   * then read it and only the overlay's chunks are fetched. Checked (size, fingerprint v1 from its bytes)
   * before anything is created; KSC_E_INVALID when it does not match or the backup records no base.
   */
  base?: string;
}

export interface LiveRestoreResult {
  backup: string;
  disk: string;
  target: string;
  size: number;
  chunkSize: number;
  /** The repository location the image names (absolute for a folder). */
  location: string;
  /** The dirty bitmap that records the guest's writes, and the token record made for it (null: no token, next backup is full). */
  bitmap: string;
  tokenRecord: string | null;
  /** The reference that keeps the backup from prune until the image is pulled (repository.md §8.1). */
  reference: string;
  /** §4.2 rule 9: the local base the image reads base chunks from (absolute), and how many chunks those are; null without. */
  localBase: { path: string; fingerprint: string; baseChunks: number } | null;
  durationMs: number;
}

/** The location an image stores: S3 as given, a folder made absolute (§4.2). */
export function storedLocation(location: string): string {
  return /^s3:\/\//i.test(location) ? location : path.resolve(location);
}

/**
 * Creates `target` (a new file: KSC_E_EXISTS if it exists) as a live restore of backup `which` ("latest" or
 * an id) of `repo`, found at `location`. The image appears whole or not at all (§9 rule 9). It carries the
 * enabled, empty bitmap that the backup was made through (`backup` by default) and that backup's token
 * record, so the next backup of the image is incremental against it (§4.2 rule 4).
 */
export async function liveRestore(repo: Repository, location: string, which: string, target: string, opts: LiveRestoreOptions = {}): Promise<LiveRestoreResult> {
  const blockSize = opts.blockSize ?? 64 * 1024;
  const t0 = performance.now();
  const abs = path.resolve(target);
  // The shared lock (no prune until the reference is durable) is taken while the backup is looked up: on S3
  // each is a few round trips, and the first read of a live restore waits for both (issue 18).
  const [found, locked] = await Promise.allSettled([resolveBackup(repo, which, opts.disk), repo.readerLock(`live restore of backup ${which} into ${abs}`)]);
  const lock = locked.status === 'fulfilled' ? locked.value : null;
  let m: Manifest;
  let localBase: LocalBaseRef | null;
  let reference: string;
  try {
    if (found.status === 'rejected') throw found.reason;
    if (locked.status === 'rejected') throw locked.reason;
    m = found.value;
    if (blockSize > m.chunkSize) throw new KscError('KSC_E_INVALID', `block size ${blockSize} is above the backup's chunk size ${m.chunkSize}: fetched chunks could not fill whole blocks`);
    localBase = opts.base === undefined ? null : await checkLocalBase(m, opts.base);
    reference = await referenceUnderLock(repo, m, abs);
  } finally {
    await lock?.release();
  }
  const bitmap = m.meta.bitmap ?? 'backup';
  const tokenRecord = m.bitmapToken ? `${bitmap}#${m.bitmapToken}` : null;
  const stored = storedLocation(location);
  try {
    await build();
  } catch (e) {
    // No image appeared: its reference goes. (A file already there keeps it: it may be a live restore of
    // the same backup at the same path, whose reference this one only renewed.)
    if (!existsSync(abs)) await deleteLiveRef(repo.store, m.meta.id, abs).catch(() => undefined);
    throw e;
  }
  return {
    backup: m.meta.id,
    disk: m.disk,
    target,
    size: m.size,
    chunkSize: m.chunkSize,
    location: stored,
    bitmap,
    tokenRecord,
    reference,
    localBase: localBase && { path: localBase.name, fingerprint: fingerprintText(localBase), baseChunks: parseBaseRecord(m)!.chunks.reduce((n, r) => n + r[1], 0) },
    durationMs: Math.round(performance.now() - t0),
  };

  async function build(): Promise<void> {
    await buildNewFile(target, {}, async (temp) => {
      await KscImage.create(temp, {
        size: m.size,
        blockSize,
        diskUuid: uuidToBytes(m.disk),
        backingName: stored,
        backup: { disk: uuidToBytes(m.disk), root: m.root, chunkSize: m.chunkSize, id: m.meta.id },
        localBase: localBase ?? undefined,
      });
      // Opened without its backing: adding bitmaps reads no data.
      const img = await KscImage.open(temp, { write: true, backing: null });
      try {
        await img.addBitmap(bitmap, { enabled: true });
        if (tokenRecord) await img.updateBitmaps([tokenRecord], []);
      } finally {
        await img.close();
      }
    });
  }
}

/**
 * Under the caller's shared lock: puts the reference that keeps backup `m` from prune until `image` is
 * pulled, beside a second read of the manifest, which must still be `m` (the lock may have been taken after
 * `m` was read: a prune before it could have replaced the backup). When it is not, the reference goes again.
 */
async function referenceUnderLock(repo: Repository, m: Manifest, image: string): Promise<string> {
  const [again, reference] = await Promise.all([repo.readManifest(m.meta.id).catch((e: unknown) => e as Error), putLiveRef(repo.store, { backup: m.meta.id, disk: m.disk, image })]);
  if (again instanceof Error || !again.root.equals(m.root)) {
    await deleteLiveRef(repo.store, m.meta.id, image).catch(() => undefined);
    if (again instanceof Error) throw again;
    throw new KscError('KSC_E_CORRUPT', `backup ${m.meta.id} in ${repo.name}: its manifest changed while the live restore read it`);
  }
  return reference;
}

/**
 * §4.2 rule 9a: `file` as the local base of a live restore of `m`: the manifest must record a raw base, and
 * `file` must have its size and, computed now from its bytes, its fingerprint v1. Nothing is created.
 */
async function checkLocalBase(m: Manifest, file: string): Promise<LocalBaseRef> {
  const rec = parseBaseRecord(m);
  const abs = path.resolve(file);
  if (!rec)
    throw new KscError(
      'KSC_E_INVALID',
      `backup ${m.meta.id} records no raw base (its disk was not an overlay over a raw file, or it was made by an older kscinc): it cannot be live-restored over ${abs}; leave out the base to pull it whole`,
    );
  const dev = await RawDevice.open(abs, { write: false });
  try {
    const what = `${abs} is not the raw base backup ${m.meta.id} was made over (recorded there as ${rec.path})`;
    if (dev.size !== rec.size) throw new KscError('KSC_E_INVALID', `${what}: it is ${dev.size} bytes, the base was ${rec.size}; nothing created`);
    const fp = await fingerprintV1(dev);
    if (fp !== rec.fingerprint) throw new KscError('KSC_E_INVALID', `${what}: its fingerprint is ${fp}, the base's was ${rec.fingerprint}; nothing created`);
    return { name: abs, size: rec.size, fingerprint: fingerprintBytes(fp, rec.size)! };
  } finally {
    await dev.close();
  }
}
