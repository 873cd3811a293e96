/**
 * One pass of a migration (the first pass, or a round over the frozen bits) sent in offset order, with the
 * resume cursor of formats/migrate.md §10 moved forwards as the destination makes it durable: at most every
 * CHECKPOINT_BYTES or CHECKPOINT_MS, everything queued is acknowledged, every destination connection is
 * FLUSHed, and only then the record `kscinc-migrate#ID@STAGE<cursor>` is written (one bitmap management
 * step of the source image). Without a destination id (not a kscinc destination) nothing is recorded.
 */
import type { DirtyBitmaps } from '../image/capabilities.js';
import { migrateKillPoint } from '../util/killpoint.js';
import type { MigrationTarget, Sender } from './migrate-send.js';
import { setProgress, type Stage } from './migrate-state.js';

/** Largest piece between two chances to checkpoint. */
const PIECE = 1024 * 1024;
export const CHECKPOINT_BYTES = 64 * 1024 * 1024;
export const CHECKPOINT_MS = 500;

export interface Range {
  offset: number;
  length: number;
  /** Known to read as zeros (sent as WRITE_ZEROES without reading). */
  zero?: boolean;
}

export interface PassContext {
  sender: Sender;
  target: MigrationTarget;
  bitmaps: DirtyBitmaps;
  /** The destination's incoming id; null: no cursor is recorded. */
  id: string | null;
  /** True when the pass should stop at the next piece (a cancel). */
  stopped: () => boolean;
  /** Called with each piece's length once it is queued. */
  onQueued?: (n: number) => void;
}

/** The parts of `ranges` at or above `cursor`. */
export function fromCursor<R extends Range>(ranges: R[], cursor: number): R[] {
  return ranges.flatMap((r) => (r.offset + r.length <= cursor ? [] : r.offset >= cursor ? [r] : [{ ...r, offset: cursor, length: r.offset + r.length - cursor }]));
}

/**
 * The acknowledged prefix of a pass: pieces are issued in offset order and acknowledged in any order; `mark`
 * is the end of the longest run of issued pieces all acknowledged (the cursor a FLUSH can make durable).
 */
class Watermark {
  mark: number;
  private readonly order: [number, number][] = [];
  private head = 0;
  private readonly acked = new Set<number>();

  constructor(start: number) {
    this.mark = start;
  }

  onIssued(o: number, n: number): void {
    this.order.push([o, o + n]);
  }

  onAcked(o: number): void {
    this.acked.add(o);
    while (this.head < this.order.length && this.acked.has(this.order[this.head]![0])) {
      const [start, end] = this.order[this.head++]!;
      this.acked.delete(start);
      this.mark = end;
    }
  }
}

/** FLUSHes the destination, then records `cursor` (§10 rule 2); without an id only waits for what is queued. */
export async function checkpoint(ctx: PassContext, stage: Stage, cursor: number): Promise<void> {
  if (!ctx.id) return ctx.sender.drain();
  await ctx.target.flush();
  migrateKillPoint(`checkpoint-${stage}`);
  await setProgress(ctx.bitmaps, { id: ctx.id, stage, cursor });
}

/**
 * Sends `ranges` (ascending, clipped to the device) as pass `stage`, checkpointing the acknowledged prefix
 * on the way (without waiting for what is in flight). Returns false when stopped early; on true every piece
 * was acknowledged.
 */
export async function sendPass(ctx: PassContext, stage: Stage, ranges: Range[]): Promise<boolean> {
  const w = new Watermark(ranges[0]?.offset ?? 0);
  let recorded = w.mark;
  let last = performance.now();
  // One checkpoint at a time runs beside the sending (its FLUSH and record take a while on a busy host).
  let running: Promise<void> | null = null;
  let failure: unknown = null;
  const maybeCheckpoint = (): void => {
    if (failure) throw failure;
    if (!ctx.id || running || w.mark <= recorded || (w.mark - recorded < CHECKPOINT_BYTES && performance.now() - last < CHECKPOINT_MS)) return;
    const at = w.mark;
    last = performance.now();
    running = checkpoint(ctx, stage, at).then(
      () => void ((recorded = at), (running = null)),
      (e: unknown) => void ((failure = e), (running = null)),
    );
  };
  try {
    for (const r of ranges) {
      for (let pos = r.offset, end = r.offset + r.length; pos < end; pos += PIECE) {
        if (ctx.stopped()) return false;
        const n = Math.min(PIECE, end - pos);
        await ctx.sender.send(pos, n, !!r.zero, w);
        ctx.onQueued?.(n);
        maybeCheckpoint();
      }
    }
    await ctx.sender.drain();
  } finally {
    await running;
  }
  if (failure) throw failure;
  return true;
}
