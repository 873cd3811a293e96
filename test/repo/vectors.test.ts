/**
 * Checks the code against the test vectors of formats/repository.md §11. XXH64 is implemented here from
 * its published definition (so the test does not just trust xxhash-wasm), and the objects are decoded by
 * hand from the spec's byte tables before the code's decoders and encoders are compared with them.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { crc32 } from 'node:zlib';
import { ROOT } from '../helpers/corrupt.js';
import { initHash, chunkId, merkleRoot } from '../../src/hash/chunkid.js';
import { decodeBlob, encodeBlob } from '../../src/compress/codec.js';
import { decodeIndex, encodeIndex } from '../../src/repo/index-object.js';
import { decodeManifest, encodeManifest } from '../../src/repo/manifest.js';
import { decodePackTail, decodePackEntries } from '../../src/repo/pack.js';
import { FOOTER_TAIL, FOOTER_ENTRY } from '../../src/repo/constants.js';
import { encodeManifestLegacy } from '../helpers/manifest.js';

const M = (1n << 64n) - 1n;
const P1 = 11400714785074694791n,
  P2 = 14029467366897019727n,
  P3 = 1609587929392839161n,
  P4 = 9650029242287828579n,
  P5 = 2870177450012600261n;
const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & M;
const round = (acc: bigint, lane: bigint): bigint => (rotl((acc + lane * P2) & M, 31n) * P1) & M;
const merge = (h: bigint, v: bigint): bigint => ((h ^ round(0n, v)) * P1 + P4) & M;

/** XXH64 from its specification. */
function xxh64(b: Buffer, seed: bigint): bigint {
  let i = 0;
  let h: bigint;
  if (b.length >= 32) {
    let v1 = (seed + P1 + P2) & M,
      v2 = (seed + P2) & M,
      v3 = seed,
      v4 = (seed - P1) & M;
    for (; i + 32 <= b.length; i += 32) {
      v1 = round(v1, b.readBigUInt64LE(i));
      v2 = round(v2, b.readBigUInt64LE(i + 8));
      v3 = round(v3, b.readBigUInt64LE(i + 16));
      v4 = round(v4, b.readBigUInt64LE(i + 24));
    }
    h = (rotl(v1, 1n) + rotl(v2, 7n) + rotl(v3, 12n) + rotl(v4, 18n)) & M;
    h = merge(merge(merge(merge(h, v1), v2), v3), v4);
  } else h = (seed + P5) & M;
  h = (h + BigInt(b.length)) & M;
  for (; i + 8 <= b.length; i += 8) h = (rotl(h ^ round(0n, b.readBigUInt64LE(i)), 27n) * P1 + P4) & M;
  if (i + 4 <= b.length) {
    h = (rotl(h ^ ((BigInt(b.readUInt32LE(i)) * P1) & M), 23n) * P2 + P3) & M;
    i += 4;
  }
  for (; i < b.length; i++) h = (rotl(h ^ ((BigInt(b[i]!) * P5) & M), 11n) * P1) & M;
  h ^= h >> 33n;
  h = (h * P2) & M;
  h ^= h >> 29n;
  h = (h * P3) & M;
  h ^= h >> 32n;
  return h;
}

function idRef(b: Buffer): Buffer {
  const out = Buffer.alloc(16);
  out.writeBigUInt64BE(xxh64(b, 0n), 0);
  out.writeBigUInt64BE(xxh64(b, 0x6b7363696e632131n), 8); // "kscinc!1"
  return out;
}

/** idRef, remembering results by content (long sparse lists repeat the same 4 KiB group of zero ids). */
const memo = new Map<string, Buffer>();
function idRefMemo(b: Buffer): Buffer {
  const key = b.toString('base64');
  let r = memo.get(key);
  if (!r) memo.set(key, (r = idRef(b)));
  return r;
}

function merkleRef(ids: Buffer): Buffer {
  if (ids.length === 0) return Buffer.alloc(16);
  let level = ids;
  do {
    const parts: Buffer[] = [];
    for (let o = 0; o < level.length; o += 256 * 16) parts.push(idRefMemo(level.subarray(o, Math.min(level.length, o + 256 * 16))));
    level = Buffer.concat(parts);
  } while (level.length > 16);
  return level;
}

/** An LZ4 block decoder from the block format's description (no frame), for §5.4 stored bytes. */
function lz4BlockRef(src: Buffer, rawLength: number): Buffer {
  const out = Buffer.alloc(rawLength);
  let i = 0;
  let o = 0;
  const more = (n: number): number => {
    let b: number;
    do {
      b = src[i++]!;
      n += b;
    } while (b === 255);
    return n;
  };
  while (i < src.length) {
    const token = src[i++]!;
    let lit = token >> 4;
    if (lit === 15) lit = more(lit);
    src.copy(out, o, i, i + lit);
    i += lit;
    o += lit;
    if (i >= src.length) break; // the last sequence has literals only
    const off = src.readUInt16LE(i);
    i += 2;
    let ml = token & 15;
    if (ml === 15) ml = more(ml);
    ml += 4;
    for (let k = 0; k < ml; k++, o++) out[o] = out[o - off]!;
  }
  if (o !== rawLength) throw new Error(`LZ4 block decoded to ${o} bytes, not ${rawLength}`);
  return out;
}

const spec = readFileSync(`${ROOT}/formats/repository.md`, 'utf8');
function block(name: string): string[] {
  const m = new RegExp('```' + name + '\\n([\\s\\S]*?)```').exec(spec);
  if (!m) throw new Error(`formats/repository.md has no ${name} block`);
  return m[1]!.split('\n').filter((l) => l.trim() && !l.startsWith('#'));
}
const hexOf = (s: string): Buffer => Buffer.from(s === '-' ? '' : s, 'hex');
const objects = new Map(
  block('vectors-objects')
    .map((l) => l.split(' ') as [string, string])
    .map(([k, v]) => [k, hexOf(v)]),
);

describe('formats/repository.md §11 vectors', () => {
  it('chunk ids (§2): the reference XXH64 and the code agree with every vector', async () => {
    await initHash();
    const lines = block('vectors-id');
    expect(lines.length).toBeGreaterThanOrEqual(4);
    expect(xxh64(Buffer.from('abc'), 0n).toString(16)).toBe('44bc2cf5ad770999'); // XXH64's published value
    for (const l of lines) {
      const [input, want] = l.split(' => ') as [string, string];
      expect(idRef(hexOf(input)).toString('hex'), input.slice(0, 20)).toBe(want);
      expect(chunkId(hexOf(input)).toString('hex')).toBe(want);
    }
  });

  it('Merkle roots (§7.3)', async () => {
    await initHash();
    for (const l of block('vectors-merkle')) {
      const [leaves, want] = l.split(' => ') as [string, string];
      expect(merkleRef(hexOf(leaves)).toString('hex')).toBe(want);
      expect(merkleRoot(hexOf(leaves)).toString('hex')).toBe(want);
    }
  });

  it('a pack (§5) decodes by the byte tables, and the code reads its footer and blobs', async () => {
    await initHash();
    const pack = objects.get('pack')!;
    expect(pack.subarray(0, 8).toString()).toBe('KSCPACK1');
    expect(pack.readUInt32LE(8)).toBe(1);
    const tail = pack.subarray(pack.length - 32);
    expect(tail.subarray(24).toString()).toBe('KSCPEND1');
    expect(tail.readUInt32LE(20)).toBe(crc32(tail.subarray(0, 20)));
    const n = tail.readUInt32LE(0);
    const at = Number(tail.readBigUInt64LE(8));
    expect(n).toBe(2);
    expect(tail.readUInt32LE(4)).toBe(crc32(pack.subarray(at, at + 48 * n)));
    const t = decodePackTail(pack.subarray(pack.length - FOOTER_TAIL), pack.length, 'vector');
    const entries = decodePackEntries(pack.subarray(t.entriesOffset, t.entriesOffset + t.count * FOOTER_ENTRY), t.count, t.entriesCrc, t.entriesOffset, 'vector');
    const want = [Buffer.from('abc'), Buffer.from(Array.from({ length: 256 }, (_, i) => i))];
    entries.forEach((e, i) => {
      const blob = pack.subarray(e.offset, e.offset + e.length);
      expect(blob.subarray(0, 4).toString()).toBe('KBLB');
      expect(blob[4]).toBe(0);
      expect(blob.readUInt32LE(8)).toBe(want[i]!.length);
      expect(blob.subarray(16, 32).equals(idRef(want[i]!))).toBe(true);
      expect(blob.subarray(32).equals(want[i]!)).toBe(true);
      expect(decodeBlob(blob, e.id, 1 << 20).equals(want[i]!)).toBe(true);
      expect(encodeBlob(want[i]!, idRef(want[i]!), false).equals(blob)).toBe(true);
    });
  });

  it('an LZ4 blob (§5.4) decodes to its chunk', async () => {
    await initHash();
    const blob = objects.get('blob-lz4')!;
    expect(blob[4]).toBe(1);
    expect(blob.readUInt32LE(32)).toBe(4096); // the raw-length prefix of the LZ4 block
    const data = decodeBlob(blob, idRef(Buffer.alloc(4096, 0x5a)), 1 << 20);
    expect(data.equals(Buffer.alloc(4096, 0x5a))).toBe(true);
  });

  it('an index object (§6) decodes by hand and round-trips through the code', () => {
    const b = objects.get('index')!;
    expect(b.subarray(0, 8).toString()).toBe('KSCINDX1');
    expect(b.readUInt32LE(28)).toBe(crc32(b.subarray(32), crc32(b.subarray(0, 28))));
    const [p, e] = [b.readUInt32LE(12), b.readUInt32LE(16)];
    expect([p, e]).toEqual([1, 2]);
    expect(b.toString('hex', 32, 48)).toBe('00112233445566778899aabbccddeeff');
    const entries = decodeIndex(b, 'vector');
    expect(entries.map((x) => [x.pack, x.offset, x.rawLength])).toEqual([
      ['00112233445566778899aabbccddeeff', 16, 3],
      ['00112233445566778899aabbccddeeff', 16 + 35, 256],
    ]);
    expect(encodeIndex(entries).equals(b)).toBe(true);
    const bad = Buffer.from(b);
    bad[60] ^= 1;
    expect(() => decodeIndex(bad, 'vector')).toThrow(/checksum/);
  });

  it('a manifest (§7) decodes by hand and round-trips through the code', async () => {
    await initHash();
    const b = objects.get('manifest')!;
    expect(b.subarray(0, 8).toString()).toBe('KSCMANI1');
    expect(b.readUInt32LE(12)).toBe(1); // FULL
    expect(b.toString('hex', 16, 32)).toBe('6b7363696e634000800000000000000' + '1');
    expect(Number(b.readBigUInt64LE(32))).toBe(Date.UTC(2026, 10, 26, 12));
    expect(Number(b.readBigUInt64LE(40))).toBe(3 * 1024 * 1024 + 5);
    expect(b.readUInt32LE(48)).toBe(1 << 20);
    const metaLen = b.readUInt32LE(52);
    expect(Number(b.readBigUInt64LE(56))).toBe(4);
    const meta = JSON.parse(b.toString('utf8', 96, 96 + metaLen));
    expect(meta.id).toBe('20261126T120000000Z-0000abcd');
    const ids = b.subarray(96 + metaLen, b.length - 32);
    expect(ids.length).toBe(64);
    expect(ids.subarray(0, 16).equals(idRef(Buffer.from('abc')))).toBe(true);
    const t = b.length - 32;
    expect(b.subarray(t, t + 16).equals(merkleRef(ids))).toBe(true);
    expect(b.readUInt32LE(t + 24)).toBe(crc32(b.subarray(0, t + 24)));
    const m = decodeManifest(b, 'vector');
    expect(m.bitmapToken).toBe('ffeeddccbbaa99887766554433221100');
    expect(m.disk).toBe('6b736369-6e63-4000-8000-000000000001');
    expect(m.ids.toBuffer().equals(ids)).toBe(true);
    expect(encodeManifestLegacy({ ...m, ids: m.ids.toBuffer() }, 'plain').equals(b)).toBe(true);
    for (const cut of [1, 31, 33]) expect(() => decodeManifest(b.subarray(0, b.length - cut), 'vector')).toThrow(/truncated|checksum|magic/);
    // Writers now use the segmented form (§7.5): the same manifest re-encoded decodes to the same list and root.
    const again = encodeManifest(m);
    expect(again.readUInt32LE(12)).toBe(1 | 4);
    expect(decodeManifest(again, 'vector').ids.toBuffer().equals(ids)).toBe(true);
    expect(again.subarray(again.length - 32, again.length - 16).equals(b.subarray(t, t + 16))).toBe(true);
  });

  /** Decodes a segmented manifest (§7.5) by the byte tables alone: the flat list and the table entries. */
  function segmentedByHand(b: Buffer): { flags: number; chunks: number; meta: { id: string; parent: string | null }; ids: Buffer; table: [number, number][] } {
    expect(b.subarray(0, 8).toString()).toBe('KSCMANI1');
    const flags = b.readUInt32LE(12);
    expect(flags & 4).toBe(4); // IDS_SEGMENTED
    expect(flags & 2).toBe(0);
    const size = Number(b.readBigUInt64LE(40));
    const C = b.readUInt32LE(48);
    const metaLen = b.readUInt32LE(52);
    const chunks = Number(b.readBigUInt64LE(56));
    expect(chunks).toBe(Math.ceil(size / C));
    const meta = JSON.parse(b.toString('utf8', 96, 96 + metaLen));
    const t = b.length - 32;
    expect(b.subarray(t + 28).toString()).toBe('KEND');
    expect(b.readUInt32LE(t + 24)).toBe(crc32(b.subarray(0, t + 24)));
    const sec = b.subarray(96 + metaLen, t);
    expect(sec.readUInt32LE(0)).toBe(65536);
    const n = sec.readUInt32LE(4);
    expect(n).toBe(Math.ceil(chunks / 65536));
    const ids = Buffer.alloc(chunks * 16);
    const table: [number, number][] = [];
    let pos = 8 + 8 * n;
    for (let i = 0; i < n; i++) {
      const [enc, len] = [sec[8 + 8 * i]!, sec.readUInt32LE(8 + 8 * i + 4)];
      expect(sec.readUIntLE(8 + 8 * i + 1, 3)).toBe(0);
      table.push([enc, len]);
      const count = Math.min(65536, chunks - i * 65536);
      const payload = sec.subarray(pos, pos + len);
      pos += len;
      if (enc === 0) expect(len).toBe(0);
      else if (enc === 1) {
        expect(len).toBe(16 * count);
        payload.copy(ids, i * 65536 * 16);
      } else {
        expect(enc).toBe(2);
        expect(payload.readUInt32LE(0)).toBe(16 * count);
        lz4BlockRef(payload.subarray(4), 16 * count).copy(ids, i * 65536 * 16);
      }
    }
    expect(pos).toBe(sec.length);
    expect(b.subarray(t, t + 16).equals(merkleRef(ids))).toBe(true);
    return { flags, chunks, meta, ids, table };
  }

  it('segmented manifests (§7.5) decode by hand and round-trip through the code', async () => {
    await initHash();
    const raw = objects.get('manifest-seg-raw')!;
    const r = segmentedByHand(raw);
    expect(r.flags).toBe(4);
    expect(r.table).toEqual([[1, 32]]);
    expect(r.meta.parent).toBe('20261126T120000000Z-0000abcd');
    expect(r.ids.equals(Buffer.concat([idRef(Buffer.from('abc')), idRef(Buffer.from(Array.from({ length: 256 }, (_, i) => i)))]))).toBe(true);
    const mr = decodeManifest(raw, 'vector');
    expect(mr.ids.toBuffer().equals(r.ids)).toBe(true);
    expect(mr.bitmapToken).toBe(null);
    expect(encodeManifest(mr).equals(raw)).toBe(true);

    const sparse = objects.get('manifest-seg-sparse')!;
    const s = segmentedByHand(sparse);
    expect(s.flags).toBe(5);
    expect(s.chunks).toBe(2 * 65536 + 64);
    expect(s.table.map(([enc]) => enc)).toEqual([0, 0, 2]);
    expect(s.table.slice(0, 2)).toEqual([
      [0, 0],
      [0, 0],
    ]);
    const nonZero: number[] = [];
    for (let k = 0; k < s.chunks; k++) if (!s.ids.subarray(k * 16, k * 16 + 16).equals(Buffer.alloc(16))) nonZero.push(k);
    expect(nonZero).toEqual([2 * 65536, s.chunks - 1]);
    expect(s.ids.subarray(2 * 65536 * 16, 2 * 65536 * 16 + 16).equals(idRef(Buffer.from('abc')))).toBe(true);
    const ms = decodeManifest(sparse, 'vector');
    expect(ms.ids.allocatedSegments()).toBe(1);
    expect(ms.ids.nonZeroCount()).toBe(2);
    expect(ms.ids.toBuffer().equals(s.ids)).toBe(true);
    expect(ms.root.equals(merkleRef(s.ids))).toBe(true);
    expect(encodeManifest(ms).equals(sparse)).toBe(true);
    // The same list in the older forms decodes the same (readers keep reading them).
    const flat = { ...ms, ids: s.ids };
    for (const form of ['plain', 'lz4'] as const) {
      const old = decodeManifest(encodeManifestLegacy(flat, form), 'legacy');
      expect(old.ids.equals(ms.ids)).toBe(true);
      expect(old.root.equals(ms.root)).toBe(true);
    }
  });
});
