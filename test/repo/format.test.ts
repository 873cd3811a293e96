/**
 * Manifest chunk lists (formats/repository.md §7.2, §7.5): the segmented form writers produce, the older
 * plain and IDS_LZ4 forms readers still read, the in-memory ChunkList (zero segments unallocated,
 * copy-on-write clones), the segment-wise Merkle root, and corrupt lists refused with the object named.
 */
import { describe, expect, it } from 'vitest';
import { crc32 } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { initHash, merkleRoot } from '../../src/hash/chunkid.js';
import { compressInto, lz4Bound } from '../../src/compress/lz4.js';
import { encodeManifest, decodeManifest, readManifestFrom } from '../../src/repo/manifest.js';
import { FLAG_IDS_LZ4, FLAG_IDS_SEGMENTED } from '../../src/repo/constants.js';
import { ChunkList, SEGMENT_IDS } from '../../src/repo/chunklist.js';
import { encodeManifestLegacy } from '../helpers/manifest.js';
import { Rng, seedFor } from '../helpers/rng.js';

const meta = { id: '20261126T120000000Z-0000abcd', parent: null, tags: [], source: 'd', bitmap: null, stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksDirty: 0, durationMs: 0 } };
const disk = '6b736369-6e63-4000-8000-000000000001';
const MiB = 2 ** 20;
const manifestOf = (ids: ChunkList, full = false) => ({ full, disk, timeMs: 1, size: ids.length * MiB, chunkSize: MiB, bitmapToken: null, meta, ids });

/** The ids of a manifest's segmented section: where it starts and ends in the object. */
function section(b: Buffer): { start: number; end: number } {
  return { start: 96 + b.readUInt32LE(52), end: b.length - 32 };
}

/** Rebuilds a manifest with another chunk-id section (and optionally flags), CRC recomputed: only content checks can catch it. */
function withSection(b: Buffer, sec: Buffer, flags?: number): Buffer {
  const { start, end } = section(b);
  const out = Buffer.concat([b.subarray(0, start), sec, b.subarray(end)]);
  if (flags !== undefined) out.writeUInt32LE(flags, 12);
  const t = out.length - 32;
  out.writeUInt32LE(crc32(out.subarray(0, t + 24)), t + 24);
  return out;
}

describe('ChunkList', () => {
  it('zero segments are not allocated; set, get, isZero, counts and iteration', async () => {
    await initHash();
    const l = new ChunkList(3 * SEGMENT_IDS + 10);
    expect([l.segmentCount, l.allocatedSegments(), l.nonZeroCount()]).toEqual([4, 0, 0]);
    const a = randomBytes(16),
      b = randomBytes(16);
    l.set(5, a);
    l.set(3 * SEGMENT_IDS + 9, b);
    l.set(SEGMENT_IDS + 1, Buffer.alloc(16)); // a zero id in a zero segment allocates nothing
    expect([l.allocatedSegments(), l.nonZeroCount()]).toEqual([2, 2]);
    expect(l.get(5).equals(a)).toBe(true);
    expect(l.isZero(5)).toBe(false);
    expect(l.isZero(6)).toBe(true);
    expect(l.isZero(SEGMENT_IDS + 1)).toBe(true);
    const seen: [number, string][] = [];
    l.forEachNonZero((k, id) => void seen.push([k, id.toString('hex')]));
    expect(seen).toEqual([
      [5, a.toString('hex')],
      [3 * SEGMENT_IDS + 9, b.toString('hex')],
    ]);
    // The same without a view per id (the buffer holding it and where), and a stop after the first.
    const at: [number, string][] = [];
    l.forEachNonZeroAt((k, buf, o) => void at.push([k, buf.toString('hex', o, o + 16)]));
    expect(at).toEqual(seen);
    let calls = 0;
    l.forEachNonZeroAt(() => ++calls > 1);
    expect(calls).toBe(1);
    l.set(5, Buffer.alloc(16)); // the segment's last non-zero id: freed
    expect([l.allocatedSegments(), l.nonZeroCount()]).toEqual([1, 1]);
    expect(() => l.set(l.length, a)).toThrow(RangeError);
    expect(() => l.get(-1)).toThrow(RangeError);
  });

  it('clones share segments copy-on-write both ways', async () => {
    await initHash();
    const p = new ChunkList(4 * SEGMENT_IDS);
    const ids = Array.from({ length: 4 }, () => randomBytes(16));
    ids.forEach((id, i) => p.set(i * SEGMENT_IDS + 7, id));
    const before = p.toBuffer();
    const c = p.clone();
    expect(c.equals(p)).toBe(true);
    const x = randomBytes(16);
    c.set(SEGMENT_IDS + 7, x); // the child's change copies that segment only
    c.set(2 * SEGMENT_IDS + 7, Buffer.alloc(16)); // and dropping a shared segment's last id frees it in the child only
    expect(p.toBuffer().equals(before)).toBe(true);
    expect(c.get(SEGMENT_IDS + 7).equals(x)).toBe(true);
    expect([p.allocatedSegments(), c.allocatedSegments()]).toEqual([4, 3]);
    p.set(7, x); // and the parent's change does not reach the child
    expect(c.get(7).equals(ids[0]!)).toBe(true);
    expect(c.segment(3)).toBe(p.segment(3)); // untouched segments stay shared
  });

  it('the segment-wise Merkle root equals §7.3 over the flat list (random lengths and contents)', async () => {
    await initHash();
    const seed = seedFor('test/repo/format.test.ts');
    const rng = new Rng(seed);
    const rnd = (): number => rng.float();
    const lengths = [0, 1, 2, 255, 256, 257, 4096, SEGMENT_IDS - 1, SEGMENT_IDS, SEGMENT_IDS + 1, 2 * SEGMENT_IDS, 3 * SEGMENT_IDS + 300];
    for (let i = 0; i < 4; i++) lengths.push(1 + Math.floor(rnd() * 5 * SEGMENT_IDS));
    for (const n of lengths) {
      for (const density of [0, 0.0001, 0.5]) {
        const flat = Buffer.alloc(n * 16);
        for (let k = 0; k < n; k++) if (rnd() < density) randomBytes(16).copy(flat, k * 16);
        const l = ChunkList.fromBuffer(flat);
        expect(l.merkleRoot().toString('hex'), `seed ${seed}, ${n} ids, density ${density}`).toBe(merkleRoot(flat).toString('hex'));
        expect(l.toBuffer().equals(flat)).toBe(true);
      }
    }
  });
});

describe('manifest chunk lists', () => {
  it('writers store segments: ZERO without payload, sparse ones LZ4, dense ones RAW; all decode to the same list', async () => {
    await initHash();
    const l = new ChunkList(3 * SEGMENT_IDS + 100);
    for (const k of [0, 5, 40000]) l.set(k, randomBytes(16)); // segment 0: sparse
    for (let k = 2 * SEGMENT_IDS; k < 3 * SEGMENT_IDS; k++) l.set(k, randomBytes(16)); // segment 2: dense; segment 1: zero
    l.set(l.length - 1, randomBytes(16)); // segment 3 (100 ids): sparse
    const b = encodeManifest(manifestOf(l, true));
    expect(b.readUInt32LE(12)).toBe(1 | FLAG_IDS_SEGMENTED);
    const { start } = section(b);
    expect([b.readUInt32LE(start), b.readUInt32LE(start + 4)]).toEqual([SEGMENT_IDS, 4]);
    const table = [0, 1, 2, 3].map((i) => [b[start + 8 + 8 * i], b.readUInt32LE(start + 12 + 8 * i)]);
    expect(table.map(([e]) => e)).toEqual([2, 0, 1, 2]);
    expect(table[1]![1]).toBe(0);
    expect(table[2]![1]).toBe(SEGMENT_IDS * 16);
    expect(b.length).toBeLessThan(SEGMENT_IDS * 16 + 64 * 1024);
    const m = decodeManifest(b, 'm');
    expect(m.ids.equals(l)).toBe(true);
    expect(m.ids.allocatedSegments()).toBe(3);
    expect(m.root.equals(merkleRoot(l.toBuffer()))).toBe(true);
    // An empty disk: no segments at all.
    const e = decodeManifest(encodeManifest({ ...manifestOf(new ChunkList(0)), size: 0 }), 'm');
    expect([e.ids.length, e.root.equals(Buffer.alloc(16))]).toEqual([0, true]);
  });

  it('the older plain and IDS_LZ4 forms are still read', async () => {
    await initHash();
    const chunks = 1 << 16; // 64 GiB at 1 MiB chunks
    const ids = Buffer.alloc(chunks * 16);
    for (const k of [0, 5, 40000, chunks - 1]) randomBytes(16).copy(ids, k * 16);
    const m = { ...manifestOf(new ChunkList(chunks)), ids };
    const lz = encodeManifestLegacy(m, 'lz4');
    expect(lz.readUInt32LE(12) & FLAG_IDS_LZ4).toBe(FLAG_IDS_LZ4);
    expect(lz.length).toBeLessThan(ids.length / 50);
    const d = decodeManifest(lz, 'm');
    expect(d.ids.toBuffer().equals(ids)).toBe(true);
    expect(d.ids.allocatedSegments()).toBe(1);
    const small = encodeManifestLegacy({ ...m, size: 4 * MiB, ids: ids.subarray(0, 64) }, 'plain');
    expect(small.readUInt32LE(12)).toBe(0);
    expect(decodeManifest(small, 'm').ids.toBuffer().equals(ids.subarray(0, 64))).toBe(true);
  });

  it('a compressed (IDS_LZ4) list that lies about its contents is refused even with a valid CRC', async () => {
    await initHash();
    const chunks = 1 << 14;
    const ids = Buffer.alloc(chunks * 16);
    randomBytes(16).copy(ids, 160);
    const b = encodeManifestLegacy({ ...manifestOf(new ChunkList(chunks), true), ids }, 'lz4');
    const metaLen = b.readUInt32LE(52);
    const bad = Buffer.from(b);
    bad.writeUInt32LE(ids.length - 16, 96 + metaLen); // the raw-length prefix of the list
    const t = bad.length - 32;
    bad.writeUInt32LE(crc32(bad.subarray(0, t + 24)), t + 24); // re-sealed: only the content checks can catch it
    expect(() => decodeManifest(bad, 'm')).toThrow(/does not decode/);
    const bad2 = Buffer.from(b);
    bad2[t] ^= 1; // the Merkle root
    bad2.writeUInt32LE(crc32(bad2.subarray(0, t + 24)), t + 24);
    expect(() => decodeManifest(bad2, 'm')).toThrow(/Merkle root/);
  });

  it('corrupt segmented lists are refused with the object and the segment named (CRC re-sealed)', async () => {
    await initHash();
    const l = new ChunkList(2 * SEGMENT_IDS + 64);
    l.set(3, randomBytes(16)); // segment 0: LZ4
    for (let k = 2 * SEGMENT_IDS; k < l.length; k++) l.set(k, randomBytes(16)); // segment 2 (64 ids): RAW; segment 1: ZERO
    const b = encodeManifest(manifestOf(l));
    const { start, end } = section(b);
    const sec = b.subarray(start, end);
    expect([sec[8], sec[16], sec[24]]).toEqual([2, 0, 1]);
    const name = 'repo/manifests/X.manifest';
    // Whole (decodeManifest) and in ranges (readManifestFrom, how large manifests are read): the same refusal.
    const refuse = async (s: Buffer, re: RegExp, flags?: number, streamRe = re): Promise<void> => {
      const obj = withSection(b, s, flags);
      expect(() => decodeManifest(obj, name)).toThrow(new RegExp(`${name}.*${re.source}`));
      await expect(readManifestFrom(obj.length, async (o, n) => obj.subarray(o, o + n), name)).rejects.toThrow(new RegExp(`${name}.*${streamRe.source}`));
    };
    const edit = (f: (s: Buffer) => void): Buffer => {
      const s = Buffer.from(sec);
      f(s);
      return s;
    };
    const lz4Len = sec.readUInt32LE(12);
    // Truncated: the last segment cut short, or the table itself.
    await refuse(sec.subarray(0, sec.length - 5), /segment 2 of 3.*run past the end.*truncated/);
    await refuse(sec.subarray(0, 20), /table of 3 segments is truncated/);
    await refuse(sec.subarray(0, 6), /too short for its header/, undefined, /length does not match its header/);
    await refuse(Buffer.concat([sec, Buffer.alloc(3)]), /3 bytes after its last segment/);
    // Wrong lengths and counts.
    await refuse(
      edit((s) => s.writeUInt32LE(SEGMENT_IDS * 2, 0)),
      /131072 ids per segment, not 65536/,
    );
    await refuse(
      edit((s) => s.writeUInt32LE(4, 4)),
      /4 segments; 131136 chunks need 3/,
    );
    await refuse(
      edit((s) => s.writeUInt32LE(64 * 16 - 16, 28)),
      /segment 2 of 3: 1008 stored bytes, a raw segment of 64 ids is 1024/,
    );
    await refuse(
      edit((s) => s.writeUInt32LE(16, 20)),
      /segment 1 of 3: an all-zero segment with 16 stored bytes/,
    );
    await refuse(
      edit((s) => (s[8] = 7)),
      /segment 0 of 3: unknown encoding 7/,
    );
    await refuse(
      edit((s) => (s[17] = 1)),
      /segment 1 of 3: reserved bytes are not zero/,
    );
    await refuse(
      edit((s) => s.writeUInt32LE(3, 12)),
      /segment 0 of 3: 3 stored bytes is too short/,
    );
    // An LZ4 segment whose prefix lies, or whose block decodes to another size.
    const p0 = 8 + 8 * 3;
    await refuse(
      edit((s) => s.writeUInt32LE(SEGMENT_IDS * 16 - 16, p0)),
      /segment 0 of 3: LZ4 raw length 1048560, the segment's 65536 ids are 1048576 bytes/,
    );
    const shortIds = Buffer.alloc(SEGMENT_IDS * 16 - 16);
    shortIds[48] = 1;
    const packed = Buffer.alloc(lz4Bound(shortIds.length));
    const n = compressInto(shortIds, packed, 0);
    packed.writeUInt32LE(SEGMENT_IDS * 16, 0); // the right prefix over a block of the wrong size
    const swapped = Buffer.concat([sec.subarray(0, p0), packed.subarray(0, n), sec.subarray(p0 + lz4Len)]);
    swapped.writeUInt32LE(n, 12);
    await refuse(swapped, /segment 0 of 3: the LZ4 block does not decode to 1048576 bytes/);
    // A well-formed list that is not the one the root was computed over.
    await refuse(
      edit((s) => (s[s.length - 1]! ^= 1)),
      /Merkle root does not match/,
    );
    // Both compressed forms claimed at once.
    await refuse(sec, /IDS_LZ4 and IDS_SEGMENTED are both set/, FLAG_IDS_LZ4 | FLAG_IDS_SEGMENTED);
    // And without re-sealing, any damage is a checksum mismatch.
    const flipped = Buffer.from(b);
    flipped[start + 40] ^= 1;
    expect(() => decodeManifest(flipped, name)).toThrow(/checksum mismatch/);
    for (const cut of [1, 40, 200]) expect(() => decodeManifest(b.subarray(0, b.length - cut), name)).toThrow(/truncated|checksum|magic/);
  });
});
