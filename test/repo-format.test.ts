/** Manifests with compressed chunk lists (formats/repository.md §7.2, IDS_LZ4). */
import { describe, expect, it } from 'vitest';
import { crc32 } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { initHash } from '../src/hash/chunkid.js';
import { encodeManifest, decodeManifest, FLAG_IDS_LZ4 } from '../src/repo/format.js';

const meta = { id: '20261126T120000000Z-0000abcd', parent: null, tags: [], source: 'd', bitmap: null, stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksDirty: 0, durationMs: 0 } };

describe('manifest chunk lists', () => {
  it('a long, sparse list is stored compressed and decodes to the same ids; a short one is not', async () => {
    await initHash();
    const chunks = 1 << 16; // 64 GiB at 1 MiB chunks
    const ids = Buffer.alloc(chunks * 16);
    for (const k of [0, 5, 40000, chunks - 1]) randomBytes(16).copy(ids, k * 16);
    const m = { full: false, disk: '6b736369-6e63-4000-8000-000000000001', timeMs: 1, size: chunks * 2 ** 20, chunkSize: 2 ** 20, bitmapToken: null, meta, ids };
    const b = encodeManifest(m);
    expect(b.readUInt32LE(12) & FLAG_IDS_LZ4).toBe(FLAG_IDS_LZ4);
    expect(b.length).toBeLessThan(ids.length / 50);
    expect(decodeManifest(b, 'm').ids.equals(ids)).toBe(true);
    const small = encodeManifest({ ...m, size: 4 * 2 ** 20, ids: ids.subarray(0, 64) });
    expect(small.readUInt32LE(12) & FLAG_IDS_LZ4).toBe(0);
    expect(decodeManifest(small, 'm').ids.equals(ids.subarray(0, 64))).toBe(true);
  });

  it('a compressed list that lies about its contents is refused even with a valid CRC', async () => {
    await initHash();
    const chunks = 1 << 14;
    const ids = Buffer.alloc(chunks * 16);
    randomBytes(16).copy(ids, 160);
    const b = encodeManifest({ full: true, disk: '6b736369-6e63-4000-8000-000000000001', timeMs: 1, size: chunks * 2 ** 20, chunkSize: 2 ** 20, bitmapToken: null, meta, ids });
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
});
