/**
 * Sealed records (formats/ksc_inc.md §3): a payload followed by
 * crc32(tag u32 ‖ index u64 ‖ payload). Records never straddle a sector, so a torn write leaves each one
 * whole; every record is verifiable on its own.
 */
import { crc32 } from 'node:zlib';

const prefix = Buffer.alloc(12);

export function sealOf(tag: number, index: number, payload: Buffer): number {
  prefix.writeUInt32LE(tag >>> 0, 0);
  prefix.writeUInt32LE(index % 0x100000000, 4);
  prefix.writeUInt32LE(Math.floor(index / 0x100000000), 8);
  return crc32(payload, crc32(prefix));
}

/** Writes the seal into the last 4 bytes of `record` (a view of `size` bytes). */
export function seal(record: Buffer, tag: number, index: number): void {
  const n = record.length - 4;
  record.writeUInt32LE(sealOf(tag, index, record.subarray(0, n)), n);
}

export function sealOk(record: Buffer, tag: number, index: number): boolean {
  const n = record.length - 4;
  return record.readUInt32LE(n) === sealOf(tag, index, record.subarray(0, n));
}

/** Fills `buf` (a multiple of 16 bytes) with empty 16-byte records of `tag`, indices from `first`. */
export function fillEmpty16(buf: Buffer, tag: number, first: number): void {
  buf.fill(0);
  for (let off = 0, i = first; off < buf.length; off += 16, i++) seal(buf.subarray(off, off + 16), tag, i);
}
