/**
 * A map page's decode (src/image/maptable.ts; issue 19): in C with the addon (native/kscinc_pages.c) and in
 * TypeScript without it (KSCINC_NO_NATIVE=1, set here per case). Both must give, for pages mixing every kind
 * of sound entry with every kind of damage formats/ksc_inc.md §5.2 names, the same states, host offsets,
 * checksums and checksum flags, and the same DAMAGED entries with the same messages. A bitmap page's decode
 * (src/image/sparse-bitmap.ts) in C gives the bits sealWords vouches for and stops at the first bad record.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { MapTable, type MapPage } from '../../src/image/maptable.js';
import type { HostFile } from '../../src/io/file.js';
import { nativeOps } from '../../src/io/native.js';
import { BlockState, BITMAP_PAGE_BYTES, DESC_CSUM_VALID, MAP_PAGE_BYTES, MAP_PAGE_ENTRIES, TAG_DIR, TAG_MAP, WORDS_PER_PAGE, tagBitmapWord } from '../../src/format/constants.js';
import { fillEmpty16, seal, sealWords } from '../../src/format/seal.js';
import { Rng, seedFor } from '../helpers/rng.js';

const before = process.env['KSCINC_NO_NATIVE'];
afterEach(() => {
  if (before === undefined) delete process.env['KSCINC_NO_NATIVE'];
  else process.env['KSCINC_NO_NATIVE'] = before;
});

const BLOCK = 65536;
const PAGES = 3;
/** The disk ends inside the last page, so entries past it exist. */
const BLOCKS = 2 * MAP_PAGE_ENTRIES + 1000;
const END = 8192 + 3 * MAP_PAGE_BYTES + 50_000 * BLOCK;

/** One entry's words, sealed unless `badSeal`. */
function entry(buf: Buffer, i: number, block: number, lo: number, hi: number, csum: number, badSeal = false): void {
  const o = i * 16;
  buf.writeUInt32LE(lo >>> 0, o);
  buf.writeUInt32LE(hi >>> 0, o + 4);
  buf.writeUInt32LE(csum >>> 0, o + 8);
  seal(buf.subarray(o, o + 16), TAG_MAP, block);
  if (badSeal) buf[o + 12 + (block % 4)]! ^= 1 << (block % 8);
}

/** A page of random entries: sound ones of each state, and each kind of damage. */
function page(rng: Rng, p: number): Buffer {
  const buf = Buffer.alloc(MAP_PAGE_BYTES);
  for (let i = 0; i < MAP_PAGE_ENTRIES; i++) {
    const block = p * MAP_PAGE_ENTRIES + i;
    const host = (rng.int(1, 40_000) * BLOCK) / 4096; // in 4 KiB units
    const at = (h: number): [number, number] => [(h % 0x100000) * 4096, Math.floor(h / 0x100000)];
    const [dlo, dhi] = at(host);
    const csum = rng.u32();
    const kind = rng.int(0, 15);
    if (kind === 0) entry(buf, i, block, 0, 0, 0);
    else if (kind === 1) entry(buf, i, block, BlockState.Zero, 0, 0);
    else if (kind <= 4) entry(buf, i, block, dlo + BlockState.Data + (rng.chance(0.5) ? DESC_CSUM_VALID : 0), dhi, csum);
    else if (kind === 5)
      entry(buf, i, block, dlo + BlockState.Data, dhi, csum, true); // seal mismatch
    else if (kind === 6)
      entry(buf, i, block, 3, 0, 0); // state 3
    else if (kind === 7)
      entry(buf, i, block, dlo + BlockState.Data + 8 * rng.int(1, 511), dhi, csum); // reserved bits
    else if (kind === 8)
      entry(buf, i, block, BlockState.Data, 0x200000 + rng.int(0, 5), csum); // offset too large
    else if (kind === 9)
      entry(buf, i, block, dlo + BlockState.Data + 4096, dhi, csum); // misaligned
    else if (kind === 10)
      entry(buf, i, block, 4096 + BlockState.Data, 0, csum); // inside the header
    else if (kind === 11)
      entry(buf, i, block, BlockState.Data, Math.floor(END / 2 ** 32) + 1, csum); // past the file's end
    else if (kind === 12)
      entry(buf, i, block, dlo + BlockState.Zero, dhi, 0); // zero with an offset
    else if (kind === 13)
      entry(buf, i, block, DESC_CSUM_VALID, 0, 0); // unallocated with a checksum flag
    else if (kind === 14)
      entry(buf, i, block, ((END - BLOCK / 2) % 2 ** 32) - ((END - BLOCK / 2) % 4096) + BlockState.Data, Math.floor((END - BLOCK / 2) / 2 ** 32), csum); // runs past the end
    else entry(buf, i, block, rng.chance(0.5) ? BlockState.Zero : dlo + BlockState.Data, rng.chance(0.5) ? 0 : dhi, csum); // past the disk's end when block ≥ BLOCKS
  }
  return buf;
}

/** The map of a file holding `pages` at 8192 + p × MAP_PAGE_BYTES. */
function table(pages: Buffer[]): MapTable {
  const dir = MapTable.emptyDirectory(pages.length);
  pages.forEach((_, p) => {
    dir.writeBigUInt64LE(BigInt(8192 + p * MAP_PAGE_BYTES), p * 16);
    seal(dir.subarray(p * 16, p * 16 + 16), TAG_DIR, p);
  });
  const file: HostFile = {
    path: 'test.ksc',
    writable: false,
    read: async (buf, position) => {
      const p = (position - 8192) / MAP_PAGE_BYTES;
      pages[p]!.copy(buf);
      return MAP_PAGE_BYTES;
    },
  } as HostFile;
  return new MapTable(file, dir, 4096, BLOCK, BLOCKS, () => END);
}

function view(p: MapPage): unknown {
  return { state: [...p.state], host: [...p.host], csum: [...p.csum], csumValid: [...p.csumValid], damaged: [...(p.damaged ?? new Map())] };
}

describe('map and bitmap page decode', () => {
  it('the addon has mapPageDecode and bitmapPageDecode', () => {
    if (process.env['KSCINC_NO_NATIVE'] === '1') return;
    expect(typeof nativeOps()?.mapPageDecode).toBe('function');
    expect(typeof nativeOps()?.bitmapPageDecode).toBe('function');
  });

  it('C and TypeScript decode pages of sound and damaged entries alike', async () => {
    const seed = seedFor('map-decode-native');
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const pages = Array.from({ length: PAGES }, (_, p) => page(rng, p));
    const empty = Buffer.alloc(MAP_PAGE_BYTES);
    fillEmpty16(empty, TAG_MAP, 0);
    const got: unknown[][] = [];
    for (const off of [false, true]) {
      if (off) process.env['KSCINC_NO_NATIVE'] = '1';
      else delete process.env['KSCINC_NO_NATIVE'];
      const map = table(pages);
      await map.ensure(0, PAGES * MAP_PAGE_ENTRIES - 1);
      got.push(Array.from({ length: PAGES }, (_, p) => view(map.page(p)!)));
    }
    const [native, ts] = got as [{ damaged: [number, string][]; state: number[] }[], unknown[]];
    expect(native).toEqual(ts);
    // Every kind is there: sound entries of each state, and damage of each kind.
    const messages = native.flatMap((p) => p.damaged.map(([, m]) => m.replace(/.*\) /, '').replace(/0x[0-9a-f]+/, 'X')));
    expect(new Set(messages)).toEqual(
      new Set([
        'checksum mismatch',
        'has an invalid descriptor',
        'is past the end of the disk but allocated',
        'points at cluster X, outside the file or misaligned',
        'has an offset or checksum flag without data',
      ]),
    );
    for (const s of [BlockState.Unallocated, BlockState.Zero, BlockState.Data]) expect(native[0]!.state).toContain(s);
  });

  it("C's bitmap page decode: the bits of sound records, -1; else the first record whose zero word or seal is wrong", () => {
    const decode = nativeOps()?.bitmapPageDecode;
    if (!decode) return; // KSCINC_NO_NATIVE=1: sparse-bitmap.ts's own loop, which the image tests run
    const seed = seedFor('page-decode-native bitmap');
    const rng = new Rng(seed);
    const p = 3;
    const tag = tagBitmapWord(rng.int(0, 7));
    const raw = Buffer.alloc(BITMAP_PAGE_BYTES);
    for (let w = 0; w < WORDS_PER_PAGE; w++) {
      const [lo, hi] = [rng.u32(), rng.u32()];
      raw.writeUInt32LE(lo, w * 16);
      raw.writeUInt32LE(hi, w * 16 + 4);
      raw.writeUInt32LE(sealWords(tag, p * WORDS_PER_PAGE + w, lo, hi, 0), w * 16 + 12);
    }
    const bits = new Uint32Array(2 * WORDS_PER_PAGE);
    expect(decode(raw, p * WORDS_PER_PAGE, tag, bits)).toBe(-1);
    for (let w = 0; w < WORDS_PER_PAGE; w++) expect([bits[2 * w], bits[2 * w + 1]]).toEqual([raw.readUInt32LE(w * 16), raw.readUInt32LE(w * 16 + 4)]);
    // Another page's index or another slot's tag: the first record fails.
    expect(decode(raw, (p + 1) * WORDS_PER_PAGE, tag, bits)).toBe(0);
    expect(decode(raw, p * WORDS_PER_PAGE, tag + 256, bits)).toBe(0);
    for (const [w, at, bit] of [
      [rng.int(1, WORDS_PER_PAGE - 1), 8, rng.int(0, 31)], // the zero word set (the seal still as stored)
      [rng.int(1, WORDS_PER_PAGE - 1), rng.int(0, 7), rng.int(0, 31)], // a bit word flipped
      [rng.int(1, WORDS_PER_PAGE - 1), 12, rng.int(0, 31)], // the seal flipped
    ] as const) {
      const bad = Buffer.from(raw);
      const o = w * 16 + (at === 8 || at === 12 ? at : at & 4);
      bad.writeUInt32LE((bad.readUInt32LE(o) ^ (1 << bit)) >>> 0, o);
      expect(decode(bad, p * WORDS_PER_PAGE, tag, bits), `record ${w} at +${o % 16}`).toBe(w);
    }
  });
});
