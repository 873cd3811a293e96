/**
 * The restore's last step on a ksc_inc target (formats/ksc_inc.md §4.3 rule 1): once every byte of the
 * backup is durable in the image, record which backup of which disk in which repository it is, so a
 * migration to it sends only what changed since (formats/migrate.md §9).
 */
import { recordOrigin } from '../image/origin.js';
import type { BlockDevice } from '../image/types.js';
import type { Manifest } from '../repo/manifest.js';
import type { Repository } from '../repo/repository.js';
import { uuidToBytes } from '../util/uuid.js';

/** Records backup `m` of `repo` (found at `location`) in the flushed target; the origin bitmap's name, or null for a raw target. */
export async function recordRestoreOrigin(dev: BlockDevice, repo: Repository, m: Manifest, location: string): Promise<string | null> {
  return recordOrigin(dev, {
    repoId: Buffer.from(repo.config.id, 'hex'),
    disk: uuidToBytes(m.disk),
    root: m.root,
    token: m.bitmapToken ? Buffer.from(m.bitmapToken, 'hex') : null,
    chunkSize: m.chunkSize,
    backupId: m.meta.id,
    location: Buffer.byteLength(location) <= 512 ? location : '',
  });
}
