/**
 * Sealed records (formats/ksc_inc.md §3): a payload followed by
 * crc32(tag u32 ‖ index u64 ‖ payload). Records never straddle a sector, so a torn write leaves each one
 * whole; every record is verifiable on its own.
 *
 * Most records are 16 bytes and are checked 4096 at a time (a map or bitmap page), so the CRC of a small
 * record is computed here with a table (≈ 4× faster than two calls into zlib per record, measured); longer
 * payloads go to zlib. Both give the same CRC-32 (IEEE, reflected), which the spec's vectors check.
 */
import { crc32 } from 'node:zlib';

const TABLE = (() => {
  const t = new Int32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c;
  }
  return t;
})();

/** Payloads up to this length are summed with the table; longer ones by zlib. */
const SMALL_PAYLOAD = 64;

/** The running (pre-inverted) CRC `c` advanced over the 4 little-endian bytes of `w`. */
function crcU32(c: number, w: number): number {
  c = TABLE[(c ^ w) & 0xff]! ^ (c >>> 8);
  c = TABLE[(c ^ (w >>> 8)) & 0xff]! ^ (c >>> 8);
  c = TABLE[(c ^ (w >>> 16)) & 0xff]! ^ (c >>> 8);
  return TABLE[(c ^ (w >>> 24)) & 0xff]! ^ (c >>> 8);
}

const prefix = Buffer.alloc(12);

/** The seal of the `length`-byte payload at `offset` of `buf`. */
export function sealAt(buf: Buffer, offset: number, length: number, tag: number, index: number): number {
  const lo = index % 0x100000000;
  const hi = Math.floor(index / 0x100000000);
  if (length > SMALL_PAYLOAD) {
    prefix.writeUInt32LE(tag >>> 0, 0);
    prefix.writeUInt32LE(lo, 4);
    prefix.writeUInt32LE(hi, 8);
    return crc32(buf.subarray(offset, offset + length), crc32(prefix));
  }
  let c = crcU32(crcU32(crcU32(-1, tag), lo), hi);
  for (let i = offset, end = offset + length; i < end; i++) c = TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}

export function sealOf(tag: number, index: number, payload: Buffer): number {
  return sealAt(payload, 0, payload.length, tag, index);
}

/** Writes the seal into the last 4 bytes of `record` (a view of `size` bytes). */
export function seal(record: Buffer, tag: number, index: number): void {
  const n = record.length - 4;
  record.writeUInt32LE(sealAt(record, 0, n, tag, index), n);
}

export function sealOk(record: Buffer, tag: number, index: number): boolean {
  return sealOkAt(record, 0, record.length, tag, index);
}

/**
 * The seal of a 16-byte record whose three payload words (little-endian, as stored) are `w0`, `w1`, `w2`: the
 * same value as sealAt over those 12 bytes, computed from words a caller has already read (a map page's decode
 * reads every entry's words once, through a DataView, instead of byte by byte and again per field).
 */
export function sealWords(tag: number, index: number, w0: number, w1: number, w2: number): number {
  const c = crcU32(crcU32(crcU32(-1, tag), index % 0x100000000), Math.floor(index / 0x100000000));
  return (crcU32(crcU32(crcU32(c, w0), w1), w2) ^ -1) >>> 0;
}

/** True when the `size`-byte record at `offset` of `buf` carries its seal (no views made: for page loops). */
export function sealOkAt(buf: Buffer, offset: number, size: number, tag: number, index: number): boolean {
  const n = size - 4;
  return buf.readUInt32LE(offset + n) === sealAt(buf, offset, n, tag, index);
}

/** Fills `buf` (a multiple of 16 bytes) with empty 16-byte records of `tag`, indices from `first`. */
export function fillEmpty16(buf: Buffer, tag: number, first: number): void {
  buf.fill(0);
  for (let off = 0, i = first; off < buf.length; off += 16, i++) buf.writeUInt32LE(sealAt(buf, off, 12, tag, i), off + 12);
}
