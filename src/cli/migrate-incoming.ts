/**
 * What `kscinc serve --incoming` prepares before serving (formats/migrate.md §5, §10): a new token, the base
 * fingerprint, the destination's persistent incoming id, and the origin of an image restored from a backup (§9.1). The id is recorded in the image (an empty,
 * disabled bitmap `kscinc-incoming#ID`), so a destination restarted part way through a migration is known
 * as the same one and the source can resume; a fresh image gets a new id. An image holding blocks above its
 * base is refused unless it carries such a record (a partial copy of a migration that may resume).
 */
import { randomBytes } from 'node:crypto';
import { KscError } from '../errors.js';
import { bitmapsOf } from '../image/capabilities.js';
import { openImage } from '../image/open.js';
import { baseFingerprint, firstAboveBase } from '../engines/migrate-base.js';
import { holdsOnlyOrigin, incomingOrigin } from '../engines/migrate-origin.js';
import { INCOMING_RECORD } from '../nbd/incoming.js';
import { closedCleanly, logPathOf, settleLog } from '../nbd/cycle-log.js';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { logSink } from './log-sink.js';

export interface IncomingPrepared {
  token: string;
  baseFingerprint: string;
  /** null: the image keeps no bitmaps (raw), so nothing can be recorded and no migration to it resumes. */
  id: string | null;
  /** A restore of a backup of the disk: its `kscinc:origin=` context (formats/migrate.md §9.1). */
  origin?: string;
  /** The image's absolute path: its replication cycle log is named after it (formats/migrate.md §11.7). */
  image?: string;
}

/** `token`: the one to use (`--token-file`), else a new random one. */
export async function prepareIncomingImage(image: string, token?: string): Promise<IncomingPrepared> {
  const clean = existsSync(logPathOf(resolve(image))) && (await closedCleanly(image));
  const dev = await openImage(image, { write: true });
  try {
    // §11.7: a cycle a replication committed is finished, one it did not is dropped, before anything is served.
    const settled = await settleLog(resolve(image), dev, clean);
    if (settled) logSink('kscinc serve').line(`kscinc serve: replication cycle log of ${image} ${settled}`);
    const bitmaps = bitmapsOf(dev);
    const records = bitmaps?.bitmapNames().filter((n) => n.startsWith(INCOMING_RECORD)) ?? [];
    const kept = records.map((n) => n.slice(INCOMING_RECORD.length)).find((id) => /^[0-9a-f]{32}$/.test(id)) ?? null;
    const origin = await incomingOrigin(dev, image, kept !== null);
    const above = await firstAboveBase(dev);
    if (above && !kept && !origin.context) {
      throw new KscError(
        'KSC_E_INVALID',
        `--incoming: ${image} holds blocks above its base (at offset ${above.offset}) and is no partial copy of a migration; a migration target must be a fresh overlay on the same base (formats/migrate.md §1 rule 5) or a restore of a backup of the disk (§9)${origin.problem ? `, but its ${origin.problem}` : ''}`,
      );
    }
    // Like an image with nothing above its base (§10.1), a restore holding exactly its backup gets a new id (§10.4):
    // its blocks are the backup's, never a part copy, even if a migration to it started before (or it was restored again).
    let id = origin.context && (await holdsOnlyOrigin(dev)) ? null : kept;
    if (bitmaps && !id) {
      id = randomBytes(16).toString('hex');
      await bitmaps.updateBitmaps([INCOMING_RECORD + id], records);
    }
    return { token: token ?? randomBytes(16).toString('hex'), baseFingerprint: await baseFingerprint(dev), id, ...(origin.context ? { origin: origin.context } : { image: resolve(image) }) };
  } finally {
    await dev.close();
  }
}

/**
 * Promotion (formats/migrate.md §11.7): before `kscinc serve` (without --incoming) serves an image that has a
 * replication cycle log, the log is settled: a committed cycle is applied, an uncommitted one dropped, so the
 * image served is the replica's last consistent point. Returns a line per image it settled.
 */
export async function settleCycleLogs(images: string[], force: boolean): Promise<string[]> {
  const out: string[] = [];
  for (const image of images) {
    const abs = resolve(image);
    if (!existsSync(logPathOf(abs))) continue;
    const clean = await closedCleanly(abs);
    const dev = await openImage(abs, { write: true, migratedAway: force });
    try {
      const done = await settleLog(abs, dev, clean);
      if (done)
        out.push(
          `kscinc serve: replication cycle log of ${image} ${done === 'applied' ? 'applied (a committed cycle finished)' : 'discarded (an uncommitted cycle: the last consistent point is served)'}`,
        );
    } finally {
      await dev.close();
    }
  }
  return out;
}
