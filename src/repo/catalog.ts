/**
 * The backup catalogue of a repository: which backups it holds (listBackups), which one "latest" or an id
 * names (resolveBackup, formats/repository.md §7.6), and a backup's summary for listings (summarize).
 */
import { KscError, isDamage } from '../errors.js';
import { bytesToUuid } from '../util/uuid.js';
import { isoUtc } from '../util/time.js';
import { mapLimit } from '../util/concurrency.js';
import { MANIFEST_HEADER, MANIFEST_MAGIC, manifestKey } from './constants.js';
import type { Manifest } from './manifest.js';
import type { Repository } from './repository.js';

export interface BackupSummary {
  id: string;
  disk: string;
  time: string;
  size: number;
  full: boolean;
  parent: string | null;
  tags: string[];
  bytesStored: number;
  bytesNew: number;
  source: string;
}

export function summarize(m: Manifest): BackupSummary {
  return {
    id: m.meta.id,
    disk: m.disk,
    time: isoUtc(m.timeMs),
    size: m.size,
    full: m.full,
    parent: m.meta.parent,
    tags: m.meta.tags,
    bytesStored: m.meta.stats.bytesStored,
    bytesNew: m.meta.stats.bytesNew,
    source: m.meta.source,
  };
}

/**
 * Every backup, oldest first; a damaged manifest is reported through `onDamage` (thrown when absent).
 * `pick` keeps what the caller needs of each manifest as it is read (8 at a time), so a repository of many
 * backups need not be held whole.
 */
export async function listBackups(repo: Repository, onDamage?: (id: string, e: KscError) => void): Promise<Manifest[]>;
export async function listBackups<T>(repo: Repository, onDamage: ((id: string, e: KscError) => void) | undefined, pick: (m: Manifest) => T): Promise<T[]>;
export async function listBackups<T>(repo: Repository, onDamage?: (id: string, e: KscError) => void, pick?: (m: Manifest) => T): Promise<(T | Manifest)[]> {
  const ids = await repo.listBackupIds();
  const got: ({ v: T | Manifest } | null)[] = new Array(ids.length).fill(null);
  await mapLimit(ids, 8, async (id, i) => {
    try {
      const m = await repo.readManifest(id);
      got[i] = { v: pick ? pick(m) : m };
    } catch (e) {
      if (onDamage && isDamage(e)) onDamage(id, e);
      else throw e;
    }
  });
  return got.filter((x) => x !== null).map((x) => x!.v);
}

/** Manifests read side by side while "latest" is looked for. */
const READ_AHEAD = 8;

/**
 * Resolves "latest" (of `disk` when given) or a backup id to its manifest. A damaged manifest newer than the
 * answer could be the answer: KSC_E_CORRUPT naming it, unless its header (magic and disk UUID, read without
 * the checksum) names another disk than `disk`; then it is skipped and `warn` says so (§7.6).
 */
export async function resolveBackup(repo: Repository, which: string, disk?: string, warn: (msg: string) => void = () => undefined): Promise<Manifest> {
  if (which !== 'latest') {
    const m = await repo.readManifest(which);
    if (disk && m.disk !== disk) throw new KscError('KSC_E_INVALID', `backup ${which} is of disk ${m.disk}, not ${disk}`);
    return m;
  }
  const ids = (await repo.listBackupIds()).reverse();
  let found: string | null = null;
  let foundWhole: Manifest | null = null;
  const disks = new Set<string>();
  // Read ahead, up to READ_AHEAD at a time (on S3 each is a round trip), judged one by one newest first.
  // Headers only of a large manifest (its chunk list is read below); a small one is read whole once.
  type Got = Awaited<ReturnType<Repository['readManifestInfoOrWhole']>>;
  const reads: Promise<Got>[] = [];
  const read = (i: number): Promise<Got> => {
    for (let j = reads.length; j < Math.min(ids.length, i + READ_AHEAD); j++) {
      reads.push(repo.readManifestInfoOrWhole(ids[j]!));
      reads[j]!.catch(() => undefined); // judged when its turn comes
    }
    return reads[i]!;
  };
  for (const [i, id] of ids.entries()) {
    let d: string;
    let whole: Manifest | null;
    try {
      const got = await read(i);
      d = got.info.disk;
      whole = got.whole;
    } catch (e) {
      if (!isDamage(e)) throw e;
      if (found) continue; // older than the answer: it cannot be the answer
      const claimed = await claimedDisk(repo, id);
      if (disk && claimed !== null && claimed !== disk) {
        warn(`skipped damaged manifest ${repo.objName(manifestKey(id))} (its header names disk ${claimed}): ${e.message}`);
        continue;
      }
      throw new KscError(
        'KSC_E_CORRUPT',
        `the newest backup${disk ? ` of disk ${disk}` : ''} may be ${id}, whose manifest is damaged (${e.message}); restore an older backup by its id (see "kscinc backups"), or run "kscinc verify"`,
        { cause: e },
      );
    }
    disks.add(d);
    if (!disk || d === disk) {
      if (!found) {
        found = id;
        foundWhole = whole;
      }
      if (disk) break;
    }
  }
  if (!found) throw new KscError('KSC_E_NOT_FOUND', disk ? `no backup of disk ${disk} in ${repo.name}` : `no backups in ${repo.name}`);
  if (!disk && disks.size > 1) throw new KscError('KSC_E_INVALID', `${repo.name} holds backups of ${disks.size} disks (${[...disks].join(', ')}): say which disk with option disk`);
  return foundWhole ?? repo.readManifest(found);
}

/** The disk UUID a damaged manifest's header names (magic checked, checksum not), or null. */
async function claimedDisk(repo: Repository, id: string): Promise<string | null> {
  try {
    const h = await repo.store.getRange(manifestKey(id), 0, MANIFEST_HEADER);
    return h.subarray(0, 8).equals(MANIFEST_MAGIC) ? bytesToUuid(h.subarray(16, 32)) : null;
  } catch {
    return null;
  }
}
