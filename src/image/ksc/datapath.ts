/**
 * The changes of a ksc_inc image's data (formats/ksc_inc.md §9 rule 2): write, zero, discard and
 * copy-on-read fills, under the change protocol — in-flight gate, exclusive block locks, intent bits
 * durable, bitmap pages loaded; then the data; then map entries and bitmap bits; FUA flushes before
 * returning. Reads (shared block locks, so copy-on-write stays invisible to them) are in read.ts.
 */
import { crc32 } from 'node:zlib';
import { KscError } from '../../errors.js';
import { writeThenCrcs } from '../../io/file.js';
import { BlockState } from '../../format/constants.js';
import type { SparseBitmap } from '../sparse-bitmap.js';
import { DAMAGED } from '../maptable.js';
import { type WriteOptions, type ZeroOptions, assertRange } from '../types.js';
import type { KscCore, Seg } from './core.js';
import { dropBlockBuffer, giveBlockBuffer, releaseAssembly, reserveAssembly, takeBlockBuffer } from './block-buffers.js';
import { flush } from './flush.js';
import { writePartialCb, writePartialNow } from './partial.js';
import { readBacking } from './read.js';

const ZERO_BLOCK_CRC = new Map<number, number>();
const ZERO_BLOCK = new Map<number, Buffer>();
/**
 * A zeroed block of `blockSize` bytes, one per size, shared by every write of zeroes: only ever written from,
 * never into (a WRITE_ZEROES is admitted as a small request, so a zeroed buffer of its own per request was
 * memory no budget counted).
 */
function zeroBlock(blockSize: number): Buffer {
  let z = ZERO_BLOCK.get(blockSize);
  if (z === undefined) ZERO_BLOCK.set(blockSize, (z = Buffer.alloc(blockSize)));
  return z;
}
function zeroCrc(blockSize: number): number {
  let c = ZERO_BLOCK_CRC.get(blockSize);
  if (c === undefined) ZERO_BLOCK_CRC.set(blockSize, (c = crc32(zeroBlock(blockSize))));
  return c;
}

/** One piece of a write: where it goes, the bytes, and (for whole blocks) where its CRC-32 goes. */
interface PieceWrite {
  host: number;
  buf: Buffer;
  crc: ((c: number) => void) | null;
}

// ---------------------------------------------------------------- the change protocol

/**
 * Runs a change of [offset, offset+length) under the §9 protocol: exclusive block locks, intent bits
 * durable, bitmap pages loaded; then `fn`; then the bitmaps marked; FUA flushes before returning.
 */
async function change(c: KscCore, offset: number, length: number, fua: boolean | undefined, fn: () => Promise<void>): Promise<void> {
  c.writable();
  if (c.refuseChanges) {
    throw new KscError('KSC_E_READ_ONLY', `image ${c.name}: frozen as the backing of a snapshot overlay (its changes would show through the overlay); force to write anyway`);
  }
  assertRange(c, offset, length);
  if (length > 0) {
    while (c.gate) await c.gate;
    c.changesInFlight++;
    try {
      if (c.beforeChange) await c.beforeChange(offset, length);
      await changeLocked(c, offset, length, fn);
    } finally {
      c.leaveChange();
    }
  }
  if (fua) await flush(c);
}

async function changeLocked(c: KscCore, offset: number, length: number, fn: () => Promise<void>): Promise<void> {
  const release = await c.lockBlocks(offset, length, true);
  try {
    const bitmaps = c.enabledBitmaps();
    const b0 = Math.floor(offset / c.blockSize);
    const b1 = Math.floor((offset + length - 1) / c.blockSize);
    await c.map.ensure(b0, b1);
    // Intent protects bitmaps and the checksums of data changed in place. A change that only fills
    // unallocated blocks of an image without enabled bitmaps needs none: its new clusters are referenced
    // only after they are durable (§9 rule 3), so a crash leaves the old state or the new, both checksummed.
    const intent = bitmaps.length > 0 || rangeHoldsData(c, b0, b1);
    // Without enabled bitmaps a set bit only makes recovery distrust checksums: precision buys nothing.
    if (intent) await c.intent.begin(offset, length, bitmaps.length === 0);
    try {
      for (const b of bitmaps) await b.prepare(offset, length);
      await fn();
      for (const b of bitmaps) b.mark(offset, length);
    } finally {
      if (intent) c.intent.end(offset, length, c.epoch);
    }
  } finally {
    release();
  }
}

/** Whether any block in [b0, b1] holds data (or is damaged) in this layer; the pages must be loaded. */
function rangeHoldsData(c: KscCore, b0: number, b1: number): boolean {
  for (let b = b0; b <= b1; b++) {
    const state = c.map.page(Math.floor(b / 4096))!.state[b % 4096];
    if (state === BlockState.Data || state === DAMAGED) return true;
  }
  return false;
}

// ---------------------------------------------------------------- writes

export function write(c: KscCore, offset: number, data: Buffer, opts: WriteOptions): Promise<void> {
  let now: Promise<void> | null;
  try {
    now = writeNow(c, offset, data, opts.fua) ?? writePartialNow(c, offset, data, opts.fua, flush);
  } catch (e) {
    return Promise.reject(e);
  }
  return now ?? change(c, offset, data.length, opts.fua, () => writeLocked(c, offset, data));
}

/**
 * write() settled by a callback (capabilities.ts WritesNow): for now the writes of part of a block that
 * partial.ts takes at once; false, having done nothing, for anything else (the caller then calls write()).
 */
export function writeCb(c: KscCore, offset: number, data: Uint8Array, fua: boolean, done: (e: unknown) => void): boolean {
  return writePartialCb(c, offset, data, fua, flush, done);
}

/**
 * The common whole-block writes without a promise hop before the I/O (no async change() around them):
 *  - an overwrite: blocks that all hold data in this layer, host-contiguous (their intent bits awaited here
 *    when not durable yet, the lock held meanwhile);
 *  - an allocating write: blocks that all hold no data (UNALLOCATED or ZERO, none damaged), given one run of
 *    new host-contiguous clusters (Allocator.allocRun); an intent bit only when a bitmap is enabled (as in
 *    changeLocked), and then it must already be durable;
 * in both, the map page loaded, the pages of every enabled bitmap loaded, and the block lock free now. It
 * keeps change()'s protocol step for step (exclusive lock, intent registered, data, then map entries and
 * bitmap bits, intent end, release), only synchronously; new clusters are referenced only by entries set
 * after their data is written, so a flush makes them durable first (§9 rule 3), and a failed write gives
 * them back unused. Returns null, having changed nothing, whenever any of that does not hold: the caller
 * takes the general path (which also produces every error).
 */
function writeNow(c: KscCore, offset: number, data: Buffer, fua: boolean | undefined): Promise<void> | null {
  const length = data.length;
  const B = c.blockSize;
  if (c.closed || c.readOnly || c.broken || c.gate || c.beforeChange || c.refuseChanges) return null;
  if (!(length > 0 && offset >= 0 && offset % B === 0 && length % B === 0 && Number.isSafeInteger(offset) && offset + length <= c.size)) return null;
  const b0 = offset / B;
  const n = length / B;
  const p = Math.floor(b0 / 4096);
  if (n > 1024 || Math.floor((b0 + n - 1) / 4096) !== p) return null;
  const page = c.map.page(p);
  if (!page) return null;
  const i0 = b0 - p * 4096;
  const overwrite = page.state[i0] === BlockState.Data;
  let host = overwrite ? page.host[i0]! : -1;
  for (let k = 0; k < n; k++) {
    const state = page.state[i0 + k];
    if (overwrite ? state !== BlockState.Data || page.host[i0 + k] !== host + k * B : state === BlockState.Data || state === DAMAGED) return null;
  }
  let bitmaps: SparseBitmap[] | null = null;
  for (const b of c.bitmapSlots) {
    if (!b || !b.enabled) continue;
    if (!b.prepared(offset, length)) return null;
    (bitmaps ??= []).push(b);
  }
  const release = c.locks.tryAcquire(b0, b0 + n - 1, true);
  if (!release) return null;
  const intent = overwrite || bitmaps !== null;
  // An overwrite whose intent bits are not durable yet waits for them here, holding its lock and counted in
  // flight, then writes as below: the general path's steps in the same order, without its promise hops (the
  // first writes to each region after an open all come this way: issue 19).
  let intentDurable: Promise<void> | null = null;
  if (intent && !c.intent.tryBegin(offset, length)) {
    if (!overwrite) {
      release();
      return null;
    }
    intentDurable = c.intent.begin(offset, length, bitmaps === null);
  }
  if (!overwrite) {
    const run = c.alloc.allocRun(n);
    if (run === null) {
      if (intent) c.intent.end(offset, length, c.epoch);
      release();
      return null;
    }
    host = run;
  }
  // From here on, as in change(): registered in flight, intent held, lock held, all undone by finish().
  c.changesInFlight++;
  const finish = (): void => {
    if (intent) c.intent.end(offset, length, c.epoch);
    release();
    c.leaveChange();
  };
  const start = (): Promise<number[]> => (c.file.writeWithCrcs ? c.file.writeWithCrcs(data, host, B) : writeThenCrcs(c.file, data, host, B));
  let io: Promise<number[]>;
  if (intentDurable) io = intentDurable.then(start);
  else {
    try {
      io = start();
    } catch (e) {
      io = Promise.reject(e);
    }
  }
  return io.then(
    (crcs) => {
      try {
        for (let k = 0; k < n; k++) c.map.set(b0 + k, BlockState.Data, host + k * B, crcs[k]!, true);
        if (bitmaps) for (const b of bitmaps) b.mark(offset, length);
      } finally {
        finish();
      }
      if (fua) return flush(c);
      return undefined;
    },
    (e: unknown) => {
      if (!overwrite) c.alloc.unusedAgain(clusterRun(host, n, B));
      finish();
      throw e;
    },
  );
}

function clusterRun(host: number, n: number, B: number): number[] {
  return Array.from({ length: n }, (_, k) => host + k * B);
}

async function writeLocked(c: KscCore, offset: number, data: Buffer): Promise<void> {
  // The whole-block buffers a copy-on-write assembles are reserved in the process's block assembly before
  // they are taken (block-buffers.ts; only this write's own block locks are held meanwhile), and given back
  // once written (dropped if a write may still read them). change() has loaded the map pages of the range.
  const B = c.blockSize;
  const segs = c.segments(offset, data.length);
  let need = 0;
  for (const s of segs) if (s.length !== B && c.map.page(Math.floor(s.block / 4096))!.state[s.block % 4096] !== BlockState.Data) need += B;
  if (need > 0) await reserveAssembly(need);
  const cows: Buffer[] = [];
  let written = false;
  try {
    await writeSegs(c, segs, data, cows);
    written = true;
  } finally {
    for (const b of cows) (written ? giveBlockBuffer : dropBlockBuffer)(b);
    if (need > 0) releaseAssembly(need);
  }
}

/** writeLocked's work on the segments of its range; the copy-on-write buffers it takes go into `cows`. */
async function writeSegs(c: KscCore, segs: Seg[], data: Buffer, cows: Buffer[]): Promise<void> {
  const B = c.blockSize;
  const inPlace: { seg: Seg; host: number; full: boolean; wasValid: boolean }[] = [];
  const fresh: { seg: Seg; buf: Buffer }[] = [];
  for (const s of segs) {
    const page = c.map.page(Math.floor(s.block / 4096))!;
    const i = s.block % 4096;
    const piece = data.subarray(s.at, s.at + s.length);
    if (page.state[i] === DAMAGED) throw c.map.damagedError(s.block);
    if (page.state[i] === BlockState.Data) {
      inPlace.push({ seg: s, host: page.host[i]!, full: s.length === B, wasValid: page.csumValid[i] === 1 });
    } else if (s.length === B) {
      fresh.push({ seg: s, buf: piece });
    } else {
      // Copy-on-write: assemble the whole block from what it reads as now, then the new bytes.
      const blk = takeBlockBuffer(B);
      cows.push(blk);
      const start = s.block * B;
      const fromBacking = page.state[i] === BlockState.Unallocated && c.backingDev ? Math.min(B, c.size - start) : 0;
      if (fromBacking > 0) await readBacking(c, start, blk.subarray(0, fromBacking));
      blk.fill(0, fromBacking);
      piece.copy(blk, s.inBlock);
      fresh.push({ seg: s, buf: blk });
    }
  }
  const hosts = c.alloc.allocClusters(fresh.length);
  const writes: PieceWrite[] = [];
  const inPlaceCrc: number[] = new Array(inPlace.length);
  const freshCrc: number[] = new Array(fresh.length);
  inPlace.forEach((p, k) => writes.push({ host: p.host + p.seg.inBlock, buf: data.subarray(p.seg.at, p.seg.at + p.seg.length), crc: p.full ? (x) => (inPlaceCrc[k] = x) : null }));
  fresh.forEach((f, k) => writes.push({ host: hosts[k]!, buf: f.buf, crc: (x) => (freshCrc[k] = x) }));
  try {
    await writeCoalesced(c, writes);
  } catch (e) {
    c.alloc.unusedAgain(hosts);
    throw e;
  }
  inPlace.forEach((p, k) => {
    if (p.full) c.map.set(p.seg.block, BlockState.Data, p.host, inPlaceCrc[k]!, true);
    else if (p.wasValid) c.map.set(p.seg.block, BlockState.Data, p.host, 0, false);
  });
  fresh.forEach((f, k) => c.map.set(f.seg.block, BlockState.Data, hosts[k]!, freshCrc[k]!, true));
}

/**
 * Writes (host, buffer) pieces, merging host-contiguous neighbours into one write. Pieces that are also
 * adjacent in memory (a caller's buffer of whole blocks) merge into one view without copying. Pieces with
 * a `crc` callback are whole blocks and get their CRC-32: computed with the write on a pool thread when
 * the group is one buffer of whole blocks and the host file can (HostFile.writeWithCrcs), else here.
 */
async function writeCoalesced(c: KscCore, writes: PieceWrite[]): Promise<void> {
  writes.sort((a, b) => a.host - b.host);
  const groups: { host: number; bufs: Buffer[]; len: number; items: PieceWrite[] }[] = [];
  for (const w of writes) {
    const g = groups[groups.length - 1];
    if (g && g.host + g.len === w.host && g.bufs.length < 1024) {
      const last = g.bufs[g.bufs.length - 1]!;
      if (last.buffer === w.buf.buffer && last.byteOffset + last.length === w.buf.byteOffset) {
        g.bufs[g.bufs.length - 1] = Buffer.from(last.buffer, last.byteOffset, last.length + w.buf.length);
      } else g.bufs.push(w.buf);
      g.len += w.buf.length;
      g.items.push(w);
    } else groups.push({ host: w.host, bufs: [w.buf], len: w.buf.length, items: [w] });
  }
  const B = c.blockSize;
  const file = c.file;
  await Promise.all(
    groups.map(async (g) => {
      if (g.bufs.length === 1 && file.writeWithCrcs) {
        // Also pieces of blocks (their checksums are unused; one CRC-32 of the piece costs far less than
        // a pool job of its own: the addon queues the writes of one event-loop turn as one job).
        const whole = g.items.every((it) => it.crc && it.buf.length === B);
        const crcs = await file.writeWithCrcs(g.bufs[0]!, g.host, whole ? B : g.len);
        if (whole) g.items.forEach((it, i) => it.crc!(crcs[i]!));
        else for (const it of g.items) if (it.crc) it.crc(crc32(it.buf));
        return;
      }
      await (g.bufs.length === 1 ? file.write(g.bufs[0]!, g.host) : file.writev(g.bufs, g.host));
      for (const it of g.items) if (it.crc) it.crc(crc32(it.buf));
    }),
  );
}

// ---------------------------------------------------------------- zeroes and discard

export function writeZeroes(c: KscCore, offset: number, length: number, opts: ZeroOptions): Promise<void> {
  return change(c, offset, length, opts.fua, () => zeroLocked(c, offset, length, opts.mayTrim ?? true, false));
}

export function discard(c: KscCore, offset: number, length: number, opts: WriteOptions): Promise<void> {
  return change(c, offset, length, opts.fua, () => zeroLocked(c, offset, length, true, true));
}

/**
 * Whole blocks become ZERO (their clusters freed) or, when trimming is not allowed, are zeroed in place.
 * Partial blocks are written with zeros, except for discard, which leaves them as they are.
 */
async function zeroLocked(c: KscCore, offset: number, length: number, mayTrim: boolean, isDiscard: boolean): Promise<void> {
  const segs = c.segments(offset, length);
  // change() has loaded the map pages of the whole range.
  const B = c.blockSize;
  for (const s of segs) {
    const start = s.block * B;
    const whole = s.inBlock === 0 && (s.length === B || start + s.length === c.size);
    const page = c.map.page(Math.floor(s.block / 4096))!;
    const i = s.block % 4096;
    const state = page.state[i]!;
    if (state === DAMAGED) throw c.map.damagedError(s.block);
    if (!whole) {
      if (isDiscard || state === BlockState.Zero || (state === BlockState.Unallocated && !c.backingDev)) continue;
      await writeLocked(c, start + s.inBlock, zeroBlock(B).subarray(0, s.length));
      continue;
    }
    if (state === BlockState.Data && !mayTrim) {
      await c.file.write(zeroBlock(B), page.host[i]!);
      c.map.set(s.block, BlockState.Data, page.host[i]!, zeroCrc(B), true);
    } else if (state === BlockState.Data) {
      // The cluster is punched and reused only after the flush that makes this entry durable (§9 rule 4):
      // until then the entry on disk still points at it and a crash must find the old data there.
      const host = page.host[i]!;
      c.map.set(s.block, c.backingDev ? BlockState.Zero : BlockState.Unallocated, 0, 0, false);
      c.alloc.freeAfterFlush(host, c.epoch);
    } else if (state === BlockState.Unallocated && c.backingDev) {
      c.map.set(s.block, BlockState.Zero, 0, 0, false);
    }
  }
}

// ---------------------------------------------------------------- copy-on-read fills

/**
 * Copy-on-read (formats/ksc_inc.md §4.2 rule 3): stores `data`, which the backing holds at `offset`, into
 * the blocks of [offset, offset+data.length) that are whole in it and still UNALLOCATED when their locks
 * are taken (a change that got there first wins). The disk's content does not change, so no bitmap is
 * marked and no intent bit is needed: the new clusters are referenced only after they are durable (§9
 * rule 3, at the next flush), and a crash before leaves the blocks UNALLOCATED, reading the same bytes.
 * Returns the blocks filled; fills nothing (0) on an image that cannot change.
 */
export function fillFromBacking(c: KscCore, offset: number, data: Buffer): Promise<number> {
  if (c.closed || c.closing || c.readOnly || c.broken || c.refuseChanges || data.length === 0) return Promise.resolve(0);
  const p = fillLocked(c, offset, data);
  c.fills.add(p);
  void p.finally(() => c.fills.delete(p)).catch(() => undefined);
  return p;
}

async function fillLocked(c: KscCore, offset: number, data: Buffer): Promise<number> {
  assertRange(c, offset, data.length);
  while (c.gate) await c.gate;
  c.changesInFlight++;
  try {
    const B = c.blockSize;
    const end = offset + data.length;
    const b0 = Math.ceil(offset / B);
    let b1 = Math.floor(end / B) - 1; // last block wholly inside
    if (end === c.size && end % B !== 0) b1 = Math.floor(end / B); // the short last block of the disk
    if (b1 < b0) return 0;
    const release = await c.lockBlocks(b0 * B, Math.min(c.size, (b1 + 1) * B) - b0 * B, true);
    try {
      if (c.closed || c.broken) return 0;
      await c.map.ensure(b0, b1);
      const fresh: { block: number; buf: Buffer }[] = [];
      for (let b = b0; b <= b1; b++) {
        if (c.map.page(Math.floor(b / 4096))!.state[b % 4096] !== BlockState.Unallocated) continue;
        const start = b * B;
        const piece = data.subarray(start - offset, Math.min(start + B, end) - offset);
        // A short last block is stored as a whole cluster, zero-padded (as a write of it would be).
        fresh.push({ block: b, buf: piece.length === B ? piece : Buffer.concat([piece, Buffer.alloc(B - piece.length)]) });
      }
      if (fresh.length === 0) return 0;
      const hosts = c.alloc.allocClusters(fresh.length);
      const crcs: number[] = new Array(fresh.length);
      try {
        await writeCoalesced(
          c,
          fresh.map((f, k) => ({ host: hosts[k]!, buf: f.buf, crc: (x: number) => (crcs[k] = x) })),
        );
      } catch (e) {
        c.alloc.unusedAgain(hosts);
        throw e;
      }
      fresh.forEach((f, k) => c.map.set(f.block, BlockState.Data, hosts[k]!, crcs[k]!, true));
      return fresh.length;
    } finally {
      release();
    }
  } finally {
    c.leaveChange();
  }
}
