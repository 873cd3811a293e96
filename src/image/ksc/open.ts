/**
 * Opening a ksc_inc file (formats/ksc_inc.md §10): the newer valid header slot; directory, bitmap slots,
 * intent words and (on a clean image) the free list; for a writer a durable DIRTY header before anything
 * else (§9 rule 1); after a crash, recovery from the intent bits (no scan) and the leak sweep (§8.1).
 * Damage outside the data is collected, not refused (§6.4): see KscCore.openDamage.
 */
import { KscError, corrupt, isKscError } from '../../errors.js';
import type { HostFile } from '../../io/file.js';
import { AUTOCLEAR_BITMAPS, BITMAP_DIR_ENTRY_SIZE, HEADER_SIZE, HEADER_SLOTS, INCOMPAT_DIRTY, KNOWN_AUTOCLEAR } from '../../format/constants.js';
import { FREE_ENTRY_SIZE, decodeFreeList } from '../../format/freelist.js';
import { type Header, decodeHeaderSlot, validateHeader } from '../../format/header.js';
import { Allocator, alignUp } from '../allocator.js';
import { decodeBitmapSlot, guessBitmapSlot } from '../../format/bitmap-slot.js';
import { SparseBitmap } from '../sparse-bitmap.js';
import { IntentLog } from '../intent.js';
import { MapTable } from '../maptable.js';
import type { BlockDevice } from '../types.js';
import { KscCore } from './core.js';
import { sweepLeaks } from './leak-sweep.js';
import { type HandoverRecord, trustHandover } from './handover.js';

/** Reads the current header of a ksc_inc file (for probing and `info`), and which slots are damaged. */
export async function readHeader(file: HostFile): Promise<{ header: Header; slot: number; damagedSlots: string[] }> {
  const size = await file.size();
  const damaged: string[] = [];
  let best: { header: Header; slot: number } | null = null;
  let anyMagic = false;
  for (let s = 0; s < 2; s++) {
    const buf = Buffer.alloc(HEADER_SIZE);
    const n = await file.read(buf, HEADER_SLOTS[s]!);
    const r = decodeHeaderSlot(buf.subarray(0, n));
    if (r.ok) {
      anyMagic = true;
      if (!best || r.header.generation > best.header.generation) best = { header: r.header, slot: s };
    } else {
      anyMagic ||= r.hasMagic;
      if (!(s === 1 && n === HEADER_SIZE && buf.every((x) => x === 0))) damaged.push(`header slot ${'AB'[s]}: ${r.reason}`);
    }
  }
  if (!best) {
    if (!anyMagic) throw new KscError('KSC_E_FORMAT', `${file.path}: not a ksc_inc image (bad magic)`);
    throw corrupt(file.path, 'header', `has no valid copy (${damaged.join('; ')})`);
  }
  validateHeader(best.header, file.path, size);
  return { ...best, damagedSlots: damaged };
}

/**
 * Opens the image in `file` (locked by the caller when `write`); the caller closes `file` on failure. With
 * `handover` (a writer's record, §9 rule 11) that still matches the file, a writer continues that writer's
 * session: no header write, no recovery, no sweep, its free list and its intent bits kept (§10). With
 * `deferSweep` the leak sweep of a crashed image runs in the background after the open (leak-sweep.ts).
 */
export async function openCore(file: HostFile, write: boolean, backing: BlockDevice | null, handover?: HandoverRecord, deferSweep = false): Promise<KscCore> {
  const { header, slot, damagedSlots } = await readHeader(file);
  // §10 step 1: a damaged header slot may have been the newer one (its generation is unreadable), e.g. a
  // DIRTY header torn or damaged after a crash: the image counts as not closed cleanly.
  const dirty = (header.incompatible & INCOMPAT_DIRTY) !== 0n || damagedSlots.length > 0;
  const damage: string[] = [];
  const fileSize = await file.size();
  const handedFree = write ? trustHandover(handover, header, damagedSlots, fileSize, file.path) : null;
  const alloc = new Allocator(alignUp(fileSize, 4096), 2 ** header.blockBits);
  const dir = Buffer.alloc(header.directoryEntries * 16);
  if ((await file.read(dir, header.directoryOffset)) < dir.length) throw corrupt(file.path, 'directory', 'is truncated');
  const blocks = Math.ceil(header.virtualSize / 2 ** header.blockBits);
  const map = new MapTable(file, dir, header.directoryOffset, 2 ** header.blockBits, blocks, () => alloc.fileEnd);
  const bitmaps = await readBitmapSlots(file, header, fileSize, alloc);

  const intentRaw = Buffer.alloc(header.intentWords * 16);
  if ((await file.read(intentRaw, header.intentOffset)) < intentRaw.length) throw corrupt(file.path, 'intent words', 'are truncated');
  const regions = Math.ceil(header.virtualSize / 2 ** header.intentBits);
  // §7: damaged intent words count as wholly set after a crash, as clear on a clean image.
  const decoded = IntentLog.decode(file.path, header.intentOffset, intentRaw, regions, dirty);
  damage.push(...decoded.damaged);
  const setRegions = decoded.set;
  const intent = new IntentLog(file, header.intentOffset, intentRaw, header.intentBits, regions);
  intent.adoptSet(setRegions);

  const consistent = (header.autoclear & AUTOCLEAR_BITMAPS) !== 0n || bitmaps.every((b) => b === null);
  if (!dirty && header.freeListOffset !== 0 && header.freeListEntries > 0) {
    try {
      alloc.addFree(await readFreeList(file, header, fileSize));
    } catch (e) {
      // §8: a damaged free list is ignored; the clusters it listed are leaked (check --repair reclaims them).
      if (!isKscError(e, 'KSC_E_CORRUPT')) throw e;
      damage.push(e.message);
    }
  }
  const c = new KscCore(file, header, slot, !write, map, alloc, intent, bitmaps, consistent, backing);
  c.openDamage = damage;
  if (handedFree) {
    // §10 step 0: the header on disk is the handing writer's DIRTY header, durable (rule 1 holds); its last
    // flush made every bitmap bit and checksum durable, so the set intent bits need no recovery.
    alloc.addFree(handedFree.free);
    // Unlinked by records the handing writer wrote and did not sync: released after this writer's first flush.
    for (const o of handedFree.pending) alloc.freeAfterFlush(o, 0);
    await intent.rewriteWords(decoded.damagedWords);
    return c;
  }
  c.openedDirty = dirty;
  if (write) {
    // §9 rule 1: DIRTY durable before any change; unknown autoclear bits dropped (§4.1). The header goes
    // into the other slot, which rewrites a damaged one.
    await c.writeHeader({ ...header, incompatible: header.incompatible | INCOMPAT_DIRTY, autoclear: header.autoclear & KNOWN_AUTOCLEAR });
    await intent.rewriteWords(decoded.damagedWords);
  }
  if (dirty && setRegions.length > 0) await recover(c, setRegions);
  if (write && dirty) await sweepLeaks(c, deferSweep);
  return c;
}

/** The bitmap directory: a bitmap or null per slot; a damaged slot becomes a wholly-dirty bitmap (§6.4). */
async function readBitmapSlots(file: HostFile, header: Header, fileSize: number, alloc: Allocator): Promise<(SparseBitmap | null)[]> {
  const slotsBuf = Buffer.alloc(header.bitmapSlots * BITMAP_DIR_ENTRY_SIZE);
  if ((await file.read(slotsBuf, header.bitmapDirOffset)) < slotsBuf.length) throw corrupt(file.path, 'bitmap directory', 'is truncated');
  const bitmaps: (SparseBitmap | null)[] = [];
  for (let s = 0; s < header.bitmapSlots; s++) {
    const rec = slotsBuf.subarray(s * BITMAP_DIR_ENTRY_SIZE, (s + 1) * BITMAP_DIR_ENTRY_SIZE);
    try {
      const d = decodeBitmapSlot(rec, s, file.path, header.virtualSize, fileSize);
      bitmaps.push(d ? new SparseBitmap(file, s, d.name, d.granularityBits, d.enabled, d.tableOffset, d.tableEntries, header.virtualSize, () => alloc.fileEnd) : null);
    } catch (e) {
      // §6.4: a damaged slot is a bitmap whose bits are all unknown (listed inconsistent), not a refusal.
      if (!isKscError(e, 'KSC_E_CORRUPT')) throw e;
      bitmaps.push(SparseBitmap.damagedSlot(file, s, guessBitmapSlot(rec, s, header.blockBits), header.virtualSize, e.message));
    }
  }
  for (const b of bitmaps) {
    if (b?.slotDamaged && bitmaps.some((o) => o !== b && o?.name === b.name)) b.name = `damaged-slot-${b.slot}`;
  }
  return bitmaps;
}

async function readFreeList(file: HostFile, header: Header, fileSize: number): Promise<number[]> {
  const buf = Buffer.alloc(header.freeListEntries * FREE_ENTRY_SIZE);
  const n = await file.read(buf, header.freeListOffset);
  return decodeFreeList(buf.subarray(0, n), header.freeListEntries, 2 ** header.blockBits, fileSize, file.path);
}

/**
 * §10 step 3: after a crash, every region with its intent bit set may hold changes that the bitmaps and
 * checksums do not record. OR them into every enabled bitmap and distrust the checksums there. In memory
 * only: a writer persists it with its next flush; the intent bits stay until then.
 */
async function recover(c: KscCore, regions: number[]): Promise<void> {
  const regionSize = 2 ** c.header.intentBits;
  for (const r of regions) {
    const off = r * regionSize;
    const len = Math.min(regionSize, c.size - off);
    for (const b of c.enabledBitmaps()) {
      await b.prepare(off, len);
      b.mark(off, len);
    }
    const b0 = Math.floor(off / c.blockSize);
    const b1 = Math.floor((off + len - 1) / c.blockSize);
    const p0 = Math.floor(b0 / 4096);
    for (let p = p0; p <= Math.floor(b1 / 4096); p++) {
      if (c.map.pageAbsent(p)) continue;
      await c.map.ensure(p * 4096, p * 4096);
      const page = c.map.page(p)!;
      for (let b = Math.max(b0, p * 4096); b <= Math.min(b1, p * 4096 + 4095); b++) {
        const i = b - p * 4096;
        if (page.csumValid[i]) c.map.set(b, page.state[i]!, page.host[i]!, 0, false);
      }
    }
  }
}
