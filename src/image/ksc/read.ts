/**
 * Reads of a ksc_inc image (formats/ksc_inc.md §5, §4.2): under shared block-range locks, so a change's
 * copy-on-write stays invisible to them; adjacent I/O coalesced; unallocated blocks read from the backing
 * (zeros past its end, or without one). And hostSpans: where a range lies in host files now, for a reply
 * sent without reading.
 */
import { corrupt } from '../../errors.js';
import { BlockState } from '../../format/constants.js';
import type { HostSpan } from '../capabilities.js';
import { DAMAGED } from '../maptable.js';
import { assertRange } from '../types.js';
import type { KscCore } from './core.js';

export async function readInto(c: KscCore, offset: number, target: Buffer): Promise<void> {
  c.live();
  assertRange(c, offset, target.length);
  if (target.length === 0) return;
  const release = await c.lockBlocks(offset, target.length, false);
  try {
    await readLocked(c, offset, target);
  } finally {
    release();
  }
}

/** Reads with the caller holding at least shared locks on the blocks. Coalesces adjacent I/O. */
async function readLocked(c: KscCore, offset: number, target: Buffer): Promise<void> {
  const segs = c.segments(offset, target.length);
  await c.map.ensure(segs[0]!.block, segs[segs.length - 1]!.block);
  const io: Promise<void>[] = [];
  let run: { kind: 'data' | 'backing'; at: number; host: number; length: number } | null = null;
  const flushRun = (): void => {
    if (!run) return;
    const r = run;
    run = null;
    const dst = target.subarray(r.at, r.at + r.length);
    io.push(r.kind === 'data' ? readHost(c, r.host, dst) : readBacking(c, offset + r.at, dst));
  };
  for (const s of segs) {
    const page = c.map.page(Math.floor(s.block / 4096))!;
    const i = s.block % 4096;
    const state = page.state[i]!;
    if (state === DAMAGED) throw c.map.damagedError(s.block);
    if (state === BlockState.Data) {
      const host = page.host[i]! + s.inBlock;
      if (run?.kind === 'data' && run.host + run.length === host && run.at + run.length === s.at) run.length += s.length;
      else {
        flushRun();
        run = { kind: 'data', at: s.at, host, length: s.length };
      }
    } else if (state === BlockState.Unallocated && c.backingDev) {
      if (run?.kind === 'backing' && run.at + run.length === s.at) run.length += s.length;
      else {
        flushRun();
        run = { kind: 'backing', at: s.at, host: 0, length: s.length };
      }
    } else {
      flushRun();
      target.fill(0, s.at, s.at + s.length);
    }
  }
  flushRun();
  await Promise.all(io);
}

async function readHost(c: KscCore, host: number, dst: Buffer): Promise<void> {
  const n = await c.file.read(dst, host);
  if (n < dst.length) throw corrupt(c.name, 'data', `cluster at 0x${host.toString(16)} is past the end of the file (truncated image)`);
}

/** Reads [offset, offset+dst.length) of the backing; past its end reads zeros. */
export async function readBacking(c: KscCore, offset: number, dst: Buffer): Promise<void> {
  const b = c.backingDev;
  const avail = b ? Math.max(0, Math.min(dst.length, b.size - offset)) : 0;
  if (avail > 0) await b!.readInto(offset, dst.subarray(0, avail));
  if (avail < dst.length) dst.fill(0, avail);
}

/**
 * Where [offset, offset+length) lies in host files now (capabilities.ts HostSpans), for a reply sent before
 * the event loop turns: the image's own clusters, the backing's spans, zeros. Null, so the caller reads
 * the usual way, when a map page is not in memory, a change holds or waits for one of the blocks (the
 * shared lock is taken and given back at once: nothing runs in between), a block is damaged, or the
 * backing cannot tell. Clusters freed by a change are reused only after a flush, which also waits for
 * the event loop: the spans stay right until then.
 */
export function hostSpans(c: KscCore, offset: number, length: number): HostSpan[] | null {
  const fd = c.closed ? null : (c.file.readFd?.() ?? null);
  if (fd === null || length <= 0 || offset < 0 || offset + length > c.size) return null;
  const B = c.blockSize;
  const release = c.locks.tryAcquire(Math.floor(offset / B), Math.floor((offset + length - 1) / B), false);
  if (!release) return null;
  try {
    const out: HostSpan[] = [];
    const push = (f: number, position: number, n: number): void => {
      const l = out[out.length - 1];
      if (l && l.fd === f && (f === -1 || l.position + l.length === position)) l.length += n;
      else out.push({ fd: f, position: f === -1 ? 0 : position, length: n });
    };
    let backing: { at: number; length: number } | null = null;
    const flushBacking = (): boolean => {
      if (!backing) return true;
      const { at, length: n } = backing;
      backing = null;
      const b = c.backingDev!;
      const avail = Math.max(0, Math.min(n, b.size - at));
      if (avail > 0) {
        const sub = b.readsFrom?.hostSpans(at, avail);
        if (!sub) return false;
        for (const s of sub) push(s.fd, s.position, s.length);
      }
      if (avail < n) push(-1, 0, n - avail);
      return true;
    };
    for (const s of c.segments(offset, length)) {
      const page = c.map.page(Math.floor(s.block / 4096));
      if (!page) return null;
      const i = s.block % 4096;
      const state = page.state[i]!;
      if (state === BlockState.Unallocated && c.backingDev) {
        if (backing) backing.length += s.length;
        else backing = { at: offset + s.at, length: s.length };
        continue;
      }
      if (!flushBacking() || state === DAMAGED) return null;
      if (state === BlockState.Data) push(fd, page.host[i]! + s.inBlock, s.length);
      else push(-1, 0, s.length);
    }
    return flushBacking() ? out : null;
  } finally {
    release();
  }
}
