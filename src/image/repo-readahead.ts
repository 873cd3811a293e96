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
 *
 * One window follows one reader. An image has several at once (two processes of a guest, a guest's
 * readahead beside a backup job, nbdcopy's connections), their reads interleaved: ReadaheadStreams keeps up
 * to STREAMS windows, each where its reader is; a read continues the window it lands in (or just past),
 * any other read starts a stream of its own in place of the least recently used one. A stream's batch may
 * be cut short by the caller (`grant`: the image's bound on readahead in flight); the rest is asked for
 * at its reader's next read.
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

  /** Whether a window is going (chunks were asked for ahead of this reader). */
  get active(): boolean {
    return this.next >= 0;
  }

  /** Whether [offset, offset+length) is the last read seen (the same read told twice). */
  isLast(offset: number, length: number): boolean {
    return offset === this.seqStart && offset + length === this.seqEnd;
  }

  /**
   * How far a read at `offset` is from continuing this reader: the bytes between the end of its last read
   * and `offset` when it continues it or lands in its window (0 is best), or -1 when it is another reader's.
   */
  distance(offset: number): number {
    if (this.seqEnd < 0) return -1;
    const C = this.chunkSize;
    const first = Math.floor(offset / C);
    const near = Math.abs(offset - this.seqEnd);
    const continues = near <= C || (offset > this.seqEnd && this.onlyNoFetch(Math.ceil(this.seqEnd / C), first));
    const inWindow = this.next >= 0 && first >= this.start && (first <= this.next || this.onlyNoFetch(this.next, first));
    return continues || inWindow ? near : -1;
  }

  /**
   * A read of [offset, offset+length): the chunks to fetch ahead now, or null. `mayStart` false (a read
   * the image tells of before it knows whether it is local) only keeps a window going: a reader of what the
   * guest wrote itself gets nothing fetched; its reads that go through to the repository start one.
   * `grant`: given the range about to be asked for, returns where the caller takes it up to (from..to; the
   * image's bound on readahead in flight): the rest is asked for again at a later read.
   */
  onRead(offset: number, length: number, mayStart = true, grant?: (r: AheadRange) => number): AheadRange | null {
    if (this.initial <= 0 || length <= 0 || (!mayStart && this.next < 0)) return null;
    if (this.isLast(offset, length)) return null; // told twice
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
    const want = Math.min(this.chunks, last + 1 + this.win);
    const to = from < want && grant ? Math.max(from, Math.min(want, grant({ from, to: want }))) : want;
    if (from < want && to === from) return null; // nothing granted: asked again at the next read
    if (this.next < 0 || first >= this.next) this.start = last + 1;
    this.next = Math.max(to, this.next);
    if (to === want) this.win = Math.min(this.max, this.win * 2);
    return from < to ? { from, to } : null;
  }

  /** Whether every chunk of [a, b) needs no fetch (false for a gap longer than GAP_SCAN). */
  private onlyNoFetch(a: number, b: number): boolean {
    if (b - a > GAP_SCAN) return false;
    for (let k = a; k < b; k++) if (!this.noFetch(k)) return false;
    return true;
  }
}

/** Readers followed at once per image, at most (each its own window). */
export const STREAMS = 8;

/**
 * Up to STREAMS readahead windows of one image, each following one reader (see the top of this file):
 * a read goes to the window it continues or lands in (the nearest when several), else starts a new one in
 * place of the least recently used. A read told without `mayStart` never starts a stream.
 */
export class ReadaheadStreams {
  private readonly wins: ReadaheadWindow[] = [];
  /** When each window was last used (a counter), for least-recently-used replacement. */
  private readonly used: number[] = [];
  private tick = 0;
  private readonly args: ConstructorParameters<typeof ReadaheadWindow>;

  /** Takes what each of its windows is made with (ReadaheadWindow's constructor). */
  constructor(...args: ConstructorParameters<typeof ReadaheadWindow>) {
    this.args = args;
  }

  /** The windows kept now (tests). */
  get count(): number {
    return this.wins.length;
  }

  /** The window sizes of the streams, in chunks (tests). */
  get windows(): number[] {
    return this.wins.map((w) => w.window);
  }

  /** A read of [offset, offset+length): the chunks to fetch ahead now, or null (ReadaheadWindow.onRead). */
  onRead(offset: number, length: number, mayStart = true, grant?: (r: AheadRange) => number): AheadRange | null {
    const initial = this.args[2];
    if (initial <= 0 || length <= 0) return null;
    let best = -1;
    let bestDist = Infinity;
    for (let i = 0; i < this.wins.length; i++) {
      const w = this.wins[i]!;
      if (w.isLast(offset, length)) {
        this.used[i] = ++this.tick; // told twice (the image, then the backing): counts once
        return null;
      }
      const d = w.distance(offset);
      if (d >= 0 && d < bestDist) {
        best = i;
        bestDist = d;
      }
    }
    if (best >= 0) {
      const w = this.wins[best]!;
      if (!mayStart && !w.active) return null;
      this.used[best] = ++this.tick;
      return w.onRead(offset, length, mayStart, grant);
    }
    if (!mayStart) return null;
    // Another reader (or a jump): a stream of its own, in place of the least recently used one.
    const w = new ReadaheadWindow(...this.args);
    let slot = this.wins.length;
    if (slot >= STREAMS) {
      slot = 0;
      for (let i = 1; i < this.used.length; i++) if (this.used[i]! < this.used[slot]!) slot = i;
    }
    this.wins[slot] = w;
    this.used[slot] = ++this.tick;
    w.onRead(offset, length, true);
    return null;
  }
}
