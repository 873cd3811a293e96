/**
 * Host-space allocation for one ksc_inc file. Clusters come from the free list or from the end of the
 * file (bump). Freed clusters wait in `pending` until a flush has made the map change that freed them
 * durable (formats/ksc_inc.md §9 rule 4), so a crash can never leave two blocks pointing at one cluster's data.
 *
 * While a deferred leak sweep runs (§8.1), the free list holds only what this session freed, and every
 * cluster the session frees or releases is also noted in `sweepTouched`: such a cluster was referenced when
 * the image was opened (or was allocated since), so the sweep's result must not contain it even when its
 * scan, racing the change that unlinked it, saw nothing referencing it.
 */
export class Allocator {
  private free: number[] = [];
  private pending: { offset: number; epoch: number }[] = [];
  /** 4 KiB pieces for metadata (see allocMeta). */
  private metaPieces: number[] = [];
  /** Cluster indexes this session freed or released while a deferred sweep runs; null when none runs. */
  private sweepTouched: Set<number> | null = null;

  constructor(
    private end: number,
    readonly clusterSize: number,
  ) {}

  get fileEnd(): number {
    return this.end;
  }

  /** Returns `n` cluster offsets: reused free clusters first, the rest one contiguous run at the end. */
  allocClusters(n: number): number[] {
    const out: number[] = [];
    while (out.length < n && this.free.length > 0) out.push(this.free.pop()!);
    if (out.length < n) {
      let pos = alignUp(this.end, this.clusterSize);
      for (; out.length < n; pos += this.clusterSize) out.push(pos);
      this.end = pos;
    }
    return out;
  }

  /**
   * `n` host-contiguous clusters for a write issued at once (datapath.ts writeNow): a free cluster when one
   * is asked for, else a run at the end while the free list is empty. Null when only scattered free
   * clusters would do (the caller takes allocClusters' way then, which reuses them first).
   */
  allocRun(n: number): number | null {
    if (n === 1 && this.free.length > 0) return this.free.pop()!;
    if (this.free.length > 0) return null;
    const pos = alignUp(this.end, this.clusterSize);
    this.end = pos + n * this.clusterSize;
    return pos;
  }

  /**
   * Space for metadata (`bytes` a multiple of 4096), 4096-aligned. A 4 KiB piece (a bitmap page or small
   * table) comes from the pieces of dead metadata (releaseMeta) or is carved out of a free cluster, and a
   * piece of one cluster's size takes a free cluster whole: metadata does not push the end of the file out
   * while space inside it is free (each 4 KiB piece at the end would also cost the next cluster up to a
   * cluster of alignment). Anything else, or `atEnd`, goes at the end of the file.
   */
  allocMeta(bytes: number, atEnd = false): number {
    if (!atEnd && bytes === 4096) {
      if (this.metaPieces.length === 0 && this.free.length > 0) {
        const c = this.free.pop()!;
        for (let o = this.clusterSize - 4096; o >= 0; o -= 4096) this.metaPieces.push(c + o);
      }
      if (this.metaPieces.length > 0) return this.metaPieces.pop()!;
    } else if (!atEnd && bytes === this.clusterSize && this.free.length > 0) {
      return this.free.pop()!;
    }
    const pos = alignUp(this.end, 4096);
    this.end = pos + bytes;
    return pos;
  }

  /**
   * Metadata space nothing references any more, durably (the caller has synced the change that unlinked
   * it): its 4 KiB pieces serve later metadata allocations. Held in memory only; what a crash or a clean
   * close leaves in the pool is found again by the leak sweep (formats/ksc_inc.md §8.1) once whole
   * clusters are free.
   */
  releaseMeta(offset: number, bytes: number): void {
    this.touch(offset, bytes);
    if (offset % 4096 !== 0) return;
    for (let o = 0; o + 4096 <= bytes; o += 4096) this.metaPieces.push(offset + o);
  }

  /** Gives back clusters that no durable or in-memory entry references (e.g. a failed write's). */
  unusedAgain(offsets: number[]): void {
    for (const o of offsets) this.touch(o, 1);
    this.free.push(...offsets);
  }

  /** A cluster unlinked by a map change made in memory during flush epoch `epoch`. */
  freeAfterFlush(offset: number, epoch: number): void {
    this.touch(offset, 1);
    this.pending.push({ offset, epoch });
  }

  /**
   * A flush whose snapshot closed epoch `epoch` completed: returns the clusters freed in it or earlier. The
   * map no longer references them on disk, so the caller may punch them; it hands them back with addFree()
   * afterwards (in between they are in no list, so nothing reuses a cluster while it is being punched).
   */
  released(epoch: number): number[] {
    if (this.pending.length === 0) return [];
    const out: number[] = [];
    const keep: { offset: number; epoch: number }[] = [];
    for (const p of this.pending) {
      if (p.epoch <= epoch) out.push(p.offset);
      else keep.push(p);
    }
    this.pending = keep;
    return out;
  }

  addFree(offsets: Iterable<number>): void {
    for (const o of offsets) {
      this.touch(o, 1);
      this.free.push(o);
    }
  }

  // ---------------------------------------------------------------- the deferred leak sweep (§8.1)

  /** A deferred sweep starts: from now until sweepFinished, note every cluster freed or released. */
  sweepStarted(): void {
    this.sweepTouched = new Set();
  }

  /** Whether a deferred sweep is running (its result not yet handed over). */
  get sweeping(): boolean {
    return this.sweepTouched !== null;
  }

  /**
   * The sweep's leaked clusters, less every cluster this session freed or released meanwhile (referenced at
   * the open, so never leaked): what is safe to reuse. Stops the noting.
   */
  sweepResult(leaked: number[]): number[] {
    const touched = this.sweepTouched;
    this.sweepTouched = null;
    return touched ? leaked.filter((o) => !touched.has(Math.floor(o / this.clusterSize))) : leaked;
  }

  private touch(offset: number, bytes: number): void {
    if (!this.sweepTouched || bytes <= 0) return;
    const last = Math.floor((offset + bytes - 1) / this.clusterSize);
    for (let k = Math.floor(offset / this.clusterSize); k <= last; k++) this.sweepTouched.add(k);
  }

  /** Free clusters as sorted runs (for the free list written at clean close). */
  freeRuns(): { offset: number; count: number }[] {
    const all = [...this.free, ...this.pending.map((p) => p.offset)].sort((a, b) => a - b);
    const runs: { offset: number; count: number }[] = [];
    for (const o of all) {
      const last = runs[runs.length - 1];
      if (last && last.offset + last.count * this.clusterSize === o && last.count < 0xffffffff) last.count++;
      else runs.push({ offset: o, count: 1 });
    }
    return runs;
  }

  get freeCount(): number {
    return this.free.length + this.pending.length;
  }
}

export function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}
