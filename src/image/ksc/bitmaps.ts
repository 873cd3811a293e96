/**
 * Dirty-bitmap management of a ksc_inc image (formats/ksc_inc.md §6, §9 rule 6): add, remove, enable,
 * clear, merge, the backup handover (freeze), and the damage report and repair of §6.4.
 *
 * Every management change runs as one step after a full flush, under the flush mutex (manage()). A slot
 * changes by writing a complete new table (and pages) first, synced and not yet referenced, then the
 * directory slot (one atomic sector), then punching what the old table referenced. Slots are handed out
 * by one allocator, claimSlot(). Marks made by changes while a table is replaced are recorded and replayed
 * into the new table, so no change is ever lost from an enabled bitmap.
 */
import { KscError } from '../../errors.js';
import { BITMAP_DIR_ENTRY_SIZE, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS, tagBitmapTable } from '../../format/constants.js';
import { seal } from '../../format/seal.js';
import { isPowerOfTwo, log2 } from '../../util/size.js';
import { assertBitmapName, encodeBitmapSlot } from '../../format/bitmap-slot.js';
import { type BitmapInfo, SparseBitmap, bitmapsGeneration } from '../sparse-bitmap.js';
import { assertRange } from '../types.js';
import type { KscCore } from './core.js';
import { flushNow } from './flush.js';

export interface BitmapStatus extends BitmapInfo {
  dirtyBytes: number;
  /**
   * false when a writer that does not maintain bitmaps touched the image (autoclear bit cleared), or the
   * bitmap's directory slot is damaged (§6.4): every bit counts as set and backups through it are full.
   */
  consistent: boolean;
  /** Damage found in this bitmap's metadata (§6.4), or null. Damaged pages read as wholly dirty. */
  damage: string | null;
}

type Ranges = { offset: number; length: number }[];

// ---------------------------------------------------------------- lookup and the slot allocator

export function findBitmap(c: KscCore, name: string): SparseBitmap {
  const b = c.bitmapSlots.find((x) => x?.name === name);
  if (!b) throw new KscError('KSC_E_NOT_FOUND', `image ${c.name}: no bitmap named "${name}"`);
  return b;
}

export function hasBitmap(c: KscCore, name: string): boolean {
  return c.bitmapSlots.some((x) => x?.name === name);
}

/** The one slot allocator: a free slot for a new bitmap `name` (KSC_E_EXISTS if taken, KSC_E_RANGE if full). */
function claimSlot(c: KscCore, name: string): number {
  if (hasBitmap(c, name)) throw new KscError('KSC_E_EXISTS', `image ${c.name}: bitmap "${name}" already exists`);
  const slot = c.bitmapSlots.indexOf(null);
  if (slot < 0) throw new KscError('KSC_E_RANGE', `image ${c.name}: all ${c.bitmapSlots.length} bitmap slots are in use`);
  return slot;
}

/** Creates an empty bitmap in a newly claimed slot: table durable, then the slot, then it is in use. */
async function createEmpty(c: KscCore, name: string, granularityBits: number, enabled: boolean): Promise<void> {
  const slot = claimSlot(c, name);
  const fresh = await writeFreshTable(c, slot, SparseBitmap.tableEntriesFor(c.size, granularityBits), new Map());
  await installEmpty(c, slot, name, granularityBits, enabled, fresh);
}

/** Points `slot` at the durable, empty table `fresh` (the slot synced), then the bitmap is in use. */
async function installEmpty(c: KscCore, slot: number, name: string, granularityBits: number, enabled: boolean, fresh: { offset: number; table: Buffer }): Promise<void> {
  const entries = SparseBitmap.tableEntriesFor(c.size, granularityBits);
  const b = new SparseBitmap(c.file, slot, name, granularityBits, enabled, fresh.offset, entries, c.size, () => c.alloc.fileEnd);
  b.adoptTable(fresh.offset, fresh.table, new Map(), new Map());
  await writeSlot(c, slot, b);
  setSlot(c, slot, b);
}

/** Every change of c.bitmapSlots goes through here: it moves bitmapsGeneration (writers' cached lists). */
function setSlot(c: KscCore, slot: number, b: SparseBitmap | null): void {
  c.bitmapSlots[slot] = b;
  bitmapsGeneration.n++;
}

/** Empties `b`'s slot (durable); its table and pages are punched unless `keepSpace` (then they leak). */
async function dropSlot(c: KscCore, b: SparseBitmap, keepSpace = false): Promise<void> {
  await dropSlots(c, [b], keepSpace);
}

/**
 * Empties the slots of `gone` under one sync (each slot record is atomic on its own: a cut before the sync
 * leaves any subset of them emptied), then punches their tables and pages unless `keepSpace`.
 */
async function dropSlots(c: KscCore, bitmaps: SparseBitmap[], keepSpace = false): Promise<void> {
  const gone = [...new Set(bitmaps)]; // a name given twice is dropped (and its space released) once
  if (gone.length === 0) return;
  const ranges = [];
  if (!keepSpace) for (const b of gone) ranges.push(...(await b.hostRanges()));
  for (const b of gone) await c.file.write(slotRecord(c, b.slot, null), slotAt(c, b.slot));
  await c.file.sync();
  for (const b of gone) setSlot(c, b.slot, null);
  await c.punchRanges(ranges);
}

// ---------------------------------------------------------------- queries

function bitmapConsistent(c: KscCore, b: SparseBitmap): boolean {
  return c.bitmapsConsistent && !b.slotDamaged;
}

/** Bitmaps with their dirty byte counts (loads their pages). */
export async function listBitmaps(c: KscCore): Promise<BitmapStatus[]> {
  c.live();
  const out: BitmapStatus[] = [];
  for (const b of c.bitmapSlots) {
    if (!b) continue;
    const ext = c.bitmapsConsistent ? await b.dirtyExtents(0, c.size, c.size) : [{ offset: 0, length: c.size }];
    out.push({ name: b.name, granularity: b.granularity, enabled: b.enabled, dirtyBytes: ext.reduce((s, e) => s + e.length, 0), consistent: bitmapConsistent(c, b), damage: b.damage });
  }
  return out;
}

/** A bitmap's settings without loading its pages; null when absent. */
export function bitmapInfo(c: KscCore, name: string): { name: string; granularity: number; enabled: boolean; consistent: boolean; damage: string | null } | null {
  const b = c.bitmapSlots.find((x) => x?.name === name);
  return b ? { name: b.name, granularity: b.granularity, enabled: b.enabled, consistent: bitmapConsistent(c, b), damage: b.damage } : null;
}

/** Dirty extents of bitmap `name` within [offset, offset+length), merged. */
export async function bitmapExtents(c: KscCore, name: string, offset: number, length: number): Promise<Ranges> {
  c.live();
  assertRange(c, offset, length);
  if (!c.bitmapsConsistent) return length > 0 ? [{ offset, length }] : [];
  return findBitmap(c, name).dirtyExtents(offset, length, c.size);
}

// ---------------------------------------------------------------- the management step and its writes

/**
 * Runs a bitmap management change: after a full flush, serialized with flushes (§9 rule 6). One flush, under
 * the mutex the change then holds: a flush before taking the mutex as well (as until session 16) made
 * nothing durable that this one does not (it starts later and covers every change completed by then), and
 * cost a sync more per step (two per backup: the freeze and the commit's token update).
 */
export function manage<T>(c: KscCore, fn: () => Promise<T>): Promise<T> {
  return manageAfter(
    c,
    async () => undefined,
    () => fn(),
  );
}

/**
 * manage() with writes no durable structure references yet (fresh tables, their slots still elsewhere)
 * made first: `prepare` runs under the mutex before the flush, whose sync then makes them durable with
 * everything else (one sync less per table set); `fn` changes slots after that full flush, as in manage().
 */
function manageAfter<P, T>(c: KscCore, prepare: () => Promise<P>, fn: (p: P) => Promise<T>): Promise<T> {
  c.writable();
  return c.flushMutex.run(async () => {
    const p = await prepare();
    await flushNow(c);
    return fn(p);
  });
}

function slotRecord(c: KscCore, slot: number, b: SparseBitmap | null): Buffer {
  return encodeBitmapSlot(slot, b && { name: b.name, granularityBits: b.granularityBits, enabled: b.enabled, tableEntries: b.tableEntries, tableOffset: b.tableOffset });
}

function slotAt(c: KscCore, slot: number): number {
  return c.header.bitmapDirOffset + slot * BITMAP_DIR_ENTRY_SIZE;
}

async function writeSlot(c: KscCore, slot: number, b: SparseBitmap | null): Promise<void> {
  await c.file.write(slotRecord(c, slot, b), slotAt(c, slot));
  await c.file.sync();
}

/**
 * Writes a complete new table (and pages for `pages`) for a bitmap, not yet referenced; synced unless
 * `sync` is false (then the caller syncs before any slot references it).
 */
async function writeFreshTable(
  c: KscCore,
  slot: number,
  tableEntries: number,
  pages: Map<number, Uint32Array>,
  sync = true,
): Promise<{ offset: number; table: Buffer; pageOffsets: Map<number, number> }> {
  const table = SparseBitmap.emptyTable(slot, tableEntries);
  const offset = c.alloc.allocMeta(table.length);
  const pageOffsets = new Map<number, number>();
  const tmp = new SparseBitmap(c.file, slot, '', MIN_GRANULARITY_BITS, false, offset, tableEntries, 1);
  for (const [p, bits] of pages) {
    if (bits.every((w) => w === 0)) continue;
    const at = c.alloc.allocMeta(4096);
    pageOffsets.set(p, at);
    await c.file.write(tmp.encodePage(p, { hostOffset: at, bits, dirty: false }), at);
    const rec = table.subarray(p * 16, p * 16 + 16);
    rec.fill(0);
    rec.writeBigUInt64LE(BigInt(at), 0);
    seal(rec, tagBitmapTable(slot), p);
  }
  await c.file.write(table, offset);
  if (sync) await c.file.sync();
  return { offset, table, pageOffsets };
}

/** `d`'s bits (all pages loaded) with `extents` marked as well, as a new page map. Synchronous. */
function withExtents(c: KscCore, d: SparseBitmap, extents: Ranges): Map<number, Uint32Array> {
  const copy = new SparseBitmap(c.file, d.slot, d.name, d.granularityBits, true, 0, d.tableEntries, c.size);
  for (const [p, bits] of d.copyBits()) copy.pages.set(p, { hostOffset: 0, bits, dirty: false });
  for (const e of extents) copy.mark(e.offset, e.length);
  return new Map([...copy.pages].map(([p, page]) => [p, page.bits]));
}

/**
 * Gives bitmap `name` a new table holding `build()`'s bits, atomically with respect to changes (§9 rule 6):
 * `build` runs in the same synchronous step that starts recording the bitmap's marks, and the marks made
 * until the new table is adopted are replayed into it. `load` runs first (inside the management step).
 */
async function replaceBits(c: KscCore, name: string, load: () => Promise<void>, build: (b: SparseBitmap) => Map<number, Uint32Array>): Promise<void> {
  await manage(c, async () => {
    const b = findBitmap(c, name);
    const old = await b.hostRanges();
    await load();
    b.startRecording();
    try {
      const pages = build(b);
      const fresh = await writeFreshTable(c, b.slot, b.tableEntries, pages);
      const next = new SparseBitmap(c.file, b.slot, b.name, b.granularityBits, b.enabled, fresh.offset, b.tableEntries, c.size);
      await writeSlot(c, b.slot, next);
      b.adoptTable(fresh.offset, fresh.table, pages, fresh.pageOffsets);
    } finally {
      b.stopRecording();
    }
    await c.punchRanges(old);
  });
}

// ---------------------------------------------------------------- management operations

export async function addBitmap(c: KscCore, name: string, opts: { granularity?: number; enabled?: boolean }): Promise<void> {
  assertBitmapName(name);
  const granularity = opts.granularity ?? c.blockSize;
  const g = log2(granularity);
  if (!isPowerOfTwo(granularity) || g < MIN_GRANULARITY_BITS || g > MAX_GRANULARITY_BITS) {
    throw new KscError('KSC_E_INVALID', `bitmap granularity ${granularity} must be a power of two from 4 KiB to 64 MiB`);
  }
  await manage(c, () => createEmpty(c, name, g, opts.enabled ?? true));
}

export async function removeBitmap(c: KscCore, name: string): Promise<void> {
  await manage(c, () => dropSlot(c, findBitmap(c, name)));
}

export async function setBitmapEnabled(c: KscCore, name: string, enabled: boolean): Promise<void> {
  await manage(c, async () => {
    const b = findBitmap(c, name);
    if (b.slotDamaged) throw new KscError('KSC_E_CORRUPT', `image ${c.name}: bitmap "${name}" has a damaged directory slot (${b.damage}): clear or remove it`);
    if (b.enabled === enabled) return;
    b.enabled = enabled;
    await writeSlot(c, b.slot, b);
  });
}

export async function clearBitmap(c: KscCore, name: string): Promise<void> {
  await replaceBits(
    c,
    name,
    async () => undefined,
    () => new Map(),
  );
}

/** ORs bitmap `src` into `dst` (granularities may differ: each dirty byte range of src is marked in dst). */
export async function mergeBitmap(c: KscCore, src: string, dst: string): Promise<void> {
  findBitmap(c, src);
  findBitmap(c, dst);
  await replaceBits(
    c,
    dst,
    async () => {
      await findBitmap(c, src).loadAll();
      await findBitmap(c, dst).loadAll();
    },
    (d) => withExtents(c, d, findBitmap(c, src).loadedExtents(c.size)),
  );
}

/**
 * Moves the bits of bitmap `name` into a new, disabled bitmap `frozenName` (same granularity) and clears
 * `name`, in one management step (see KscImage.freezeBitmap).
 */
export async function freezeBitmap(c: KscCore, name: string, frozenName: string): Promise<void> {
  assertBitmapName(frozenName);
  c.writable();
  await c.flushMutex.run(async () => {
    const b = findBitmap(c, name);
    const slot = claimSlot(c, frozenName);
    await b.loadAll();
    // The frozen copy is the bits of this instant; marks from here on are replayed into the emptied
    // bitmap, so every change is in one of the two (§9 rule 6).
    const bits = b.copyBits();
    b.startRecording();
    let old: Ranges = [];
    try {
      // Both fresh tables are written first, referenced by nothing, and made durable by the management
      // step's full flush (its sync: as manageAfter). Then the slots change: the frozen slot is durable
      // before the live one points at the empty table (a cut between them leaves the bits in both).
      const copy = await writeFreshTable(c, slot, b.tableEntries, bits, false);
      const empty = await writeFreshTable(c, b.slot, b.tableEntries, new Map(), false);
      await flushNow(c);
      old = await b.hostRanges(); // after the flush: it may have given dirty pages their first place
      const f = new SparseBitmap(c.file, slot, frozenName, b.granularityBits, false, copy.offset, b.tableEntries, c.size, () => c.alloc.fileEnd);
      f.adoptTable(copy.offset, copy.table, bits, copy.pageOffsets);
      await writeSlot(c, slot, f);
      setSlot(c, slot, f);
      await writeSlot(c, b.slot, new SparseBitmap(c.file, b.slot, b.name, b.granularityBits, b.enabled, empty.offset, b.tableEntries, c.size));
      b.adoptTable(empty.offset, empty.table, new Map(), empty.pageOffsets);
    } finally {
      b.stopRecording();
    }
    await c.punchRanges(old);
  });
}

/**
 * Adds empty, disabled bitmaps named `add` (granularity: the block size) and removes the bitmaps named
 * `remove`, in one management step; each slot write is atomic on its own. Every addition is durable before
 * any removal starts; the removals share one sync, so a cut may leave any subset of them done (the backup
 * handover relies on both: its new token record lands first, then the old record and the frozen bitmap go
 * in either order, formats/repository.md §10). Names are checked (taken, or twice in `add`: KSC_E_EXISTS;
 * unknown in `remove`: KSC_E_NOT_FOUND) before anything is written.
 */
export async function updateBitmaps(c: KscCore, add: string[], remove: string[]): Promise<void> {
  for (const n of add) assertBitmapName(n);
  const g = log2(c.blockSize);
  await manageAfter(
    c,
    async () => {
      add.forEach((n, i) => {
        if (hasBitmap(c, n) || add.indexOf(n) !== i) throw new KscError('KSC_E_EXISTS', `image ${c.name}: bitmap "${n}" already exists`);
      });
      const gone = remove.map((n) => findBitmap(c, n));
      // The additions' slots (the free ones in order, as claimSlot would hand them out) and their empty
      // tables, written before the step's flush, which makes them durable.
      const slots = c.bitmapSlots.flatMap((x, i) => (x === null ? [i] : [])).slice(0, add.length);
      if (slots.length < add.length) throw new KscError('KSC_E_RANGE', `image ${c.name}: all ${c.bitmapSlots.length} bitmap slots are in use`);
      const tables = [];
      for (const slot of slots) tables.push(await writeFreshTable(c, slot, SparseBitmap.tableEntriesFor(c.size, g), new Map(), false));
      return { gone, slots, tables };
    },
    async ({ gone, slots, tables }) => {
      for (const [i, n] of add.entries()) await installEmpty(c, slots[i]!, n, g, false, tables[i]!);
      await dropSlots(c, gone);
    },
  );
}

/** Copies bitmap definitions and bits of `src` into `dst` (used by snapshot). */
export async function copyBitmaps(src: KscCore, dst: KscCore): Promise<void> {
  for (const b of src.bitmapSlots) {
    if (!b) continue;
    await addBitmap(dst, b.name, { granularity: b.granularity, enabled: b.enabled });
    const extents = await bitmapExtents(src, b.name, 0, src.size);
    // OR'ed into what dst's bitmap holds by then: changes to dst made since the add stay marked.
    await replaceBits(
      dst,
      b.name,
      () => findBitmap(dst, b.name).loadAll(),
      (d) => withExtents(dst, d, extents),
    );
  }
}

// ---------------------------------------------------------------- damage (§6.4)

/** Loads every bitmap page and lists all damage outside the data: what open found, and damaged bitmaps. */
export async function findDamage(c: KscCore): Promise<string[]> {
  c.live();
  const out = [...c.openDamage];
  for (const b of c.bitmapSlots) {
    if (!b) continue;
    await b.loadAll();
    if (b.damage) out.push(b.slotDamaged ? b.damage : `${b.damage} (pages ${b.failedPages().join(', ')} read as wholly dirty)`);
  }
  return out;
}

/**
 * check --repair (§6.4): a bitmap with a damaged directory slot is dropped (its name and settings are
 * unknown; its space leaks, for reclaim); one with damaged table entries or pages is rebuilt with the
 * damaged pages wholly dirty. Returns what was done, one sentence each.
 */
export async function repairDamage(c: KscCore): Promise<string[]> {
  c.writable();
  const done = c.openDamage.map((d) => (d.includes('intent words') ? `rewrote the damaged intent words (${d})` : `dropped the damaged free list (${d}); a new one is written at close`));
  for (const b of c.bitmapSlots) {
    if (!b) continue;
    await b.loadAll();
    if (!b.damage) continue;
    const why = b.damage;
    if (b.slotDamaged) {
      await manage(c, () => dropSlot(c, b, true));
      done.push(`dropped bitmap slot ${b.slot} ("${b.name}"): ${why}; its space is reclaimed as leaked`);
    } else {
      const failed = b.failedPages();
      await replaceBits(
        c,
        b.name,
        () => b.loadAll(),
        (x) => x.copyBits(),
      );
      done.push(`rebuilt bitmap "${b.name}": ${why}; pages ${failed.join(', ')} are now wholly dirty`);
    }
  }
  return done;
}
