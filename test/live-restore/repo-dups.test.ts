/** DuplicateChunks (src/image/repo-dups.ts): the ring of positions holding the same index slot. */
import { describe, expect, it } from 'vitest';
import { DuplicateChunks } from '../../src/image/repo-dups.js';

describe('DuplicateChunks', () => {
  it('lists the other positions of a chunk in order after it, wrapping, leaving out positions never fetched', async () => {
    // Slots: position k holds slot k % 4, except 6 (a zero chunk: not fetched) and 9 (not indexed).
    const d = new DuplicateChunks();
    await d.build(
      12,
      8,
      (k) => k !== 6,
      (k) => (k === 9 ? -1 : k % 4),
      () => false,
    );
    expect(d.ready).toBe(true);
    expect(d.others(5, 16, () => true)).toEqual([1]); // 9 left out
    expect(d.others(1, 16, () => true)).toEqual([5]);
    expect(d.others(2, 16, () => true)).toEqual([10]); // 6 left out
    expect(d.others(7, 16, () => true)).toEqual([11, 3]);
    expect(d.others(11, 16, () => true)).toEqual([3, 7]);
    expect(d.others(11, 1, () => true)).toEqual([3]);
    expect(d.others(11, 16, (j) => j !== 3)).toEqual([7]);
    expect(d.others(6, 16, () => true)).toEqual([]);
    expect(d.others(9, 16, () => true)).toEqual([]);
  });

  it('a chunk held a thousand times: the walk stops after 4 × max positions looked at', async () => {
    const d = new DuplicateChunks();
    await d.build(
      1000,
      2,
      () => true,
      () => 0,
      () => false,
    );
    let looked = 0;
    const got = d.others(0, 4, () => (looked++, false));
    expect(got).toEqual([]);
    expect(looked).toBe(16);
    expect(d.others(0, 4, () => true)).toEqual([1, 2, 3, 4]);
  });

  it('no position shares its chunk: not ready, nothing listed', async () => {
    const d = new DuplicateChunks();
    await d.build(
      40000,
      65536,
      () => true,
      (k) => k,
      () => false,
    );
    expect(d.ready).toBe(false);
    expect(d.others(3, 16, () => true)).toEqual([]);
  });
});
