/**
 * The garbage-collection mark (formats/repository.md §9.2): `gc/mark`, a JSON object naming the packs the
 * last prune found holding chunks no manifest referenced, each with the storage time since when. A prune
 * deletes (or repacks) such a pack only once it has stayed unreferenced for a grace period by that record,
 * so a pack a writer uploaded but has not committed yet survives at least one grace period whatever the
 * locks said. Times are the storage's: a pack first marked by a mark has the time 0 there, read as that
 * mark object's own modification time (written after the scan that found it).
 */
import { KscError, isKscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';

export const MARK_KEY = 'gc/mark';
const PACK_ID_RE = /^[0-9a-f]{32}$/;

export interface GcMark {
  /** Pack id → storage time since which it has been unreferenced. */
  packs: Map<string, number>;
  /** The mark object was there but unreadable (then it counts as empty: nothing is old enough by it). */
  damaged: string | null;
}

export async function readMark(store: ObjectStore): Promise<GcMark> {
  const st = await store.stat(MARK_KEY);
  const packs = new Map<string, number>();
  if (!st) return { packs, damaged: null };
  try {
    const v = JSON.parse((await store.get(MARK_KEY)).toString('utf8')) as { version?: unknown; packs?: unknown };
    if (v.version !== 1 || typeof v.packs !== 'object' || v.packs === null || Array.isArray(v.packs)) throw new Error('not a version 1 mark');
    for (const [p, t] of Object.entries(v.packs as Record<string, unknown>)) {
      if (!PACK_ID_RE.test(p) || typeof t !== 'number' || !Number.isSafeInteger(t) || t < 0) throw new Error(`bad entry ${JSON.stringify(p)}`);
      packs.set(p, t === 0 ? st.mtimeMs : Math.min(t, st.mtimeMs));
    }
    return { packs, damaged: null };
  } catch (e) {
    if (isKscError(e, 'KSC_E_NOT_FOUND')) return { packs, damaged: null };
    if (isKscError(e) && !['KSC_E_CORRUPT', 'KSC_E_FORMAT', 'KSC_E_IO'].includes(e.code)) throw e;
    packs.clear();
    return { packs, damaged: `${store.name}/${MARK_KEY}: ${(e as Error).message}` };
  }
}

/** Writes the mark: `packs` maps a pack to the time it was first marked, or 0 for "this mark". */
export async function writeMark(store: ObjectStore, packs: Map<string, number>): Promise<void> {
  const body = { version: 1, packs: Object.fromEntries([...packs].sort((a, b) => (a[0] < b[0] ? -1 : 1))) };
  try {
    await store.put(MARK_KEY, Buffer.from(JSON.stringify(body)));
  } catch (e) {
    throw isKscError(e) ? e : new KscError('KSC_E_IO', `${store.name}/${MARK_KEY}: ${(e as Error).message}`, { cause: e });
  }
}
