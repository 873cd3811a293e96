/**
 * Parent search (formats/repository.md §10): the backup the bitmap's token names is the reference point of
 * an incremental. Its chunk list is the start of the new one, so it must be there, match this disk, and
 * refer only to chunks the repository still holds; otherwise the backup is full and says why.
 */
import { isKscError } from '../../errors.js';
import type { Manifest } from '../../repo/manifest.js';
import type { Repository } from '../../repo/repository.js';
import type { Dedupe } from './dedupe.js';

/** What a parent must match: the disk, the bitmap's token (and the bitmap's name, for messages), the size. */
export interface ParentKey {
  disk: string;
  token: string | null;
  bitmap: string | null;
  size: number;
}

export interface ParentChoice {
  parent: Manifest | null;
  /** Why there is none, when one was looked for. */
  why: string | null;
}

/** An unreadable manifest is passed over, but a sealed one under a stripped config (KSC_E_AUTH, §13.1 rule 2) refuses. */
function unreadable(e: unknown): null {
  if (isKscError(e, 'KSC_E_AUTH')) throw e;
  return null;
}

/**
 * The newest readable backup of `backupIds` whose header matches `key`. A small manifest is read whole to
 * check its header, and that read is the parent when it matches (one read of it, not two: a fixed cost of
 * every incremental, a round trip on S3); a large one is read as far as its metadata first.
 */
async function newestMatching(repo: Repository, backupIds: string[], key: ParentKey): Promise<Manifest | null> {
  for (const bid of [...backupIds].reverse()) {
    const got = await repo.readManifestInfoOrWhole(bid).catch(unreadable); // the header says whether it is the one
    const h = got?.info;
    if (!h || h.disk !== key.disk || h.bitmapToken !== key.token || h.size !== key.size) continue;
    const parent = got!.whole ?? (await repo.readManifest(bid).catch(unreadable));
    if (parent) return parent;
  }
  return null;
}

/** Why `dedupe` cannot vouch for every chunk `parent` refers to, or null when it can. */
function unvouched(parent: Manifest, dedupe: Dedupe): string | null {
  // Exact with the index in memory; through the filter, a missing chunk passes 1 time in 100 (it was
  // missing for the parent already: `verify` names it for both).
  // A call per segment of the list, not per chunk (issue 19: a cold process looks up every id here).
  if (!parent.ids.everySegment((ids, words) => dedupe.mayHoldAll(ids, words))) return `backup ${parent.meta.id} refers to chunks the repository no longer holds`;
  if (dedupe.damagedIndex !== null) {
    // The filter took ids from that object before its checksum failed: it cannot vouch for the parent.
    return `index object ${dedupe.damagedIndex} is damaged, so backup ${parent.meta.id}'s chunks cannot be checked through the filter (verify names the damage; prune repairs the index)`;
  }
  return null;
}

/**
 * The search for the parent among the backups `backupIds` names, which needs nothing of the index: it runs
 * while the index is read (one round trip to the repository less before the backup can start reading).
 * `vouch` then judges the candidate against the dedupe (with the orphans adopted).
 */
export function searchParent(repo: Repository, backupIds: Promise<string[]>, key: ParentKey): { vouch(dedupe: Dedupe): Promise<ParentChoice> } {
  const found = backupIds.then((ids) => newestMatching(repo, ids, key));
  found.catch(() => undefined); // judged by vouch
  return {
    async vouch(dedupe) {
      const parent = await found;
      if (!parent) return { parent: null, why: `no backup in ${repo.name} matches bitmap "${key.bitmap}"'s state (backed up elsewhere, or the backup was pruned)` };
      const why = unvouched(parent, dedupe);
      return why ? { parent: null, why } : { parent, why: null };
    },
  };
}
