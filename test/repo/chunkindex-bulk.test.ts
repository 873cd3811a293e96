/**
 * ChunkIndex's bulk loops (src/repo/chunkindex.ts addEntries, hasAllNonZero; issue 19): what a backup's
 * index load and parent vouch run once per process, in C with the addon (native/kscinc_idtable.c) and in
 * TypeScript without it (KSCINC_NO_NATIVE=1, set here per case). Each way must give the table that addAt
 * entry by entry gives: the same ids, packs and locations, duplicates within and across objects kept once,
 * growth from the smallest table, and every id of a list found (or the first missing one noticed).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { ChunkIndex } from '../../src/repo/chunkindex.js';
import { checkIndex, encodeIndex, type IndexEntry } from '../../src/repo/index-object.js';
import { nativeOps } from '../../src/io/native.js';
import { Rng, seedFor } from '../helpers/rng.js';

const ways = [
  ['native', () => delete process.env['KSCINC_NO_NATIVE']],
  ['TypeScript', () => (process.env['KSCINC_NO_NATIVE'] = '1')],
] as const;
const before = process.env['KSCINC_NO_NATIVE'];
afterEach(() => {
  if (before === undefined) delete process.env['KSCINC_NO_NATIVE'];
  else process.env['KSCINC_NO_NATIVE'] = before;
});

function randomId(rng: Rng): Buffer {
  const b = Buffer.alloc(16);
  for (let i = 0; i < 16; i++) b[i] = rng.int(0, 255);
  return b;
}

/** Index objects of random entries: ids repeated within and across objects, and a few packs each. */
function objects(rng: Rng, count: number, perObject: number): { objects: Buffer[]; entries: IndexEntry[][] } {
  const ids: Buffer[] = [];
  const out: IndexEntry[][] = [];
  for (let o = 0; o < count; o++) {
    const packs = Array.from({ length: rng.int(1, 5) }, () => randomId(rng).toString('hex'));
    const es: IndexEntry[] = [];
    for (let i = 0; i < perObject; i++) {
      const id = rng.chance(0.1) && ids.length > 0 ? ids[rng.int(0, ids.length - 1)]! : randomId(rng);
      ids.push(id);
      es.push({ id, pack: packs[rng.int(0, packs.length - 1)]!, offset: rng.int(0, 0x1fffff) * 0x100000000 + rng.int(0, 0xffffffff), length: rng.int(0, 1 << 30), rawLength: rng.int(0, 1 << 30) });
    }
    out.push(es);
  }
  return { objects: out.map((es) => encodeIndex(es)), entries: out };
}

function bulk(objs: Buffer[], locations: boolean): ChunkIndex {
  const idx = new ChunkIndex({ locations });
  for (const b of objs) {
    const d = checkIndex(b, 'test');
    idx.addEntries(b, d.entriesAt, d.entries, d.packTable);
  }
  return idx;
}

function oneByOne(entries: IndexEntry[][], locations: boolean): ChunkIndex {
  const idx = new ChunkIndex({ locations });
  for (const es of entries) for (const e of es) idx.add(e);
  return idx;
}

describe('ChunkIndex bulk loops', () => {
  for (const [way, set] of ways) {
    it(`addEntries gives what addAt gives, ids only (${way})`, () => {
      set();
      if (way === 'native' && !nativeOps()?.idTableAdd) return void console.log('no addon: the native case is the TypeScript one');
      const rng = new Rng(seedFor(`chunkindex-bulk addEntries ${way}`));
      const { objects: objs, entries } = objects(rng, 7, 1500); // from 1024 slots, grown on the way
      const got = bulk(objs, false);
      const want = oneByOne(entries, false);
      expect(got.size).toBe(want.size);
      for (const es of entries)
        for (const e of es) {
          const s = got.slotOf(e.id);
          if (s < 0 || got.packName(s) !== want.packName(want.slotOf(e.id))) expect.fail(`${e.id.toString('hex')}: slot ${s}`);
        }
      for (let i = 0; i < 2000; i++) if (got.has(randomId(rng))) expect.fail('an id never added is present');
      // A later object's copy of an id already present adds nothing.
      const again = bulk([...objs, objs[0]!], false);
      expect(again.size).toBe(want.size);
    });

    it(`hasAllNonZero: every id of a list found, zero ids skipped, one missing noticed (${way})`, () => {
      set();
      const rng = new Rng(seedFor(`chunkindex-bulk hasAllNonZero ${way}`));
      const { objects: objs, entries } = objects(rng, 3, 3000);
      const idx = bulk(objs, false);
      const ids = entries.flat().map((e) => e.id);
      const list = Buffer.alloc((ids.length + 100) * 16); // 100 zero ids among them
      let at = 0;
      for (let i = 0; i < ids.length; i++) {
        if (i % 31 === 0) at += 16;
        ids[i]!.copy(list, at);
        at += 16;
      }
      const words = new Int32Array(list.buffer, list.byteOffset, list.length / 4);
      expect(idx.hasAllNonZero(words)).toBe(true);
      const missing = randomId(rng);
      missing.copy(list, 16 * rng.int(0, ids.length - 1));
      expect(idx.hasAllNonZero(words)).toBe(false);
      expect(new ChunkIndex({ locations: false }).hasAllNonZero(new Int32Array(64))).toBe(true); // zero ids only
    });
  }

  it('addEntries with locations keeps what addAt keeps: first locations and further copies', () => {
    const rng = new Rng(seedFor('chunkindex-bulk locations'));
    const { objects: objs, entries } = objects(rng, 4, 800);
    const got = bulk(objs, true);
    const want = oneByOne(entries, true);
    expect(got.size).toBe(want.size);
    expect(got.extraCopies).toBe(want.extraCopies);
    for (const e of entries.flat()) {
      const gs = got.copies(got.slotOf(e.id)).map((h) => got.location(h));
      const ws = want.copies(want.slotOf(e.id)).map((h) => want.location(h));
      expect(gs).toEqual(ws);
    }
  });

  it('the native loop refuses entries outside the buffer and pack numbers without a pack', () => {
    const add = nativeOps()?.idTableAdd;
    if (!add) return void console.log('no addon: nothing to check');
    const keys = new Uint32Array(64 * 4);
    const pack = new Uint32Array(64);
    const state = new Uint32Array([0, 44]);
    const entries = new Uint8Array(80);
    expect(() => add(keys, pack, 1, state, entries, 41, 1, new Uint32Array([1]))).toThrow(RangeError);
    entries[16] = 1; // pack number 1 of one pack
    expect(() => add(keys, pack, 1, state, entries, 0, 1, new Uint32Array([1]))).toThrow(RangeError);
    expect(() => add(keys, new Uint32Array(63), 1, state, entries, 0, 1, new Uint32Array([1, 2]))).toThrow(RangeError);
    entries[40] = 7; // the second entry's id differs from the first's
    expect(add(keys, pack, 1, state, entries, 0, 2, new Uint32Array([1, 2]))).toBe(2);
    expect(state[0]).toBe(2);
    state[1] = 2; // full: a third id is not added, and the call says where it stopped
    entries[40] = 8;
    expect(add(keys, pack, 1, state, entries, 40, 1, new Uint32Array([1, 2]))).toBe(0);
    expect(state[0]).toBe(2);
  });
});
