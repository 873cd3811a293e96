/**
 * Block buffers of partial.ts (a new block's content, the queued pieces of its next wave, the in-place
 * pieces of one turn: these two only as large as their pieces span, see Span) and of datapath.ts (the
 * whole block a copy-on-write assembles), reused: a fresh zeroed 64 KiB buffer per new block (an
 * allocation outside V8's heap, zeroed, then garbage) cost more of the serving thread than the block's own
 * write. Contents are garbage (partial.ts submitFresh zeroes what no piece of a new block's first wave
 * covers; a copy-on-write zeroes what the backing does not fill). Every size is a power of two (a span's
 * from 512 bytes, a block's up to 2 MiB): one free list per size, so a take is O(1). At most
 * FREE_BLOCK_BYTES are kept per process, and at most FREE_PER_SIZE of each size.
 */
const FREE_BLOCK_BYTES = 4 * 1024 * 1024;
const FREE_PER_SIZE = 64;
/** Free buffers by log2 of their size. */
const freeBySize: Buffer[][] = Array.from({ length: 32 }, () => []);
let freeBlockBytes = 0;

/** The free list of buffers of `size` bytes, or null for a size that is not a power of two (never kept). */
function freeList(size: number): Buffer[] | null {
  return size > 0 && (size & (size - 1)) === 0 ? freeBySize[31 - Math.clz32(size)]! : null;
}

/**
 * The count of block buffer bytes (every buffer above, whoever takes it): handed out by takeBlockBuffer and
 * takeFreshBlock, of those the ones newly allocated, and the ones held now (taken, not given back nor
 * dropped). Tests read these; the NBD admission tests compare `held` with what was admitted. The block
 * assembly below counts no buffers: it is the bound on the whole-block ones, reserved before they are taken.
 */
export const blockBufferStats = { taken: 0, allocated: 0, held: 0 };

export function takeBlockBuffer(size: number): Buffer {
  blockBufferStats.taken += size;
  blockBufferStats.held += size;
  const b = freeList(size)?.pop();
  if (b) {
    freeBlockBytes -= size;
    return b;
  }
  blockBufferStats.allocated += size;
  return Buffer.allocUnsafeSlow(size);
}

export function giveBlockBuffer(b: Buffer): void {
  blockBufferStats.held -= b.length;
  const list = freeList(b.length);
  if (!list || freeBlockBytes + b.length > FREE_BLOCK_BYTES || list.length >= FREE_PER_SIZE) return;
  list.push(b);
  freeBlockBytes += b.length;
}

/**
 * Whole-block buffers assembled for new blocks — partial.ts's content of a new block, datapath.ts's
 * copy-on-write of part of one — over the process: a 4 KiB NBD WRITE into a new 2 MiB block holds 2 MiB that
 * NBD admission, counting the request's bytes, does not see (16 connections of 32 such WRITEs held 1.1 GiB).
 * At most ASSEMBLY_BYTES are reserved at once (or one reservation of any size when none is held); waiters are
 * served in order. A holder never waits for another reservation while it holds one, so every holder ends;
 * and a new block's chain takes no more pieces while someone waits (assemblyWaited), so it ends soon.
 */
export const ASSEMBLY_BYTES = 32 * 1024 * 1024;
let assembling = 0;
const assemblyWaiters: { n: number; resolve: () => void }[] = [];

/** Bytes of block assembly reserved now (tests). */
export function assemblyReserved(): number {
  return assembling;
}

/**
 * Someone waits for block assembly: a holder that could go on holding (partial.ts, a new block's chain of
 * waves while pieces keep coming) ends instead, so that the waiter is served while its writers go on.
 */
export function assemblyWaited(): boolean {
  return assemblyWaiters.length > 0;
}

/** Reserves n bytes of block assembly if they fit now and nobody waits (else false, nothing reserved). */
export function tryReserveAssembly(n: number): boolean {
  if (assemblyWaiters.length > 0 || (assembling > 0 && assembling + n > ASSEMBLY_BYTES)) return false;
  assembling += n;
  return true;
}

/** Reserves n bytes of block assembly, waiting for releases when they do not fit (undefined: reserved now). */
export function reserveAssembly(n: number): Promise<void> | undefined {
  if (tryReserveAssembly(n)) return undefined;
  return new Promise<void>((resolve) => assemblyWaiters.push({ n, resolve }));
}

/** Gives back n bytes of block assembly (reserved by tryReserveAssembly or reserveAssembly). */
export function releaseAssembly(n: number): void {
  assembling -= n;
  for (let w = assemblyWaiters[0]; w && (assembling === 0 || assembling + w.n <= ASSEMBLY_BYTES); w = assemblyWaiters[0]) {
    assemblyWaiters.shift();
    assembling += w.n;
    w.resolve();
  }
}

/**
 * A new block's content buffer (partial.ts), with the extent [lo, hi) outside which its bytes are all zero
 * (lo >= hi: all zero). Given back with the extent of what it held, it comes back with it: a new block's
 * first wave then zeroes only the part of its gaps within that extent (random 4 KiB writes into new 64 KiB
 * blocks zeroed 60 KiB a block; now about the one piece the buffer held before).
 */
export class FreshBlock {
  constructor(
    readonly buf: Buffer,
    public lo: number,
    public hi: number,
  ) {}
}

/** Free FreshBlocks by log2 of their size (as the free lists above, within the same bytes). */
const freshBySize: FreshBlock[][] = Array.from({ length: 32 }, () => []);

/** A FreshBlock of `size` bytes (a power of two): a free one, or a new zeroed one. */
export function takeFreshBlock(size: number): FreshBlock {
  blockBufferStats.taken += size;
  blockBufferStats.held += size;
  const f = size > 0 && (size & (size - 1)) === 0 ? freshBySize[31 - Math.clz32(size)]!.pop() : undefined;
  if (f) {
    freeBlockBytes -= size;
    return f;
  }
  blockBufferStats.allocated += size;
  return new FreshBlock(Buffer.alloc(size), size, 0);
}

/** Gives a FreshBlock back (its lo, hi as they are: the extent of what it holds). */
export function giveFreshBlock(f: FreshBlock): void {
  const size = f.buf.length;
  blockBufferStats.held -= size;
  if (!(size > 0 && (size & (size - 1)) === 0) || freeBlockBytes + size > FREE_BLOCK_BYTES) return;
  const list = freshBySize[31 - Math.clz32(size)]!;
  if (list.length >= FREE_PER_SIZE) return;
  list.push(f);
  freeBlockBytes += size;
}

/** A buffer of takeBlockBuffer that a failed write may still be reading: not reused, no longer held. */
export function dropBlockBuffer(b: Buffer): void {
  blockBufferStats.held -= b.length;
}

/**
 * Bytes [lo, lo + buf.length) of one block, holding pieces at their places (buf[start - lo]): sized to
 * what the pieces span (a power of two of at least 512 bytes, at most the block), grown as pieces come.
 * `bytes`: the pieces' own bytes, what a writer's admission counts.
 */
export interface Span {
  buf: Buffer;
  lo: number;
  bytes: number;
}

function spanLength(n: number, B: number): number {
  let p = 512;
  while (p < n) p *= 2;
  return Math.min(p, B);
}

/** A span holding only `data` at `start` of a block of B bytes. */
function newSpan(data: Uint8Array, start: number, B: number): Span {
  const len = spanLength(data.length, B);
  const lo = Math.min(start, B - len);
  const buf = takeBlockBuffer(len);
  buf.set(data, start - lo);
  return { buf, lo, bytes: data.length };
}

/**
 * Copies `data` into s at `start` (over what it holds there), growing s when the piece lies outside it;
 * refuses (false, s unchanged) when s would grow beyond twice its pieces' bytes. A grown span's old buffer
 * goes back to the free list: no write may be reading it.
 */
function spanPut(s: Span, data: Uint8Array, start: number, B: number): boolean {
  const end = start + data.length;
  const lo = Math.min(s.lo, start);
  const hi = Math.max(s.lo + s.buf.length, end);
  if (hi - lo > s.buf.length) {
    const len = spanLength(hi - lo, B);
    if (len > 2 * (s.bytes + data.length)) return false;
    const at = start < s.lo ? Math.max(0, hi - len) : Math.min(lo, B - len);
    const buf = takeBlockBuffer(len);
    buf.set(s.buf, s.lo - at);
    giveBlockBuffer(s.buf);
    s.buf = buf;
    s.lo = at;
  }
  s.buf.set(data, start - s.lo);
  s.bytes += data.length;
  return true;
}

/**
 * Copies `data` (at `start` of a block of B bytes) into the last of `spans` that takes it without growing
 * beyond twice its pieces' bytes, or into a new one appended: the span that holds it. Where pieces overlap,
 * a span holds the latest of its own; copying each piece from its span in issue order gives issue order.
 */
export function putInSpans(spans: Span[], data: Uint8Array, start: number, B: number): Span {
  for (let k = spans.length - 1; k >= 0; k--) if (spanPut(spans[k]!, data, start, B)) return spans[k]!;
  const s = newSpan(data, start, B);
  spans.push(s);
  return s;
}
