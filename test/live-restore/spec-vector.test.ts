/** formats/ksc_inc.md §12.3: the header bytes of a repository backing (§4.2), read from the spec. */
import { describe, expect, it } from 'vitest';
import { crc32 } from 'node:zlib';
import { decodeHeaderSlot, encodeHeader, validateHeader, type Header } from '../../src/format/header.js';
import { specVector, uuidBytes, vectorHeader } from '../helpers/spec-vector.js';

function header(f: Map<string, string>): Omit<Header, 'version' | 'mapPageBits' | 'backingNameLength'> {
  const disk = uuidBytes(f.get('disk')!);
  return {
    ...vectorHeader(disk),
    backingFormat: 3,
    backingName: f.get('location')!,
    backup: { disk, root: Buffer.from(f.get('root')!, 'hex'), chunkSize: Number(f.get('chunk_size')), id: f.get('backup')! },
  };
}

describe('ksc_inc §12.3 repository backing vector', () => {
  it('encodes the backup into the bytes the spec lists, and decodes them back', () => {
    const { fields, bytes } = specVector('vectors-repo-backing');
    expect(bytes.length).toBeGreaterThanOrEqual(2);
    const h = header(fields);
    const b = encodeHeader(h);
    for (const { offset, hex } of bytes) expect(b.subarray(offset, offset + hex.length / 2).toString('hex'), `bytes at ${offset}`).toBe(hex);
    // Every other byte after the backing name is zero (reserved), but for the header CRC.
    expect(b.subarray(1272, 4092).every((x) => x === 0)).toBe(true);
    const got = decodeHeaderSlot(b);
    expect(got.ok).toBe(true);
    if (!got.ok) return;
    validateHeader(got.header, 'vec.ksc', 1 << 20);
    expect(got.header.backingFormat).toBe(3);
    expect(got.header.backingName).toBe(fields.get('location'));
    expect(got.header.backup!.id).toBe(fields.get('backup'));
    expect(got.header.backup!.chunkSize).toBe(Number(fields.get('chunk_size')));
    expect(got.header.backup!.root.toString('hex')).toBe(fields.get('root'));
    expect(got.header.backup!.disk.toString('hex')).toBe(fields.get('disk')!.replace(/-/g, ''));
  });

  it('refuses a backing_format 3 header with a bad backup id or chunk size (a named field)', () => {
    const { fields } = specVector('vectors-repo-backing');
    const h = header(fields);
    const bad = Buffer.from(encodeHeader(h));
    bad.writeUInt32LE(3 << 20, 1200); // not a power of two
    bad.writeUInt32LE(crc32(bad.subarray(0, 4092)), 4092);
    const got = decodeHeaderSlot(bad);
    expect(got.ok).toBe(true);
    if (got.ok) expect(() => validateHeader(got.header, 'vec.ksc', 1 << 20)).toThrow(/chunk_size/);
    expect(() => encodeHeader({ ...h, backup: { ...h.backup!, id: '' } })).toThrow(/backup id/);
    expect(() => encodeHeader({ ...h, backup: null })).toThrow(/needs the backup/);
  });
});
