/** Opens the images `kscinc serve` exports (in the serving process: the worker, or the only process with --no-supervisor). */
import type { TlsServerFiles } from '../nbd/tls.js';
import { KscError } from '../errors.js';
import { bitmapsOf } from '../image/capabilities.js';
import { handOverOf, openImage } from '../image/open.js';
import type { BlockDevice } from '../image/types.js';
import type { HandoverRecord } from '../image/ksc.js';
import type { NbdExport } from '../nbd/server.js';
import type { PullConfig } from './pull-control.js';
import { firstAboveBase } from '../engines/migrate-base.js';
import { holdsOnlyOrigin } from '../engines/migrate-origin.js';

/** What the serving process needs to know; plain data, sent from the supervisor to its worker. */
export interface ServeConfig {
  images: string[];
  /** Export name of each image. */
  names: string[];
  readOnly: boolean;
  /** `--force`: serve writable even an image marked migrated away (formats/ksc_inc.md §4.1). */
  force?: boolean;
  description?: string;
  bitmap?: string[];
  maxConnections?: number;
  shutdownGraceMs?: number;
  /** The background pull of live restores (absent: on, no bandwidth limit). */
  pull?: PullConfig;
  /** `--incoming` (one image): the token and base fingerprint (formats/migrate.md §5). */
  incoming?: { token: string; baseFingerprint: string; id?: string | null; peer?: string; origin?: string };
  /** TLS credentials' files (formats/nbd.md §5), loaded by whoever builds the NbdServer; absent: plain NBD. */
  tls?: TlsServerFiles;
}

export interface OpenedExports {
  devices: BlockDevice[];
  exports: Map<string, NbdExport>;
}

/**
 * Opens every image (all or none: on failure the ones opened are closed again). `handover[i]`: the record of
 * the worker that handed image i over (formats/ksc_inc.md §9 rule 11), if any.
 */
export async function openExports(c: ServeConfig, handover: (HandoverRecord | null)[] = []): Promise<OpenedExports> {
  const devices: BlockDevice[] = [];
  const exports = new Map<string, NbdExport>();
  try {
    for (let i = 0; i < c.images.length; i++) {
      // After a crash the image serves before its leak sweep has read the map (formats/ksc_inc.md §8.1).
      const dev = await openImage(c.images[i]!, { write: !c.readOnly, migratedAway: !!c.force, handover: handover[i] ?? undefined, deferSweep: true });
      devices.push(dev);
      for (const b of c.bitmap ?? []) {
        if (!bitmapsOf(dev)?.hasBitmap(b)) throw new KscError('KSC_E_NOT_FOUND', `--bitmap ${b}: image ${c.images[i]} has no bitmap named "${b}"`);
      }
      // Empty (formats/migrate.md §5, §10.4): nothing above the base, or, seeded (§9), exactly the backup it was restored from.
      const empty = c.incoming ? (c.incoming.origin ? await holdsOnlyOrigin(dev) : !(await firstAboveBase(dev))) : false;
      const incoming = c.incoming ? { ...c.incoming, completed: false, empty } : undefined;
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

/**
 * Closes each device for the next worker (a hot upgrade): a writable ksc_inc image is handed over (flushed,
 * its DIRTY header and intent bits left in place, §9 rule 11), anything else flushed and closed. Returns the
 * records, one per device (null where there is none), for openExports of the next worker.
 */
export async function handOverDevices(devices: BlockDevice[]): Promise<(HandoverRecord | null)[]> {
  const out: (HandoverRecord | null)[] = [];
  for (const d of devices) {
    const handOver = handOverOf(d);
    if (handOver) out.push(await handOver());
    else {
      await closeDevices([d]);
      out.push(null);
    }
  }
  return out;
}
