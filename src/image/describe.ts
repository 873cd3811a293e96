/**
 * Image introspection (what `kscinc info` and `kscinc create` print): format, sizes, disk UUID, clean
 * state, backing chain and bitmaps, asked of the device's capabilities (capabilities.ts). The CLI only
 * formats the result.
 */
import { bytesToUuid } from '../util/uuid.js';
import { allocationOf, bitmapsOf, chainOf, identityOf, type BitmapStatus } from './capabilities.js';
import { openImage, type ImageFormat } from './open.js';
import type { FileOpener } from '../io/file.js';
import { KscImage } from './ksc.js';
import type { LocalShare } from './live-share.js';
import { OfflineBackupBacking } from './offline-backing.js';
import { originOf } from './origin.js';

export interface ImageDescription {
  file: string;
  format: ImageFormat;
  virtualSize: number;
  blockSize: number;
  /** Bytes the top file occupies on the host (0 when the device cannot say). */
  allocatedBytes: number;
  /** null: the image keeps no disk UUID (raw). */
  diskUuid: string | null;
  /** Not closed cleanly, or open for writing elsewhere. */
  dirty: boolean;
  /** The disk was migrated to another host: this copy is stale, writers refuse it unless forced (ksc_inc.md §4.1). */
  migratedAway: boolean;
  /** The backing devices below the image, top first. */
  backingChain: { file: string; format: ImageFormat }[];
  bitmaps: BitmapStatus[];
  /** A live restore (§4.2): how much of its backup the image holds itself (absent otherwise). */
  liveRestore?: LocalShare;
  /** A live restore whose repository could not be opened: why (its share is then unknown). */
  backingError?: string;
  /** formats/ksc_inc.md §4.3: the backup a restored image is a copy of (absent when it has no record). */
  origin?: OriginInfo;
}

/** §4.3 as `info` shows it: the record's fields, or why it is not trusted. */
export type OriginInfo = { repository: string; disk: string; backup: string; root: string; token: string | null; chunkSize: number; location: string; bitmap: string } | { problem: string };

function originInfo(dev: Parameters<typeof originOf>[0]): OriginInfo | undefined {
  const o = originOf(dev);
  if (!o) return undefined;
  if ('problem' in o) return { problem: o.problem };
  const r = o.record;
  return {
    repository: r.repoId.toString('hex'),
    disk: bytesToUuid(r.disk),
    backup: r.backupId,
    root: r.root.toString('hex'),
    token: r.token?.toString('hex') ?? null,
    chunkSize: r.chunkSize,
    location: r.location,
    bitmap: o.bitmap,
  };
}

/** Opens `file` read-only (no lock taken) with its backing chain and describes it. */
export async function describeImage(file: string, opts: { opener?: FileOpener } = {}): Promise<ImageDescription> {
  const dev = await openImage(file, { opener: opts.opener, offlineBackup: true });
  try {
    const identity = identityOf(dev);
    const allocation = allocationOf(dev);
    return {
      file,
      format: dev.format,
      virtualSize: dev.size,
      blockSize: dev.blockSize,
      allocatedBytes: allocation ? await allocation.allocatedBytes() : 0,
      diskUuid: identity ? bytesToUuid(identity.diskUuid) : null,
      dirty: identity?.wasDirty ?? false,
      migratedAway: dev instanceof KscImage && dev.migratedAway,
      backingChain: [...chainOf(dev)].slice(1).map((d) => ({ file: d.name, format: d.format })),
      bitmaps: (await bitmapsOf(dev)?.listBitmaps()) ?? [],
      // live-share.js (and the repository code under it) only for a live restore: `kscinc info` of other images never loads it.
      ...(dev instanceof KscImage && dev.backupBacking ? { liveRestore: (await (await import('./live-share.js')).localShare(dev)) ?? undefined } : {}),
      ...(originOf(dev) ? { origin: originInfo(dev) } : {}),
      ...(dev instanceof KscImage && dev.backing instanceof OfflineBackupBacking ? { backingError: dev.backing.reason.message } : {}),
    };
  } finally {
    await dev.close();
  }
}
