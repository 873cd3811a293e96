/**
 * ChunkList with a SegmentStore (segments beyond a small cache wait in a temporary file) against the same
 * operations on an all-in-memory list: sets, clones sharing segments, reads, ordered visits, Merkle roots.
 */
import { describe, expect, it } from 'vitest';
import { initHash } from '../../src/hash/chunkid.js';
import { ChunkList, SEGMENT_IDS, SegmentStore } from '../../src/repo/chunklist.js';
import { Rng, seedFor } from '../helpers/rng.js';

const seed = seedFor('test/repo/chunklist-store.test.ts');

describe('ChunkList with a segment store', () => {
  it('behaves as the in-memory list under random operations, holding at most the cache in memory', async () => {
    await initHash();
    const rng = new Rng(seed);
    const length = 4 * SEGMENT_IDS + rng.int(1, SEGMENT_IDS - 1);
    const store = new SegmentStore(2);
    try {
      // Pairs of (spilled list, model list); clones are made in step.
      const pairs: [ChunkList, ChunkList][] = [[new ChunkList(length, store), new ChunkList(length)]];
      const id = Buffer.alloc(16);
      for (let op = 0; op < 4000; op++) {
        const [a, m] = pairs[rng.int(0, pairs.length - 1)]!;
        const r = rng.int(0, 99);
        if (r < 70) {
          const k = rng.int(0, length - 1);
          if (rng.int(0, 4) === 0) id.fill(0);
          else rng.bytes(16).copy(id);
          a.set(k, id);
          m.set(k, id);
        } else if (r < 90) {
          const k = rng.int(0, length - 1);
          expect(a.view(k).equals(m.view(k)), `seed ${seed}: chunk ${k}`).toBe(true);
          expect(a.isZero(k)).toBe(m.isZero(k));
        } else if (r < 93 && pairs.length < 4) {
          pairs.push([a.clone(), m.clone()]);
        } else if (r < 96) {
          const seen: string[] = [];
          const want: string[] = [];
          a.forEachNonZero((k, v) => void seen.push(`${k}:${v.toString('hex')}`));
          m.forEachNonZero((k, v) => void want.push(`${k}:${v.toString('hex')}`));
          expect(seen, `seed ${seed}`).toEqual(want);
        } else {
          expect(a.merkleRoot().equals(m.merkleRoot()), `seed ${seed}`).toBe(true);
          expect(a.nonZeroCount()).toBe(m.nonZeroCount());
        }
        expect(store.cached).toBeLessThanOrEqual(2);
      }
      for (const [a, m] of pairs) {
        expect(a.toBuffer().equals(m.toBuffer()), `seed ${seed}`).toBe(true);
        expect(a.merkleRoot().equals(m.merkleRoot())).toBe(true);
      }
      expect(store.writes, 'nothing went to the file').toBeGreaterThan(0);
      expect(store.reads, 'nothing came back from the file').toBeGreaterThan(0);
    } finally {
      store.close();
    }
  });

  it('opens its file only when a segment must leave memory; refuses use after close', async () => {
    await initHash();
    const small = new SegmentStore(2);
    const l = new ChunkList(2 * SEGMENT_IDS, small);
    l.set(1, Buffer.alloc(16, 1));
    l.set(SEGMENT_IDS + 1, Buffer.alloc(16, 2));
    expect([small.writes, small.fileBytes]).toEqual([0, 0]);
    small.close();
    const store = new SegmentStore(1);
    const a = new ChunkList(3 * SEGMENT_IDS, store);
    a.set(0, Buffer.alloc(16, 1));
    a.set(SEGMENT_IDS, Buffer.alloc(16, 2)); // the first segment goes to the file
    expect(store.fileBytes).toBe(SEGMENT_IDS * 16);
    store.close();
    expect(() => a.view(0)).toThrow(/after close/);
  });

  it('keeps the views a visit hands out valid while other segments come and go', async () => {
    await initHash();
    const store = new SegmentStore(1);
    try {
      const a = new ChunkList(3 * SEGMENT_IDS, store);
      const b = new ChunkList(3 * SEGMENT_IDS, store);
      for (let si = 0; si < 3; si++) {
        a.set(si * SEGMENT_IDS + 5, Buffer.alloc(16, si + 1));
        b.set(si * SEGMENT_IDS + 7, Buffer.alloc(16, si + 10));
      }
      const got: string[] = [];
      a.forEachNonZero((k, v) => {
        expect(b.view(Math.floor(k / SEGMENT_IDS) * SEGMENT_IDS + 7)[0]).toBe(Math.floor(k / SEGMENT_IDS) + 10); // evicts a's segment
        got.push(`${k}:${v[0]}`);
      });
      expect(got).toEqual([`5:1`, `${SEGMENT_IDS + 5}:2`, `${2 * SEGMENT_IDS + 5}:3`]);
    } finally {
      store.close();
    }
  });
});
