/**
 * Handing a writable image from one process to the next (formats/ksc_inc.md §9 rule 11, §10): a hot upgrade
 * of `kscinc serve` closes the image in the old worker and opens it in the new one within the clients'
 * pause. A clean close (rule 7) would clear every intent bit and write a clean header, and the next open
 * would write a DIRTY header and pay an intent sync at the first write of every region again; a handover
 * instead flushes, leaves the DIRTY header and the intent words on disk exactly as they are, and passes a
 * small record (the header generation it leaves, and the free clusters) to the next writer. That writer
 * trusts the record only if the file still carries exactly that header generation (any other writer's open
 * bumps it); otherwise it opens the image as after a crash, which is always safe. From the first flush on
 * the way to a handover (prepareHandOver, the flush the old worker makes while still serving) no flush
 * clears an intent bit: the next writer keeps every region set that the session had set, so its first
 * writes pay no intent sync where the first writer's did not either (rule 5 makes clearing optional).
 */
import { encodeFreeList, decodeFreeList } from '../../format/freelist.js';
import type { Header } from '../../format/header.js';
import { INCOMPAT_DIRTY, KNOWN_AUTOCLEAR } from '../../format/constants.js';
import type { KscCore } from './core.js';
import { flushNow } from './flush.js';

/** What a writer that handed an image over tells the next writer (plain data: it crosses processes). */
export interface HandoverRecord {
  v: 1;
  /** The generation of the DIRTY header the handing writer left current. */
  generation: number;
  /** The image's disk UUID (hex), so a record never applies to another image put in its place. */
  diskUuid: string;
  /** Free clusters as [host offset, count] runs (what a clean close would have written as the free list). */
  free: [number, number][];
  /**
   * Clusters unlinked by the records the handover's flush rewrote in place, which it did not sync: the next
   * writer releases them only after its first completed flush (absent from records of older writers).
   */
  pending?: [number, number][];
}

/**
 * §9 rule 11, before the handover itself: flush while the image still serves, so that the handover's own
 * flush has only the changes made since to write; from here on no flush clears an intent bit (the next
 * writer keeps them). The image goes on serving as usual.
 */
export async function prepareHandOver(c: KscCore, flush: () => Promise<void>): Promise<void> {
  if (c.closed || c.readOnly || c.broken) return;
  c.keepIntent = true;
  await flush();
}

/**
 * §9 rule 11: flush (every acknowledged change durable, every bitmap bit and map entry of it too), then close
 * the file leaving the DIRTY header and the set intent bits in place. Returns the record for the next writer,
 * or null when the image was read-only or could not be flushed (then it is closed as close() would).
 */
export async function handOver(c: KscCore, close: () => Promise<void>): Promise<HandoverRecord | null> {
  if (c.closed) return null;
  if (c.readOnly || c.broken) {
    await close();
    return null;
  }
  c.closing = true;
  c.keepIntent = true;
  // A deferred leak sweep (§8.1) still running hands nothing over: its clusters stay leaked.
  c.sweepCancelled = true;
  while (c.fills.size > 0) await Promise.allSettled([...c.fills]);
  let record: HandoverRecord | null = null;
  try {
    // Under the flush mutex: no flush or bitmap management step runs past this point (none can start:
    // closing). The flush's last sync is the next writer's (rule 11): see flushNow.
    record = await c.flushMutex.run(async () => {
      if (c.broken) throw c.broken;
      const pending = await flushNow(c, true);
      return {
        v: 1 as const,
        generation: c.header.generation,
        diskUuid: c.header.diskUuid.toString('hex'),
        free: c.alloc.freeRuns().map((r) => [r.offset, r.count] as [number, number]),
        pending: toRuns(pending, c.blockSize),
      };
    });
  } finally {
    c.closed = true;
    await c.file.close();
    await c.backingDev?.close();
  }
  return record;
}

/**
 * §10: whether an image just read may be opened as the continuation of the writer that left `rec`: the
 * current header is that writer's DIRTY header (same generation, same disk), no header slot is damaged, and
 * the record's free clusters pass the checks of an on-disk free list (§8). Returns the free clusters when
 * so, null when the image must be opened as after a crash.
 */
export function trustHandover(rec: HandoverRecord | undefined, header: Header, damagedSlots: string[], fileSize: number, path: string): { free: number[]; pending: number[] } | null {
  if (!rec || rec.v !== 1 || !Array.isArray(rec.free)) return null;
  if (damagedSlots.length > 0 || (header.incompatible & INCOMPAT_DIRTY) === 0n) return null;
  // An autoclear bit this code does not know must be cleared by a header write (§4.1): open as usual.
  if ((header.autoclear & ~KNOWN_AUTOCLEAR) !== 0n) return null;
  if (header.generation !== rec.generation || header.diskUuid.toString('hex') !== rec.diskUuid) return null;
  if (rec.pending !== undefined && !Array.isArray(rec.pending)) return null;
  try {
    const check = (list: [number, number][]): number[] => {
      const runs = list.map(([offset, count]) => ({ offset, count })).sort((a, b) => a.offset - b.offset);
      return decodeFreeList(encodeFreeList(runs), runs.length, 2 ** header.blockBits, fileSize, path);
    };
    const free = check(rec.free);
    const pending = check(rec.pending ?? []);
    check([...rec.free, ...(rec.pending ?? [])]); // no cluster both free and pending
    return { free, pending };
  } catch {
    return null;
  }
}

/** Sorted cluster offsets as [offset, count] runs. */
function toRuns(offsets: number[], clusterSize: number): [number, number][] {
  const runs: [number, number][] = [];
  for (const o of [...offsets].sort((a, b) => a - b)) {
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] * clusterSize === o) last[1]++;
    else runs.push([o, 1]);
  }
  return runs;
}
