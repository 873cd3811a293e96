/** BitSet against a Set<number> model under random operations (the backup engine's chunk sets). */
import { describe, expect, it } from 'vitest';
import { BitSet } from '../../src/util/bitset.js';
import { Rng, seedFor } from '../helpers/rng.js';

const seed = seedFor('test/util/bitset.test.ts');

describe('BitSet', () => {
  it('matches a Set model: add, addRange, delete, has, count, ordered values', () => {
    const rng = new Rng(seed);
    for (let round = 0; round < 40; round++) {
      const size = rng.int(0, 3) === 0 ? rng.int(0, 70) : rng.int(1, 5000);
      const b = new BitSet(size);
      const model = new Set<number>();
      for (let op = 0; op < 300; op++) {
        const r = rng.int(0, 9);
        if (size === 0) break;
        if (r < 4) {
          const k = rng.int(0, size - 1);
          expect(b.add(k), `seed ${seed}`).toBe(!model.has(k));
          model.add(k);
        } else if (r < 6) {
          const first = rng.int(-40, size + 40),
            last = first + rng.int(-1, 200);
          b.addRange(first, last);
          for (let k = Math.max(0, first); k <= Math.min(size - 1, last); k++) model.add(k);
        } else if (r < 8) {
          const k = rng.int(-2, size + 2);
          expect(b.delete(k)).toBe(model.delete(k));
        } else {
          const k = rng.int(-2, size + 2);
          expect(b.has(k)).toBe(model.has(k));
        }
        expect(b.count, `seed ${seed}`).toBe(model.size);
      }
      const sorted = [...model].sort((x, y) => x - y);
      expect([...b], `seed ${seed}`).toEqual(sorted);
      const from = rng.int(0, size + 1);
      expect([...b.values(from)]).toEqual(sorted.filter((k) => k >= from));
    }
  });

  it('handles bit 31 of a word and a size that is not a multiple of 32', () => {
    const b = new BitSet(65);
    for (const k of [31, 0, 64, 32, 63]) b.add(k);
    expect([...b]).toEqual([0, 31, 32, 63, 64]);
    b.addRange(0, 100);
    expect(b.count).toBe(65);
    expect(() => b.add(65)).toThrow(RangeError);
    expect(() => b.add(1.5)).toThrow(RangeError);
  });
});
