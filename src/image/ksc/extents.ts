/**
 * The allocation view of a ksc_inc image: extents through the backing chain (data / zero / hole, with
 * chain depth), this layer's per-block states, and dropping blocks of this layer after a commit.
 */
import { BlockState } from '../../format/constants.js';
import { DAMAGED } from '../maptable.js';
import { type Extent, assertRange, mergeExtents } from '../types.js';
import type { KscCore } from './core.js';
import { flush } from './flush.js';

export interface BlockInfo {
  state: BlockState;
  host: number;
  csum: number;
  csumValid: boolean;
}

export async function extents(c: KscCore, offset: number, length: number): Promise<Extent[]> {
  c.live();
  assertRange(c, offset, length);
  const out: Extent[] = [];
  const end = offset + length;
  const B = c.blockSize;
  let pos = offset;
  let unallocStart = -1;
  const flushUnalloc = async (upto: number): Promise<void> => {
    if (unallocStart < 0) return;
    out.push(...(await backingExtents(c, unallocStart, upto - unallocStart)));
    unallocStart = -1;
  };
  while (pos < end) {
    const block = Math.floor(pos / B);
    const p = Math.floor(block / 4096);
    if (c.map.pageAbsent(p)) {
      const pageEnd = Math.min(end, (p + 1) * 4096 * B);
      if (unallocStart < 0) unallocStart = pos;
      pos = pageEnd;
      continue;
    }
    await c.map.ensure(block, block);
    const page = c.map.page(p)!;
    const state = page.state[block % 4096]!;
    if (state === DAMAGED) throw c.map.damagedError(block);
    const next = Math.min(end, (block + 1) * B);
    if (state === BlockState.Unallocated) {
      if (unallocStart < 0) unallocStart = pos;
    } else {
      await flushUnalloc(pos);
      out.push({ offset: pos, length: next - pos, state: state === BlockState.Data ? 'data' : 'zero', depth: 0 });
    }
    pos = next;
  }
  await flushUnalloc(end);
  return mergeExtents(out);
}

async function backingExtents(c: KscCore, offset: number, length: number): Promise<Extent[]> {
  const b = c.backingDev;
  const inside = b ? Math.max(0, Math.min(length, b.size - offset)) : 0;
  const out: Extent[] = [];
  if (inside > 0) {
    for (const e of await b!.extents(offset, inside)) out.push({ ...e, depth: e.depth === null ? null : e.depth + 1 });
  }
  if (inside < length) out.push({ offset: offset + inside, length: length - inside, state: 'unallocated', depth: null });
  return out;
}

/** Per-block view of this layer only (no backing). */
export async function blockState(c: KscCore, block: number): Promise<BlockInfo> {
  await c.map.ensure(block, block);
  const page = c.map.page(Math.floor(block / 4096))!;
  const i = block % 4096;
  return { state: page.state[i]!, host: page.host[i]!, csum: page.csum[i]!, csumValid: page.csumValid[i] === 1 };
}

/** Blocks whose state in this layer is not UNALLOCATED, skipping absent pages. */
export async function* allocatedBlocks(c: KscCore): AsyncGenerator<BlockInfo & { block: number }> {
  for (let p = 0; p < c.map.directoryEntries; p++) {
    if (c.map.pageAbsent(p)) continue;
    await c.map.ensure(p * 4096, p * 4096);
    const page = c.map.page(p)!;
    for (let i = 0; i < 4096; i++) {
      if (page.state[i] === DAMAGED) throw c.map.damagedError(p * 4096 + i);
      if (page.state[i] !== BlockState.Unallocated) {
        yield { block: p * 4096 + i, state: page.state[i]!, host: page.host[i]!, csum: page.csum[i]!, csumValid: page.csumValid[i] === 1 };
      }
    }
  }
}

/**
 * Makes the given blocks of this layer UNALLOCATED (after commit). Their clusters are punched and become
 * reusable only once the flush at the end has made the new entries durable (§9 rule 4): a crash before
 * leaves every entry pointing at its intact data, a crash after leaves the clusters leaked (§8.1).
 */
export async function dropBlocks(c: KscCore, which: Set<number>): Promise<void> {
  c.writable();
  const release = await c.locks.acquire(0, c.blocks, true);
  try {
    const held: { block: number; state: BlockState; host: number }[] = [];
    for await (const b of allocatedBlocks(c)) if (which.has(b.block)) held.push(b);
    // One intent region at a time (not the whole disk: a 16 TiB disk has millions of regions).
    const regionBlocks = 2 ** (c.header.intentBits - c.blockBits);
    for (let i = 0; i < held.length;) {
      const region = Math.floor(held[i]!.block / regionBlocks);
      const start = region * regionBlocks * c.blockSize;
      const len = Math.min(regionBlocks * c.blockSize, c.size - start);
      await c.intent.begin(start, len);
      try {
        for (; i < held.length && Math.floor(held[i]!.block / regionBlocks) === region; i++) {
          const b = held[i]!;
          c.map.set(b.block, BlockState.Unallocated, 0, 0, false);
          if (b.state === BlockState.Data) c.alloc.freeAfterFlush(b.host, c.epoch);
        }
      } finally {
        c.intent.end(start, len, c.epoch);
      }
    }
  } finally {
    release();
  }
  await flush(c);
}
