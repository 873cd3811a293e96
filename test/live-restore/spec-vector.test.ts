/** formats/ksc_inc.md §12.3: the header bytes of a repository backing (§4.2), read from the spec. */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { decodeHeaderSlot, encodeHeader, validateHeader, type Header } from '../../src/format/header.js';
import { ROOT } from '../helpers/corrupt.js';

const SPEC = readFileSync(join(ROOT, 'formats/ksc_inc.md'), 'utf8');

function vector(): { fields: Map<string, string>; bytes: { offset: number; hex: string }[] } {
  const m = /```vectors-repo-backing\n([\s\S]*?)\n```/.exec(SPEC);
  if (!m) throw new Error('formats/ksc_inc.md has no ```vectors-repo-backing block');
  const fields = new Map<string, string>();
  const bytes: { offset: number; hex: string }[] = [];
  for (const line of m[1]!.split('\n')) {
    if (line.trim() === '' || line.startsWith('#')) continue;
    const [k, ...rest] = line.trim().split(/\s+/);
    if (k === 'bytes') bytes.push({ offset: Number(rest[0]), hex: rest[1]! });
    else fields.set(k!, rest.join(' '));
  }
  return { fields, bytes };
}

function header(f: Map<string, string>): Omit<Header, 'version' | 'mapPageBits' | 'backingNameLength'> {
  return {
    generation: 1,
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    diskUuid: Buffer.from(f.get('disk')!.replace(/-/g, ''), 'hex'),
    virtualSize: 1 << 30,
    blockBits: 16,
    directoryOffset: 8192,
    directoryEntries: 4,
    intentBits: 18,
    intentOffset: 12288,
    intentWords: 64,
    bitmapSlots: 64,
    bitmapDirOffset: 16384,
    freeListOffset: 0,
    freeListEntries: 0,
    backingFormat: 3,
    backingName: f.get('location')!,
    backup: { disk: Buffer.from(f.get('disk')!.replace(/-/g, ''), 'hex'), root: Buffer.from(f.get('root')!, 'hex'), chunkSize: Number(f.get('chunk_size')), id: f.get('backup')! },
  };
}

describe('ksc_inc §12.3 repository backing vector', () => {
  it('encodes the backup into the bytes the spec lists, and decodes them back', () => {
    const { fields, bytes } = vector();
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
    const { fields } = vector();
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
