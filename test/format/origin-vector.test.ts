/** formats/ksc_inc.md §12.4: the origin record of a restored image (§4.3), read from the spec. */
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { decodeHeaderSlot, encodeHeader, type Header } from '../../src/format/header.js';
import { ORIGIN_OFFSET, ORIGIN_SIZE, decodeOrigin, encodeOrigin, originBitmapName, type OriginRecord } from '../../src/format/origin.js';
import { specVector, uuidBytes, vectorHeader } from '../helpers/spec-vector.js';

function vector(): { f: Map<string, string>; bytes: { offset: number; hex: string }[] } {
  const { fields, bytes } = specVector('vectors-origin');
  return { f: fields, bytes };
}

function record(f: Map<string, string>): OriginRecord {
  const hex = (k: string): Buffer => Buffer.from(f.get(k)!.replace(/-/g, ''), 'hex');
  return {
    repoId: hex('repository'),
    disk: hex('disk'),
    root: hex('root'),
    token: hex('token'),
    bitmapSuffix: hex('bitmap'),
    chunkSize: Number(f.get('chunk_size')),
    backupId: f.get('backup')!,
    location: f.get('location')!,
  };
}

/** The spec's bytes laid into an otherwise zero header. */
function specBuffer(bytes: { offset: number; hex: string }[]): Buffer {
  const b = Buffer.alloc(4096);
  for (const { offset, hex } of bytes) Buffer.from(hex, 'hex').copy(b, offset);
  return b;
}

describe('ksc_inc §12.4 origin record vector', () => {
  it('encodes the record into the bytes the spec lists (zero elsewhere), and decodes them back', () => {
    const { f, bytes } = vector();
    expect(bytes.length).toBeGreaterThanOrEqual(2);
    const b = Buffer.alloc(4096);
    encodeOrigin(record(f), b);
    expect(b.equals(specBuffer(bytes)), 'encoded record differs from the spec bytes').toBe(true);
    // origin_crc is crc32 of bytes 1280 … 1943, computed here with zlib rather than by the codec.
    expect(b.readUInt32LE(1276)).toBe(crc32(b.subarray(1280, 1944)));
    const got = decodeOrigin(specBuffer(bytes));
    expect(got.state).toBe('ok');
    if (got.state !== 'ok') return;
    expect(got.record).toEqual(record(f));
    expect(originBitmapName(got.record)).toBe(f.get('bitmap_name'));
  });

  it('a header carries the record through encode and decode; a header without one reads as none', () => {
    const { f } = vector();
    const h: Omit<Header, 'version' | 'mapPageBits' | 'backingNameLength'> = {
      ...vectorHeader(uuidBytes(f.get('disk')!)),
      autoclear: 1n,
      origin: { state: 'ok', record: record(f) },
    };
    const got = decodeHeaderSlot(encodeHeader(h));
    expect(got.ok && got.header.origin).toEqual({ state: 'ok', record: record(f) });
    const none = decodeHeaderSlot(encodeHeader({ ...h, origin: { state: 'none' } }));
    expect(none.ok && none.header.origin).toEqual({ state: 'none' });
    // A damaged record is dropped by the next header write, never copied.
    const dropped = decodeHeaderSlot(encodeHeader({ ...h, origin: { state: 'damaged', reason: 'x' } }));
    expect(dropped.ok && dropped.header.origin).toEqual({ state: 'none' });
  });

  it('any changed byte of the record makes it damaged (never a different claim)', () => {
    const { bytes } = vector();
    const base = specBuffer(bytes);
    for (let i = ORIGIN_OFFSET; i < ORIGIN_OFFSET + ORIGIN_SIZE; i += 7) {
      const b = Buffer.from(base);
      b[i] = b[i]! ^ 0x40;
      const got = decodeOrigin(b);
      expect(got.state, `byte ${i}`).toBe('damaged');
    }
    // A record re-sealed after an edit of a reserved byte is still refused.
    const b = Buffer.from(base);
    b[1940] = 1;
    b.writeUInt32LE(crc32(b.subarray(1280, 1944)), 1276);
    expect(decodeOrigin(b)).toEqual({ state: 'damaged', reason: 'reserved bytes of the origin record are not zero' });
  });
});
