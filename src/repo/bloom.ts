/**
 * A Bloom filter of chunk ids: what a backup dedupes against when the repository's index is too large to
 * hold as an exact set (formats/repository.md §9, "Deduplicating against a large index"). About 10 bits an
 * id and 7 probes: "no" is certain, "maybe" is wrong for about 1% of the ids never added. The ids are
 * already uniform hashes, so the probes come from their words (double hashing); a seed drawn per filter
 * keeps ids made to collide in one run from colliding in another.
 */
import { randomInt } from 'node:crypto';

const PROBES = 7;
export const BLOOM_BITS_PER_ID = 10;
/**
 * The largest filter: 24 MiB (10 bits an id up to ≈ 20 M ids; past that fewer, so more false "maybe"s,
 * each costing a second read of a new chunk, instead of more memory).
 */
export const BLOOM_MAX_BITS = 24 * 8 * 1024 * 1024;

export class BloomFilter {
  private readonly words: Uint32Array;
  private readonly bits: number;
  private readonly seed = randomInt(0x7fffffff);
  private n = 0;

  /**
   * A filter sized for `expected` ids (at least 64 bits; fewer bits an id make more false "maybe"s). With
   * `bitsPerId` 0 it says "maybe" to every id (tests use it to drive every chunk through the slow path).
   */
  constructor(expected: number, bitsPerId = BLOOM_BITS_PER_ID) {
    const want = Math.max(64, Math.ceil(Math.max(0, expected) * bitsPerId));
    this.bits = Math.min(BLOOM_MAX_BITS, Math.ceil(want / 32) * 32);
    this.words = new Uint32Array(this.bits / 32);
    if (bitsPerId === 0) this.words.fill(0xffffffff); // no room at all: "maybe" to every id
  }

  /** Ids added. */
  get count(): number {
    return this.n;
  }

  /** Bytes of memory the filter holds. */
  get bytes(): number {
    return this.words.byteLength;
  }

  /** Adds the 16-byte id at `at` of `b`. */
  addAt(buf: Buffer, at: number): void {
    let h = (buf.readUInt32LE(at) ^ this.seed) >>> 0;
    const step = (buf.readUInt32LE(at + 8) | 1) >>> 0;
    for (let i = 0; i < PROBES; i++) {
      const bit = h % this.bits;
      this.words[bit >>> 5]! |= 1 << (bit & 31);
      h = (h + step) >>> 0;
    }
    this.n++;
  }

  /** False: the id was never added. True: it probably was. */
  mayHaveAt(buf: Buffer, at: number): boolean {
    let h = (buf.readUInt32LE(at) ^ this.seed) >>> 0;
    const step = (buf.readUInt32LE(at + 8) | 1) >>> 0;
    for (let i = 0; i < PROBES; i++) {
      const bit = h % this.bits;
      if ((this.words[bit >>> 5]! & (1 << (bit & 31))) === 0) return false;
      h = (h + step) >>> 0;
    }
    return true;
  }
}
