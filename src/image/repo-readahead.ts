/**
 * Readahead of a live restore's backing (src/image/repobacking.ts, issue 18): which chunks to fetch ahead
 * of a sequential reader. The image tells the backing of every read (KscImage.onRead, installed by open.ts
 * with the fill), local or not, so a window keeps going while the reader reads chunks already filled (only
 * reads that go through to the repository start one);
 * a backing used without that hook sees only the reads that go through to the repository, so a read also
 * counts as sequential when it lands inside the window fetched ahead or just past it (the reader went
 * through the filled chunks unseen). The same read told twice (the hook, then the backing) counts once.
 *
 * The chunks ahead are asked for in batches: when fewer than half a window remains ahead of the reader,
 * the next chunks up to a full window ahead, so the repository is read in coalesced runs rather than one
 * chunk per read. The window starts at `initial` chunks (KSCINC_LIVE_READAHEAD, default 4) and doubles
 * with each batch, up to `max`, while the reader stays sequential (a jump starts it again). Chunks that
 * need no fetch (zero chunks, the local base's: `noFetch`) are never read through to the repository (an
 * NBD client is told they are holes), so a read that lands past a run of them is still sequential.
 */

/** Chunks of a gap looked at, at most, to see whether it all needs no fetch (a longer gap is a jump). */
const GAP_SCAN = 4096;

/** Chunks [from, to) to fetch ahead. */
export interface AheadRange {
  from: number;
  to: number;
}

export class ReadaheadWindow {
  /** Where the last read seen began and ended (bytes), or -1. */
  private seqStart = -1;
  private seqEnd = -1;
  /** The chunks asked for ahead: [start, next), or next = -1 when none. */
  private start = -1;
  private next = -1;
  private win: number;

  constructor(
    private readonly chunkSize: number,
    private readonly chunks: number,
    private readonly initial: number,
    private readonly max: number,
    /** Whether chunk k needs no fetch (zero, or the local base's). */
    private readonly noFetch: (k: number) => boolean = () => false,
  ) {
    this.win = initial;
  }

  /** The current window size in chunks (tests). */
  get window(): number {
    return this.win;
  }

  /**
   * A read of [offset, offset+length): the chunks to fetch ahead now, or null. `mayStart` false (a read
   * the image tells of before it knows whether it is local) only keeps a window going: a reader of what the
   * guest wrote itself gets nothing fetched; its reads that go through to the repository start one.
   */
  onRead(offset: number, length: number, mayStart = true): AheadRange | null {
    if (this.initial <= 0 || length <= 0 || (!mayStart && this.next < 0)) return null;
    if (offset === this.seqStart && offset + length === this.seqEnd) return null; // told twice
    const C = this.chunkSize;
    const first = Math.floor(offset / C);
    const last = Math.floor((offset + length - 1) / C);
    const continues = this.seqEnd >= 0 && (Math.abs(offset - this.seqEnd) <= C || (offset > this.seqEnd && this.onlyNoFetch(Math.ceil(this.seqEnd / C), first)));
    const inWindow = this.next >= 0 && first >= this.start && (first <= this.next || this.onlyNoFetch(this.next, first));
    this.seqStart = offset;
    this.seqEnd = offset + length;
    if (!continues && !inWindow) {
      // A jump: start again from the initial window at the next sequential read.
      this.win = this.initial;
      this.start = this.next = -1;
      return null;
    }
    const ahead = this.next >= 0 && this.next > last ? this.next - last - 1 : 0;
    if (ahead * 2 >= this.win && this.next >= 0) return null;
    const from = Math.max(last + 1, this.next);
    const to = Math.min(this.chunks, last + 1 + this.win);
    if (this.next < 0 || first >= this.next) this.start = last + 1;
    this.next = Math.max(to, this.next);
    this.win = Math.min(this.max, this.win * 2);
    return from < to ? { from, to } : null;
  }

  /** Whether every chunk of [a, b) needs no fetch (false for a gap longer than GAP_SCAN). */
  private onlyNoFetch(a: number, b: number): boolean {
    if (b - a > GAP_SCAN) return false;
    for (let k = a; k < b; k++) if (!this.noFetch(k)) return false;
    return true;
  }
}
