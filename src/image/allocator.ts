/**
 * Host-space allocation for one ksc_inc file. Clusters come from the free list or from the end of the
 * file (bump). Freed clusters wait in `pending` until a flush has made the map change that freed them
 * durable (formats/ksc_inc.md §9 rule 4), so a crash can never leave two blocks pointing at one cluster's data.
 */
export class Allocator {
  private free: number[] = [];
  private pending: { offset: number; epoch: number }[] = [];
  /** 4 KiB pieces for metadata (see allocMeta). */
  private metaPieces: number[] = [];

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
    if (offset % 4096 !== 0) return;
    for (let o = 0; o + 4096 <= bytes; o += 4096) this.metaPieces.push(offset + o);
  }

  /** Gives back clusters that no durable or in-memory entry references (e.g. a failed write's). */
  unusedAgain(offsets: number[]): void {
    this.free.push(...offsets);
  }

  /** A cluster unlinked by a map change made in memory during flush epoch `epoch`. */
  freeAfterFlush(offset: number, epoch: number): void {
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
    for (const o of offsets) this.free.push(o);
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
