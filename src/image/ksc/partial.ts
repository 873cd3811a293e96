/**
 * Writes of part of one block without a promise hop before the I/O (datapath.ts writeNow does whole
 * blocks), in groups per block: the small writes that clients send to neighbouring offsets at a high
 * queue depth (4 KiB writes at queue depth 32 put 16 writes into each 64 KiB block at once) would
 * otherwise wait for each other's block lock one by one, and a new block would be copied once per write.
 *
 *  - In place (the block holds data in this layer): the first write takes the block's exclusive lock and
 *    opens the group; later ones join it while it has writes in flight, when their bytes overlap none of
 *    those, and nothing waits for the lock (issue order stays that of the lock queue). The pieces that join
 *    in one turn of the event loop are copied at once into a buffer at their places (block-buffers.ts Span:
 *    sized to what they span, a new one where that would be more than twice their bytes) and issued at the
 *    turn's end (setImmediate, before the native writes of the turn go to the pool anyway), each run of them
 *    without a gap as one write of that buffer's span; the group gives the lock back when its last write
 *    is done. As writeLocked does, a piece leaves the block's checksum invalid, and every write needs its
 *    intent bit durable already.
 *  - A new block (UNALLOCATED without a backing, or ZERO): the first write takes the lock, one new cluster
 *    (Allocator.allocRun) and a zeroed block buffer with its piece copied in; the writes to that block that
 *    arrive in the same turn of the event loop copy their pieces in after it (later writes win, as in issue
 *    order); at the turn's end (setImmediate) the whole block is written once, with its CRC-32, and only then
 *    its map entry set (§9 rule 3: referenced only after it is written); a failed write gives the cluster
 *    back. Intent bits as in changeLocked: only when a bitmap is enabled, and then they must be durable.
 *  - The group of a new block lives on while writes keep coming (a chain of waves): the pieces that arrive
 *    while a wave is being written queue for the next one (their bytes copied at once into a Span sized to
 *    theirs, at their places, later over earlier); when a wave is done, the next is copied into the
 *    block buffer (which holds the block's whole content: what earlier waves wrote, in issue order) and the
 *    span of its pieces written in place with the CRC-32 of the whole block (HostFile.writeWithCrcs with a
 *    span: the file holds the rest of the block already), then its map entry set valid (without such a host
 *    file: the whole block with its CRC-32, or, for pieces within a quarter of the block, only their span,
 *    the entry then not valid). The lock stays held from wave to wave; nothing waiting for it may be
 *    overtaken (a piece that finds the lock awaited takes the general path, behind it), and the chain
 *    ends, giving the lock back, when a wave finds no piece queued (no piece joins a chain while a writer waits
 *    for the block assembly: it would keep its reservation for as long as its writers go on). Such a rewrite
 *    needs no intent bit while no map snapshot (a flush, which moves c.epoch)
 *    has been taken since the entry was last set valid: the entry is then set not valid before the write,
 *    so any flush during it records no checksum that a torn write could contradict (the bytes of earlier
 *    waves are rewritten identical). Otherwise the wave takes the block's intent bit first (as writeLocked).
 *
 * Every piece's bytes are copied before join returns: the caller may reuse its buffer at once (an NBD WRITE's
 * payload is read where the socket's bytes lie). Every write of a group counts itself in flight
 * (changesInFlight), holds its intent range and marks its bitmaps as change() does; the group holds the lock
 * for all. Null, having changed nothing, whenever a condition does not hold: the caller takes the general
 * path, which also produces every error.
 *
 * Here: joining, and a new block's waves; partial-group.ts: groups and members, how they end;
 * partial-inplace.ts: the issue of an in-place turn's pieces; block-buffers.ts: the buffers and spans.
 */
import { BlockState } from '../../format/constants.js';
import { writeThenCrcs } from '../../io/file.js';
import { DAMAGED } from '../maptable.js';
import { type SparseBitmap, bitmapsGeneration } from '../sparse-bitmap.js';
import { type FreshBlock, assemblyWaited, giveBlockBuffer, putInSpans, releaseAssembly, takeFreshBlock, tryReserveAssembly } from './block-buffers.js';
import type { KscCore } from './core.js';
import { Group, type Member, type State, endGroup, finish, states } from './partial-group.js';
import { submitInPlace } from './partial-inplace.js';

/**
 * The enabled bitmaps of c's 64 slots (null: none), scanned again only when a bitmap or a slot changed
 * since (bitmapsGeneration): the scan per piece was two thirds of join's own instructions.
 */
function enabledBitmaps(c: KscCore, st: State): SparseBitmap[] | null {
  if (st.gen === bitmapsGeneration.n) return st.enabled;
  let out: SparseBitmap[] | null = null;
  const slots = c.bitmapSlots;
  for (let k = 0; k < slots.length; k++) {
    const b = slots[k];
    if (b && b.enabled) (out ??= []).push(b);
  }
  st.enabled = out;
  st.gen = bitmapsGeneration.n;
  return out;
}

/** Flush hook: datapath.ts passes its flush (a FUA write flushes before it returns). */
export type FlushFn = (c: KscCore) => Promise<void>;

export function writePartialNow(c: KscCore, offset: number, data: Buffer, fua: boolean | undefined, flush: FlushFn): Promise<void> | null {
  const m = join(c, offset, data, fua === true);
  if (!m) return null;
  return new Promise<void>((resolve, reject) => {
    m.done = (e) => {
      if (e !== undefined) reject(e);
      else if (m.fua) flush(c).then(resolve, reject);
      else resolve();
    };
  });
}

/**
 * writePartialNow settled by a callback (no promise per piece): true once the piece is taken, `done` called
 * later, once; false, having changed nothing, when the general path must take it.
 */
export function writePartialCb(c: KscCore, offset: number, data: Uint8Array, fua: boolean, flush: FlushFn, done: (e: unknown) => void): boolean {
  const m = join(c, offset, data, fua);
  if (!m) return false;
  m.done = fua
    ? (e) => {
        if (e !== undefined) done(e);
        else flush(c).then(() => done(undefined), done);
      }
    : done;
  return true;
}

/** Never called: a member's done until its writer sets it (nothing settles a member in the turn it joins). */
const unset = (): void => {
  throw new Error('partial.ts: a member settled before its done was set');
};

/**
 * Takes the piece into its block's group (see the header): its member, whose `done` the caller sets at once
 * (nothing settles it before the event loop turns); null, having changed nothing, when a condition fails.
 */
function join(c: KscCore, offset: number, data: Uint8Array, fua: boolean): Member | null {
  const length = data.length;
  const B = c.blockSize;
  if (c.closed || c.readOnly || c.broken || c.gate || c.beforeChange || c.refuseChanges) return null;
  if (!(length > 0 && offset >= 0 && Number.isSafeInteger(offset) && offset + length <= c.size)) return null;
  const block = Math.floor(offset / B);
  const start = offset - block * B;
  if (start + length > B || length === B) return null; // whole blocks: writeNow or the general path
  const page = c.map.page(Math.floor(block / 4096));
  if (!page) return null;
  const i = block % 4096;
  const state = page.state[i];
  const inPlace = state === BlockState.Data;
  if (!inPlace && (state === DAMAGED || (state === BlockState.Unallocated && c.backingDev))) return null;
  let st = states.get(c);
  if (!st) states.set(c, (st = { groups: new Map(), enabled: null, gen: -1 }));
  const bitmaps = enabledBitmaps(c, st);
  if (bitmaps) for (let k = 0; k < bitmaps.length; k++) if (!bitmaps[k]!.prepared(offset, length)) return null;
  const byBlock = st.groups;
  const g = byBlock.get(block);
  if (g) {
    // Join: nothing queued for the lock meanwhile, the same bitmaps; a new block's chain takes any piece
    // (its block reads as data once the first wave is written); an in-place group the same kind of piece,
    // overlapping none in flight.
    if (c.locks.waiting(block, block) || !sameBitmaps(g.bitmaps, bitmaps)) return null;
    // A new block's chain holds its block's assembly while pieces keep coming: none joins while a writer waits
    // for assembly (the piece takes the general path, behind the block's lock, which the chain soon gives back).
    if (g.fresh && !g.assembling && assemblyWaited()) return null;
    if (!g.fresh && (!inPlace || overlapsAny(g.members, start, start + length))) return null;
  }
  // A new block's chain takes intent per wave (submitWave) unless a bitmap asks for it per piece.
  const intent = g?.fresh ? bitmaps !== null : inPlace || bitmaps !== null;
  if (intent && !c.intent.tryBegin(offset, length)) return null;
  let group = g;
  if (!group) {
    // A new block's buffer counts in the process's block assembly (block-buffers.ts); none left: the general
    // path, which waits for it.
    if (!inPlace && !tryReserveAssembly(B)) {
      if (intent) c.intent.end(offset, length, c.epoch);
      return null;
    }
    const release = c.locks.tryAcquire(block, block, true);
    if (!release) {
      if (intent) c.intent.end(offset, length, c.epoch);
      if (!inPlace) releaseAssembly(B);
      return null;
    }
    let host = inPlace ? page.host[i]! : -1;
    if (!inPlace) {
      const run = c.alloc.allocRun(1);
      if (run === null) {
        if (intent) c.intent.end(offset, length, c.epoch);
        releaseAssembly(B);
        release();
        return null;
      }
      host = run;
    }
    group = new Group(block, host, inPlace ? null : takeFreshBlock(B), bitmaps, release);
    byBlock.set(block, group);
    if (group.fresh) {
      const fresh = group;
      setImmediate(() => submitFresh(c, fresh));
    }
  }
  c.changesInFlight++;
  const grp = group;
  const m: Member = { offset, length, start, end: start + length, intent, fua, done: unset };
  // The piece's bytes are copied now, wherever they go (the caller's buffer may be reused once this returns).
  if (grp.assembling) {
    grp.members.push(m);
    grp.blk!.buf.set(data, start);
  } else if (grp.fresh) {
    m.span = putInSpans(grp.nextSpans, data, start, B);
    grp.next.push(m);
  } else {
    grp.members.push(m);
    if (grp.open) grp.open.push(m);
    else {
      grp.open = [m];
      setImmediate(() => submitInPlace(c, grp));
    }
    m.span = putInSpans(grp.openSpans, data, start, B);
  }
  return m;
}

function overlapsAny(ms: Member[], start: number, end: number): boolean {
  for (let k = 0; k < ms.length; k++) if (ms[k]!.start < end && start < ms[k]!.end) return true;
  return false;
}

function sameBitmaps(a: SparseBitmap[] | null, b: SparseBitmap[] | null): boolean {
  if (a === null || b === null) return a === b;
  return a.length === b.length && a.every((x, k) => x === b[k]);
}

/**
 * Zeroes the bytes of f that no member's [start, end) covers (the first wave's pieces are in it already) and
 * that may not be zero (within [f.lo, f.hi)); f's extent becomes that of the pieces.
 */
function zeroGaps(f: FreshBlock, members: Member[]): void {
  let ms = members;
  for (let k = 1; k < ms.length; k++) {
    if (ms[k]!.start < ms[k - 1]!.start) {
      ms = [...members].sort((x, y) => x.start - y.start); // pieces mostly come in ascending order
      break;
    }
  }
  const { buf, lo, hi } = f;
  let at = 0;
  for (const m of ms) {
    if (m.start > at) zero(buf, Math.max(at, lo), Math.min(m.start, hi));
    if (m.end > at) at = m.end;
  }
  if (at < buf.length) zero(buf, Math.max(at, lo), Math.min(buf.length, hi));
  f.lo = ms[0]!.start;
  f.hi = at;
}

/** The typed array's own fill: Buffer's checks its arguments first, a cost per call on this path. */
const typedFill = Uint8Array.prototype.fill;
function zero(b: Buffer, from: number, to: number): void {
  if (from < to) typedFill.call(b, 0, from, to);
}

/** The first wave of a new block: the whole block written to its new cluster, then its map entry set. */
function submitFresh(c: KscCore, g: Group): void {
  g.assembling = false;
  const B = c.blockSize;
  zeroGaps(g.blk!, g.members);
  const blk = g.blk!.buf;
  let io: Promise<number[]>;
  try {
    io = c.file.writeWithCrcs ? c.file.writeWithCrcs(blk, g.host, B) : writeThenCrcs(c.file, blk, g.host, B);
  } catch (e) {
    io = Promise.reject(e);
  }
  io.then(
    (crcs) => {
      let err: unknown = undefined;
      try {
        c.map.set(g.block, BlockState.Data, g.host, crcs[0]!, true);
        g.validEpoch = c.epoch;
        markWave(g);
      } catch (e) {
        err = e;
      }
      waveDone(c, g, err);
    },
    (e: unknown) => {
      c.alloc.unusedAgain([g.host]);
      waveDone(c, g, e);
    },
  );
}

function markWave(g: Group): void {
  if (g.bitmaps) for (const b of g.bitmaps) for (const m of g.members) b.mark(m.offset, m.length);
}

/** Settles the wave written (or failed: then the queued pieces too, and the chain ends); starts the next one. */
function waveDone(c: KscCore, g: Group, err: unknown): void {
  const wave = g.members;
  g.members = [];
  let queued: Member[] = [];
  if (err !== undefined || g.next.length === 0) {
    queued = g.next;
    g.next = [];
    endGroup(c, g, err === undefined);
  }
  for (const m of wave) finish(c, g, m);
  for (const m of queued) finish(c, g, m);
  for (const m of wave) m.done(err);
  for (const m of queued) m.done(err);
  if (g.blk) void submitWave(c, g);
}

/**
 * A later wave of a new block's chain: the queued pieces copied into the block's content, in issue order,
 * and their span written in place with the whole block's CRC-32 (see the header for the fallbacks, and for
 * when an intent bit is needed).
 */
async function submitWave(c: KscCore, g: Group): Promise<void> {
  const f = g.blk!;
  const blk = f.buf;
  g.members = g.next;
  g.next = [];
  let lo = Infinity;
  let hi = 0;
  // Each queued piece's bytes from its span, in issue order (putInSpans); the spans then go back (pieces
  // queued from here on take spans of their own).
  for (const m of g.members) {
    const s = m.span!;
    blk.set(s.buf.subarray(m.start - s.lo, m.end - s.lo), m.start);
    lo = Math.min(lo, m.start);
    hi = Math.max(hi, m.end);
  }
  for (const s of g.nextSpans) giveBlockBuffer(s.buf);
  g.nextSpans = [];
  f.lo = Math.min(f.lo, lo); // the buffer may hold non-zero bytes there now
  f.hi = Math.max(f.hi, hi);
  const B = c.blockSize;
  // The file holds the block's content outside [lo, hi) already (earlier waves, each written before the next
  // began, from this buffer): where the host file can, only the span is written, with the CRC-32 of the whole
  // block. Otherwise pieces within a quarter of the block are written as that span, leaving the checksum not
  // valid; more, the whole block with its CRC-32 (a trickle of pieces is not 16× the bytes).
  const withCrcs = c.file.writeWithCrcs?.bind(c.file);
  const whole = withCrcs !== undefined || (hi - lo) * 4 > B;
  const at = g.block * B;
  const len = Math.min(B, c.size - at);
  let intent = false;
  let crcs: number[];
  try {
    if (g.bitmaps === null && c.epoch !== g.validEpoch) {
      intent = true;
      if (!c.intent.tryBegin(at, len)) {
        try {
          await c.intent.begin(at, len, true);
        } catch (e) {
          c.intent.end(at, len, c.epoch);
          intent = false;
          throw e;
        }
      }
    }
    // Not valid while the block is being rewritten: a flush meanwhile records no checksum to contradict.
    c.map.set(g.block, BlockState.Data, g.host, 0, false);
    if (withCrcs) crcs = await withCrcs(blk, g.host, B, lo, hi);
    else if (whole) crcs = await writeThenCrcs(c.file, blk, g.host, B);
    else crcs = await c.file.write(blk.subarray(lo, hi), g.host + lo).then(() => []);
  } catch (e) {
    if (intent) c.intent.end(at, len, c.epoch);
    waveDone(c, g, e);
    return;
  }
  let err: unknown = undefined;
  try {
    if (whole) {
      c.map.set(g.block, BlockState.Data, g.host, crcs[0]!, true);
      g.validEpoch = c.epoch;
    }
    markWave(g);
  } catch (e) {
    err = e;
  }
  if (intent) c.intent.end(at, len, c.epoch);
  waveDone(c, g, err);
}
