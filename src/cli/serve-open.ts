/** Opens the images `kscinc serve` exports (in the serving process: the worker, or the only process with --no-supervisor). */
import { KscError } from '../errors.js';
import { bitmapsOf } from '../image/capabilities.js';
import { openImage } from '../image/open.js';
import type { BlockDevice } from '../image/types.js';
import type { NbdExport } from '../nbd/server.js';

/** What the serving process needs to know; plain data, sent from the supervisor to its worker. */
export interface ServeConfig {
  images: string[];
  /** Export name of each image. */
  names: string[];
  readOnly: boolean;
  description?: string;
  bitmap?: string[];
  maxConnections?: number;
  shutdownGraceMs?: number;
  /** `--incoming` (one image): the token and base fingerprint (formats/migrate.md §5). */
  incoming?: { token: string; baseFingerprint: string };
}

export interface OpenedExports {
  devices: BlockDevice[];
  exports: Map<string, NbdExport>;
}

/** Opens every image (all or none: on failure the ones opened are closed again). */
export async function openExports(c: ServeConfig): Promise<OpenedExports> {
  const devices: BlockDevice[] = [];
  const exports = new Map<string, NbdExport>();
  try {
    for (let i = 0; i < c.images.length; i++) {
      const dev = await openImage(c.images[i]!, { write: !c.readOnly });
      devices.push(dev);
      for (const b of c.bitmap ?? []) {
        if (!bitmapsOf(dev)?.hasBitmap(b)) throw new KscError('KSC_E_NOT_FOUND', `--bitmap ${b}: image ${c.images[i]} has no bitmap named "${b}"`);
      }
      const incoming = c.incoming ? { ...c.incoming, completed: false } : undefined;
      exports.set(c.names[i]!, { device: dev, readOnly: c.readOnly, description: c.description, bitmaps: c.bitmap, incoming });
    }
  } catch (e) {
    await closeDevices(devices);
    throw e;
  }
  return { devices, exports };
}

/** Flushes (when writable) and closes each device. */
export async function closeDevices(devices: BlockDevice[]): Promise<void> {
  for (const d of devices) {
    try {
      if (!d.readOnly) await d.flush();
    } finally {
      await d.close();
    }
  }
}
