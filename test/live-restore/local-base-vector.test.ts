/** formats/ksc_inc.md §12.3: the header bytes of a live restore's local base (§4.2 rule 9), read from the spec. */
import { describe, expect, it } from 'vitest';
import { crc32 } from 'node:zlib';
import { decodeHeaderSlot, encodeHeader, validateHeader, type Header } from '../../src/format/header.js';
import { fingerprintBytes, fingerprintText } from '../../src/format/local-base.js';
import { specVector, uuidBytes, vectorHeader } from '../helpers/spec-vector.js';

const repo = specVector('vectors-repo-backing').fields;
const localVector = specVector('vectors-local-base');
const local = localVector.fields;
const size = Number(local.get('size'));
const ref = { name: local.get('name')!, size, fingerprint: fingerprintBytes(local.get('fingerprint')!, size)! };
const uuid = uuidBytes(repo.get('disk')!);
const h: Omit<Header, 'version' | 'mapPageBits' | 'backingNameLength'> = {
  ...vectorHeader(uuid),
  backingFormat: 3,
  backingName: repo.get('location')!,
  backup: { disk: uuid, root: Buffer.from(repo.get('root')!, 'hex'), chunkSize: Number(repo.get('chunk_size')), id: repo.get('backup')! },
  localBase: ref,
};

describe('ksc_inc §12.3 local base vector', () => {
  it('encodes the record into the bytes the spec lists, and decodes them back', () => {
    expect(ref.fingerprint).not.toBeNull();
    const b = encodeHeader(h);
    const hex = localVector.bytes.find((x) => x.offset === 1944)!.hex;
    expect(b.subarray(1944, 1944 + hex.length / 2).toString('hex')).toBe(hex);
    expect(b.subarray(1944 + hex.length / 2, 4092).every((x) => x === 0)).toBe(true);
    const got = decodeHeaderSlot(b);
    expect(got.ok).toBe(true);
    if (!got.ok) return;
    validateHeader(got.header, 'vec.ksc', 1 << 20);
    expect(got.header.localBase).toEqual(ref);
    expect(fingerprintText(got.header.localBase!)).toBe(local.get('fingerprint'));
    // Without the record, the same bytes are zero: an image without a local base (and an older writer's).
    const none = decodeHeaderSlot(encodeHeader({ ...h, localBase: null }));
    expect(none.ok && none.header.localBase).toBeNull();
  });

  it('refuses a record with another backing format, a relative name or a bad size (a named field)', () => {
    expect(() => encodeHeader({ ...h, backingFormat: 1, backup: null })).toThrow(/backing_format 3 only/);
    for (const [patch, field] of [
      [(b: Buffer) => b.writeUInt32LE(1, 132), 'local_base_name_length'],
      [(b: Buffer) => b.write('s', 1992), 'local_base_name'],
      [(b: Buffer) => b.writeBigUInt64LE(0n, 1952), 'local_base_size'],
    ] as const) {
      const b = Buffer.from(encodeHeader(h));
      patch(b);
      b.writeUInt32LE(crc32(b.subarray(0, 4092)), 4092);
      const got = decodeHeaderSlot(b);
      expect(got.ok).toBe(true);
      if (got.ok) expect(() => validateHeader(got.header, 'vec.ksc', 1 << 20)).toThrow(new RegExp(field));
    }
  });
});
