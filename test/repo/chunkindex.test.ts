/**
 * ChunkIndex (src/repo/chunkindex.ts), the in-memory union of the index objects, against a Map model: ids
 * at random, ids repeated (the first location stays first, every other distinct location is kept as a copy), ids that share the words the table hashes (long
 * probe runs), growth past many doublings, lookups by Buffer and by hex, and ids that are not there.
 */
import { describe, expect, it } from 'vitest';
import { crc32 } from 'node:zlib';
import { ChunkIndex } from '../../src/repo/chunkindex.js';
import { IndexDecoder, decodeIndex, encodeIndex, visitIndex, type IndexEntry } from '../../src/repo/index-object.js';
import { Rng, seedFor } from '../helpers/rng.js';

function randomId(rng: Rng): Buffer {
  const b = Buffer.alloc(16);
  for (let i = 0; i < 16; i++) b[i] = rng.int(0, 255);
  return b;
}

describe('ChunkIndex', () => {
  it('answers like a Map of hex id → first location, across growth and colliding ids', () => {
    const rng = new Rng(seedFor('test/repo/chunkindex.test.ts'));
    const idx = new ChunkIndex();
    const model = new Map<string, { pack: string; offset: number; length: number; rawLength: number }>();
    /** Every distinct location (pack, offset) of each id, in the order added: all are kept as copies. */
    const copies = new Map<string, { pack: string; offset: number; length: number; rawLength: number }[]>();
    const packs = Array.from({ length: 37 }, () => randomId(rng).toString('hex'));
    const ids: Buffer[] = [];
    for (let n = 0; n < 60_000; n++) {
      let id: Buffer;
      const kind = rng.int(0, 9);
      if (kind === 0 && ids.length > 0)
        id = ids[rng.int(0, ids.length - 1)]!; // again: the first location stays
      else if (kind === 1 && ids.length > 0) {
        // The same first and last words as an earlier id (what the slot is computed from), other middle words.
        id = Buffer.from(ids[rng.int(0, ids.length - 1)]!);
        id.writeUInt32LE(rng.int(0, 0xffffffff), 4 + 4 * rng.int(0, 1));
      } else id = randomId(rng);
      ids.push(id);
      const loc = {
        pack: packs[rng.int(0, packs.length - 1)]!,
        offset: rng.int(0, 0x1fffff) * 0x100000000 + rng.int(0, 0xffffffff),
        length: rng.int(0, 0xffffffff),
        rawLength: rng.int(0, 0xffffffff),
      };
      idx.add({ id, ...loc });
      const hex = id.toString('hex');
      if (!model.has(hex)) model.set(hex, loc);
      const l = copies.get(hex) ?? [];
      if (!l.some((c) => c.pack === loc.pack && c.offset === loc.offset)) l.push(loc);
      copies.set(hex, l);
      if (rng.chance(0.01)) idx.add({ id, ...loc }); // the same location again (an index object read twice): no new copy
    }
    expect(idx.size).toBe(model.size);
    let extra = 0;
    for (const [hex, want] of copies) {
      const s = idx.slotOf(hex);
      const hs = idx.copies(s);
      if (hs.some((h) => idx.slotOfCopy(h) !== s || idx.idAt(h).toString('hex') !== hex) || idx.copyCount(s) !== want.length) expect.fail(`copies of ${hex}`);
      if (want.length > 1 || rng.chance(0.05))
        expect(
          hs.map((h) => idx.location(h)),
          hex,
        ).toEqual(want);
      extra += want.length - 1;
    }
    expect(idx.extraCopies).toBe(extra);
    expect(extra).toBeGreaterThan(1000);
    for (const [hex, loc] of model) {
      const id = Buffer.from(hex, 'hex');
      expect(idx.get(id), hex).toEqual(loc);
      expect(idx.get(hex), hex).toEqual(loc);
      expect(idx.has(id) && idx.has(hex), hex).toBe(true);
    }
    expect(new Set(idx.packList())).toEqual(new Set([...model.values()].map((l) => l.pack)));
    for (let n = 0; n < 5000; n++) {
      const id = randomId(rng);
      const hex = id.toString('hex');
      if (model.has(hex)) continue;
      expect(idx.has(id), hex).toBe(false);
      expect(idx.get(hex), hex).toBeUndefined();
    }
  });

  it('ids that are not 16 bytes or 32 hex digits are never present', () => {
    const idx = new ChunkIndex();
    const id = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    idx.add({ id, pack: 'ab'.repeat(16), offset: 1, length: 2, rawLength: 3 });
    expect(idx.has(id.toString('hex'))).toBe(true);
    expect(idx.has(id.toString('hex').toUpperCase())).toBe(false); // ids are written in lower case (§6)
    expect(idx.has(Buffer.concat([id, Buffer.alloc(1)]))).toBe(false);
    for (const bad of ['', '00112233', `${id.toString('hex')}00`, `zz${id.toString('hex').slice(2)}`, id.toString('hex').slice(0, 31) + 'g', id.toString('hex').replace(/a/g, '\u0161')]) {
      expect(idx.has(bad), JSON.stringify(bad)).toBe(false);
    }
    expect(idx.has(id.subarray(0, 15))).toBe(false);
    expect(idx.has(Buffer.alloc(16))).toBe(false);
  });

  it('addAt with an id that does not lie whole inside the buffer is a RangeError, and adds nothing', () => {
    // Callers bound the position; this is the defence behind them: a byte read past a Buffer's end is
    // undefined, which the word arithmetic would have taken as 0 (an id padded with zeros added silently).
    const idx = new ChunkIndex();
    const buf = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const pack = 'ab'.repeat(16);
    for (const at of [1, 15, 16, -1, 0.5, Number.NaN, 2 ** 32]) {
      expect(() => idx.addAt(buf, at, pack, 0, 1, 1), `at ${at}`).toThrow(RangeError);
    }
    expect(() => idx.addAt(buf.subarray(0, 15), 0, pack, 0, 1, 1)).toThrow(RangeError);
    expect(idx.size).toBe(0);
    expect(idx.packList()).toEqual([]);
    idx.addAt(Buffer.concat([Buffer.alloc(3), buf]), 3, pack, 0, 1, 1);
    expect(idx.has(buf)).toBe(true);
    expect(idx.size).toBe(1);
  });

  it('without locations: a set of ids (has, hasAt, packs), and asking for a location is an error', () => {
    const rng = new Rng(seedFor('test/repo/chunkindex.test.ts ids-only'));
    const set = new ChunkIndex({ locations: false });
    const full = new ChunkIndex();
    const ids = Array.from({ length: 5000 }, () => randomId(rng));
    ids.forEach((id, i) => {
      const e = { id, pack: `${(i % 7).toString(16)}`.padStart(32, '0'), offset: i, length: 1, rawLength: 2 };
      set.add(e);
      full.add(e);
    });
    expect(set.size).toBe(full.size);
    expect([...set.packList()].sort()).toEqual([...full.packList()].sort());
    const both = Buffer.concat([randomId(rng), ids[1234]!]);
    expect(set.hasAt(both, 16)).toBe(true);
    expect(set.hasAt(both, 0)).toBe(false);
    for (const id of ids) expect(set.has(id)).toBe(true);
    expect(() => set.get(ids[0]!)).toThrow(/without locations/);
    expect(() => set.blobOffset(set.slotOf(ids[0]!))).toThrow(/without locations/);
  });

  it('visitIndex visits what decodeIndex returns, and nothing when an entry is bad', () => {
    const rng = new Rng(seedFor('test/repo/chunkindex.test.ts visitIndex'));
    const packs = [randomId(rng).toString('hex'), randomId(rng).toString('hex')];
    const entries: IndexEntry[] = Array.from({ length: 50 }, (_, i) => ({ id: randomId(rng), pack: packs[i % 2]!, offset: i * 1000, length: 900 + i, rawLength: 1 << 20 }));
    const obj = encodeIndex(entries);
    const seen: IndexEntry[] = [];
    visitIndex(obj, 'index/x.idx', (b, at, pack, offset, length, rawLength) => seen.push({ id: Buffer.from(b.subarray(at, at + 16)), pack, offset, length, rawLength }));
    expect(seen).toEqual(decodeIndex(obj, 'index/x.idx'));
    expect(seen).toEqual(entries);
    // An offset above 2^53 in the last entry (checksum re-sealed, so only the entry check can catch it).
    const bad = Buffer.from(obj);
    const last = bad.length - 40;
    bad.writeUInt32LE(0x00200000, last + 28);
    bad.writeUInt32LE(crc32(bad.subarray(32), crc32(bad.subarray(0, 28))), 28);
    let visited = 0;
    expect(() => visitIndex(bad, 'index/x.idx', () => visited++)).toThrow(/index\/x\.idx.*blob offset .* above 2\^53/);
    expect(visited).toBe(0);
  });

  it('IndexDecoder fed in runs of any size gives what decodeIndex gives; damage is named with the entry number', () => {
    const seed = seedFor('test/repo/chunkindex.test.ts IndexDecoder');
    const rng = new Rng(seed);
    const packs = Array.from({ length: 5 }, () => randomId(rng).toString('hex'));
    const entries: IndexEntry[] = Array.from({ length: 300 }, (_, i) => ({
      id: randomId(rng),
      pack: packs[rng.int(0, 4)]!,
      offset: 16 + i * 4096,
      length: rng.int(33, 4096),
      rawLength: rng.int(1, 1 << 20),
    }));
    const obj = encodeIndex(entries);
    /** Feeds `b` to a decoder in runs of 1 … 40 entries; returns what it visited before end() and whether end() passed. */
    const feed = (b: Buffer): { seen: IndexEntry[]; ok: boolean; error?: string } => {
      const d = new IndexDecoder(b.subarray(0, 32), b.length, 'index/y.idx');
      d.table(b.subarray(d.tableAt, d.entriesAt));
      const seen: IndexEntry[] = [];
      try {
        for (let i = 0; i < d.entries;) {
          const n = Math.min(rng.int(1, 40), d.entries - i);
          const run = Buffer.from(b.subarray(d.entriesAt + i * 40, d.entriesAt + (i + n) * 40)); // a separate buffer, as a ranged read gives
          d.checksum(run);
          d.visit(run, 0, n, i, (rb, at, pack, offset, length, rawLength) => seen.push({ id: Buffer.from(rb.subarray(at, at + 16)), pack, offset, length, rawLength }));
          i += n;
        }
        d.end();
        return { seen, ok: true };
      } catch (e) {
        return { seen, ok: false, error: (e as Error).message };
      }
    };
    for (let round = 0; round < 5; round++) expect(feed(obj), `seed ${seed}`).toEqual({ seen: decodeIndex(obj, 'x'), ok: true });
    // visitIds: the same ids and packs, without the locations.
    const d = new IndexDecoder(obj.subarray(0, 32), obj.length, 'index/y.idx');
    d.table(obj.subarray(d.tableAt, d.entriesAt));
    const idsSeen: string[] = [];
    for (let i = 0; i < d.entries; i += 64) {
      const n = Math.min(64, d.entries - i);
      const run = Buffer.from(obj.subarray(d.entriesAt + i * 40, d.entriesAt + (i + n) * 40));
      d.checksum(run);
      d.visitIds(run, 0, n, i, (rb, at, pack) => idsSeen.push(rb.toString('hex', at, at + 16) + pack));
    }
    d.end();
    expect(idsSeen).toEqual(entries.map((e) => e.id.toString('hex') + e.pack));
    // Entry 250 names pack 5 of 5 (checksum re-sealed): refused naming entry 250, after the entries before it.
    const badPack = Buffer.from(obj);
    badPack.writeUInt32LE(5, 32 + 5 * 16 + 250 * 40 + 16);
    badPack.writeUInt32LE(crc32(badPack.subarray(32), crc32(badPack.subarray(0, 28))), 28);
    const r = feed(badPack);
    expect(r.ok).toBe(false);
    expect(r.error).toMatch(/index\/y\.idx: entry 250 names pack number 5 of 5/);
    expect(r.seen.length).toBeLessThanOrEqual(250);
    expect(() => decodeIndex(badPack, 'x')).toThrow(/entry 250 names pack number 5 of 5/);
    // One id byte flipped: every entry is seen, then end() refuses the checksum.
    const flipped = Buffer.from(obj);
    flipped[32 + 5 * 16 + 7 * 40 + 3]! ^= 1;
    const f = feed(flipped);
    expect(f).toMatchObject({ ok: false, error: expect.stringMatching(/checksum mismatch/) });
    expect(f.seen.length).toBe(300);
  });
});
