/**
 * A fixed-size set of the whole numbers 0 … size-1, one bit each. The backup engine keeps its sets of chunk
 * numbers in these: a 16 TiB disk of 1 MiB chunks is 2 MiB a set, where a Set<number> of the same
 * 16 M chunks would take hundreds of MiB of heap.
 */
export class BitSet {
  private readonly words: Uint32Array;
  private n = 0;

  constructor(readonly size: number) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`bit set size ${size}`);
    this.words = new Uint32Array(Math.ceil(size / 32));
  }

  /** Number of members. */
  get count(): number {
    return this.n;
  }

  has(k: number): boolean {
    if (!(k >= 0 && k < this.size)) return false;
    return (this.words[k >>> 5]! & (1 << (k & 31))) !== 0;
  }

  /** Adds `k`; false when it was there already. */
  add(k: number): boolean {
    if (!(k >= 0 && k < this.size && Number.isInteger(k))) throw new RangeError(`${k} is outside the bit set of ${this.size}`);
    const w = k >>> 5,
      bit = 1 << (k & 31);
    if (this.words[w]! & bit) return false;
    this.words[w]! |= bit;
    this.n++;
    return true;
  }

  /** Adds first … last (inclusive, clipped to the set). */
  addRange(first: number, last: number): void {
    const a = Math.max(0, first),
      b = Math.min(this.size - 1, last);
    for (let k = a; k <= b; k++) {
      if ((k & 31) === 0 && k + 31 <= b && this.words[k >>> 5] === 0) {
        // a whole empty word at once
        this.words[k >>> 5] = 0xffffffff;
        this.n += 32;
        k += 31;
        continue;
      }
      this.add(k);
    }
  }

  delete(k: number): boolean {
    if (!this.has(k)) return false;
    this.words[k >>> 5]! &= ~(1 << (k & 31));
    this.n--;
    return true;
  }

  /** Members in ascending order, from `from` on (empty words skipped 32 at a time). */
  *values(from = 0): Generator<number> {
    const words = this.words;
    for (let w = Math.max(0, from) >>> 5; w < words.length; w++) {
      let x = words[w]!;
      if (x === 0) continue;
      while (x !== 0) {
        const low = x & -x;
        const k = w * 32 + (31 - Math.clz32(low));
        x ^= low;
        if (k >= from) yield k;
      }
    }
  }

  [Symbol.iterator](): Generator<number> {
    return this.values();
  }
}
