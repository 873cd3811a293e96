/**
 * The in-place pieces of partial.ts's groups: those that joined in one turn of the event loop are issued at
 * its end, each run without a gap as one write of the turn's span (see partial.ts's header).
 */
import { BlockState } from '../../format/constants.js';
import { type Span, dropBlockBuffer, giveBlockBuffer } from './block-buffers.js';
import type { KscCore } from './core.js';
import { type Group, type Member, finish } from './partial-group.js';

/** In-place pieces of one turn: their bytes at their places in one span, written as runs. */
interface Turn {
  span: Span;
  /** Runs not settled yet; the buffer goes back once all are written (dropped if one failed). */
  left: number;
  failed: boolean;
}

/**
 * Issues the in-place pieces that joined the group in this turn: their bytes lie at their places in the
 * turn's spans (join copied them there), and each run of pieces that follow each other without a gap
 * (sequential writes arrive that way) is one write of that buffer's span. The pieces overlap none of each
 * other nor any in flight (the join rule), so the order of the writes does not matter. The native writes of
 * one turn go to the pool as one job either way (HostFile.writeWithCrcs); this saves a call, a promise and a
 * pwrite per piece.
 */
export function submitInPlace(c: KscCore, g: Group): void {
  const all = g.open!;
  const spans = g.openSpans;
  g.open = null;
  g.openSpans = [];
  if (spans.length === 1) submitSpan(c, g, all, spans[0]!);
  else
    for (const s of spans)
      submitSpan(
        c,
        g,
        all.filter((m) => m.span === s),
        s,
      );
}

/** Issues the pieces whose bytes lie in span s, each run without a gap as one write. */
function submitSpan(c: KscCore, g: Group, pieces: Member[], s: Span): void {
  let ms = pieces;
  const turn: Turn = { span: s, left: 0, failed: false };
  for (let k = 1; k < ms.length; k++) {
    if (ms[k]!.start < ms[k - 1]!.start) {
      ms = [...ms].sort((x, y) => x.start - y.start);
      break;
    }
  }
  const runs: [Member[], number, number][] = [];
  for (let k = 0; k < ms.length;) {
    const first = ms[k]!;
    let end = first.end;
    let j = k + 1;
    while (j < ms.length && ms[j]!.start === end) end = ms[j++]!.end;
    runs.push([j === k + 1 ? [first] : ms.slice(k, j), first.start, end]);
    k = j;
  }
  turn.left = runs.length;
  for (const [run, from, to] of runs) writeRun(c, g, run, turn, from, to);
}

/**
 * Writes one run of in-place pieces (their bytes are block bytes [from, to) of the turn's span) and settles them as change() would;
 * the turn's buffer goes back once its last run is written.
 */
function writeRun(c: KscCore, g: Group, run: Member[], turn: Turn, from: number, to: number): void {
  const at = g.host + from;
  const data = turn.span.buf.subarray(from - turn.span.lo, to - turn.span.lo);
  let io: Promise<unknown>;
  try {
    io = c.file.writeWithCrcs ? c.file.writeWithCrcs(data, at, data.length) : c.file.write(data, at);
  } catch (e) {
    io = Promise.reject(e);
  }
  io.then(
    () => {
      let err: unknown = undefined;
      try {
        const page = c.map.page(Math.floor(g.block / 4096))!;
        if (page.csumValid[g.block % 4096] === 1) c.map.set(g.block, BlockState.Data, g.host, 0, false);
        if (g.bitmaps) for (const b of g.bitmaps) for (const m of run) b.mark(m.offset, m.length);
      } catch (e) {
        err = e;
      }
      // The last run: the buffer goes back, or is dropped when an earlier run of the turn failed.
      if (--turn.left === 0) (turn.failed ? dropBlockBuffer : giveBlockBuffer)(turn.span.buf);
      for (const m of run) finish(c, g, m);
      for (const m of run) m.done(err);
    },
    (e: unknown) => {
      // A failed write may leave its buffer still being read by the pool: the turn's buffer is dropped, not reused.
      turn.failed = true;
      if (--turn.left === 0) dropBlockBuffer(turn.span.buf);
      for (const m of run) finish(c, g, m);
      for (const m of run) m.done(e);
    },
  );
}
