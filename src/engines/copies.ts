/**
 * Which copy of a chunk prune keeps (formats/repository.md §6.1). A chunk stored twice (two backups that
 * ran side by side, a resumed backup, an interrupted prune) has several locations in the index; keeping
 * one at random kept the damaged one about half the time and deleted the intact pack. So every copy of a
 * chunk that has several is read and checked (magic, lengths, decompression, id), the first that passes is
 * kept, and when none passes, or one cannot be read for another reason (the store failed), every copy is
 * kept: prune never decides on what it could not check.
 */
import { isDamage } from '../errors.js';
import { type ChunkIndex, type Repository, packKey } from '../repo/repository.js';
import { mapLimit } from '../util/concurrency.js';
import { fetchChunks, readsOf } from '../repo/fetch.js';
import { turnDue } from './paced.js';

export interface CopyReport {
  /** Chunks in use that have more than one copy. */
  chunksWithCopies: number;
  /** Copies read and checked. */
  copiesChecked: number;
  /** Copies that failed their check: chunk id, the pack object, what was wrong. */
  copiesDamaged: { chunk: string; object: string; problem: string }[];
  /** Chunks none of whose copies passed: all are kept, and the backups needing them are damaged. */
  chunksWithoutGoodCopy: string[];
  /** Chunks whose copies could not all be checked (the store failed): all are kept. */
  chunksUndecided: string[];
}

/**
 * For every slot marked in `live` whose chunk has several copies in `index`, the copy handles to keep.
 * Slots not in the map keep their single location.
 */
export async function chooseCopies(repo: Repository, index: ChunkIndex, live: Uint8Array): Promise<{ keep: Map<number, number[]>; report: CopyReport }> {
  const keep = new Map<number, number[]>();
  const report: CopyReport = { chunksWithCopies: 0, copiesChecked: 0, copiesDamaged: [], chunksWithoutGoodCopy: [], chunksUndecided: [] };
  if (index.extraCopies === 0) return { keep, report };
  const multi: number[] = [];
  for (let s = 0; s < live.length; s++) {
    const t = turnDue(s); // a loop over the whole index: turns of the event loop (engines/paced.ts)
    if (t) await t;
    if (live[s] === 1 && index.copyCount(s) > 1) multi.push(s);
  }
  report.chunksWithCopies = multi.length;
  await mapLimit(multi, 4, async (s) => {
    const hs = index.copies(s);
    const chunk = index.idAt(s).toString('hex');
    for (const h of hs) {
      report.copiesChecked++;
      try {
        await fetchChunks(repo, readsOf([h], index), 1, repo.chunkSize, 'prune', async () => undefined);
        keep.set(s, [h]);
        return;
      } catch (e) {
        if (!isDamage(e)) {
          report.chunksUndecided.push(chunk);
          keep.set(s, hs);
          return;
        }
        report.copiesDamaged.push({ chunk, object: repo.objName(packKey(index.packName(h))), problem: (e as Error).message });
      }
    }
    report.chunksWithoutGoodCopy.push(chunk);
    keep.set(s, hs);
  });
  report.copiesDamaged.sort((a, b) => (a.chunk < b.chunk ? -1 : a.chunk > b.chunk ? 1 : 0));
  report.chunksWithoutGoodCopy.sort();
  report.chunksUndecided.sort();
  return { keep, report };
}
