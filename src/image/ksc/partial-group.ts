/**
 * The groups of partial.ts: the writes of part of one block taken together (in place, or a new block's
 * chain of waves), per image; how a member ends and how a group ends (see partial.ts's header).
 */
import type { SparseBitmap } from '../sparse-bitmap.js';
import { type FreshBlock, type Span, dropBlockBuffer, giveBlockBuffer, giveFreshBlock, releaseAssembly } from './block-buffers.js';
import type { KscCore } from './core.js';

export interface Member {
  offset: number;
  length: number;
  /** In-block [start, end) of the bytes. */
  start: number;
  end: number;
  intent: boolean;
  fua: boolean;
  done: (e: unknown) => void;
  /** In place, or queued for a new block's next wave: the span that holds its bytes. */
  span?: Span;
}

export class Group {
  /** A new block's first wave is being assembled: pieces copy straight into blk. */
  assembling: boolean;
  readonly fresh: boolean;
  /** In place: the writes in flight. A new block: the wave being assembled or written. */
  members: Member[] = [];
  /** In place: the pieces that joined in this turn, not yet issued (submitInPlace issues them at its end). */
  open: Member[] | null = null;
  /**
   * In place: the spans the open pieces' bytes are copied into, at their places; a piece that would make
   * every one of them more than twice its pieces' bytes takes a new one (memory stays about the pieces').
   */
  openSpans: Span[] = [];
  /** A new block: the pieces queued for the wave after the one being written. */
  next: Member[] = [];
  /** A new block: the queued pieces' bytes at their places, in issue order (later ones over earlier ones). */
  nextSpans: Span[] = [];
  /** A new block: c.epoch when its map entry was last set valid (-1: not yet). */
  validEpoch = -1;

  constructor(
    readonly block: number,
    readonly host: number,
    /** A new block's content (its chain's buffer); null for an in-place group. */
    public blk: FreshBlock | null,
    readonly bitmaps: SparseBitmap[] | null,
    readonly release: () => void,
  ) {
    this.fresh = this.assembling = blk !== null;
  }
}

/** Per image: its groups by block, and its enabled bitmaps as of bitmapsGeneration `gen` (null: none). */
export interface State {
  groups: Map<number, Group>;
  enabled: SparseBitmap[] | null;
  gen: number;
}

export const states = new WeakMap<KscCore, State>();

/** Ends a member as change() would (intent range, in-flight count), and an in-place group with its last member. */
export function finish(c: KscCore, g: Group, m: Member): void {
  if (m.intent) c.intent.end(m.offset, m.length, c.epoch);
  if (!g.fresh) {
    // An in-place group's members are in no order that matters (overlap checks, the count): swap-remove.
    const ms = g.members;
    const k = ms.indexOf(m);
    if (k >= 0) {
      ms[k] = ms[ms.length - 1]!;
      ms.pop();
    }
    if (g.members.length === 0) endGroup(c, g);
  }
  c.leaveChange();
}

/** `ok`: the block buffer is no longer used by any write (false after a failed one: it is dropped, not reused). */
export function endGroup(c: KscCore, g: Group, ok = true): void {
  states.get(c)?.groups.delete(g.block);
  if (g.blk) {
    if (ok) giveFreshBlock(g.blk);
    else dropBlockBuffer(g.blk.buf);
  }
  for (const s of g.nextSpans) giveBlockBuffer(s.buf); // the pool never reads them
  g.blk = null;
  g.nextSpans = [];
  if (g.fresh) releaseAssembly(c.blockSize); // reserved by join with the block's buffer
  g.release();
}
