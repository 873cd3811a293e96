/**
 * `kscinc serve --from-backup REPO ID|latest --overlay FILE`: a live restore and its server in one step
 * (issue 18). The overlay is made (src/engines/live-restore.ts) when it does not exist; when it does —
 * the same command run again after the host or the server restarted — it is served as it is, provided it
 * is that live restore (or one already pulled, which no longer names a backup, or with --backing one pulled onto
 * that raw base): it holds the guest's writes.
 */
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { KscError } from '../errors.js';
import { closePool } from '../compress/pool.js';
import { liveRestore, storedLocation } from '../engines/live-restore.js';
import { KscImage } from '../image/ksc.js';
import { probeFormat } from '../image/open.js';
import { openStore } from '../objstore/open.js';
import { Repository } from '../repo/repository.js';
import { withOpenRepo } from '../repo/open-close.js';

/** Makes the overlay when it does not exist yet; returns what was done, for the log. */
export async function prepareFromBackup(from: string[], overlay: string | undefined, disk: string | undefined, base?: string): Promise<string> {
  if (from.length !== 2) throw new KscError('KSC_E_INVALID', `--from-backup takes two values, the repository and a backup id or "latest" (got ${from.length})`);
  if (!overlay) throw new KscError('KSC_E_INVALID', '--from-backup needs --overlay FILE: the local image the VM runs from (made when it does not exist)');
  const [location, which] = from as [string, string];
  if (existsSync(overlay)) return checkOverlay(overlay, location, which, base);
  const store = await openStore(location);
  try {
    const r = await withOpenRepo(
      store,
      (st) => Repository.open(st),
      (repo) => liveRestore(repo, location, which, overlay, { disk, base }),
    );
    return `live-restored backup ${r.backup} of disk ${r.disk} to ${overlay} in ${r.durationMs} ms`;
  } finally {
    await closePool();
  }
}

/** An existing overlay: a live restore of `which` in `location`, or a plain ksc_inc image (pulled). */
async function checkOverlay(overlay: string, location: string, which: string, base: string | undefined): Promise<string> {
  if ((await probeFormat(overlay)) !== 'ksc_inc') throw new KscError('KSC_E_EXISTS', `--overlay ${overlay} exists and is not a ksc_inc image: not serving it in place of the backup`);
  const img = await KscImage.open(overlay, { write: false, backing: null });
  try {
    const b = img.backupBacking;
    if (!b) {
      // Pulled onto its local raw base (formats/ksc_inc.md §4.2 rule 9): an overlay over the base named.
      if (base !== undefined && img.backingName === path.resolve(base)) return `${overlay} exists, pulled onto its base ${img.backingName}: serving it`;
      if (img.backingName !== null) throw new KscError('KSC_E_EXISTS', `--overlay ${overlay} exists with backing ${img.backingName}, not a backup: not serving it in place of the backup`);
      return `${overlay} exists and no longer needs the repository (pulled): serving it`;
    }
    const want = storedLocation(location);
    if (b.location !== want || (which !== 'latest' && b.id !== which)) {
      throw new KscError('KSC_E_EXISTS', `--overlay ${overlay} exists as a live restore of backup ${b.id} in ${b.location}, not of ${which} in ${want}: not serving it in place of that backup`);
    }
    return `${overlay} exists (a live restore of backup ${b.id}): serving it and pulling the rest`;
  } finally {
    await img.close();
  }
}
