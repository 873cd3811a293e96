/**
 * The origin record of a restored image (formats/ksc_inc.md §4.3): which backup of which disk in which
 * repository the image is a copy of, and the name of the bitmap that marks what changed since. Pure codec:
 * decoding never throws; a record that fails any check decodes as `damaged` with the reason (the image still
 * opens, the claim is just not made).
 */
import { crc32 } from 'node:zlib';
import { KscError } from '../errors.js';

/** §4.3 byte offsets. */
export const ORIGIN_OFFSET = 1272;
export const ORIGIN_SIZE = 672;
/** "ORIG" as stored. */
const MAGIC = Buffer.from('ORIG', 'ascii');
const MAX_ID = 64;
export const MAX_ORIGIN_LOCATION = 512;
/** The origin bitmap's name: this prefix and 16 lowercase hex digits. */
export const ORIGIN_BITMAP_PREFIX = 'kscinc-origin-';

export interface OriginRecord {
  /** The repository's config id, 16 bytes. */
  repoId: Buffer;
  /** The manifest's disk UUID, 16 bytes. */
  disk: Buffer;
  /** The manifest's Merkle root, 16 bytes. */
  root: Buffer;
  /** The manifest's bitmap token (16 bytes), or null when it has none. */
  token: Buffer | null;
  /** The origin bitmap's name suffix, 8 bytes. */
  bitmapSuffix: Buffer;
  chunkSize: number;
  backupId: string;
  /** The repository's location when restored (a hint). */
  location: string;
}

export type OriginSlot = { state: 'none' } | { state: 'ok'; record: OriginRecord } | { state: 'damaged'; reason: string };

/** The origin bitmap's name for a record. */
export function originBitmapName(r: Pick<OriginRecord, 'bitmapSuffix'>): string {
  return ORIGIN_BITMAP_PREFIX + r.bitmapSuffix.toString('hex');
}

/** True for a name an origin bitmap may have (whether or not a record names it). */
export function isOriginBitmapName(name: string): boolean {
  return name.startsWith(ORIGIN_BITMAP_PREFIX) && /^[0-9a-f]{16}$/.test(name.slice(ORIGIN_BITMAP_PREFIX.length));
}

const validChunkSize = (n: number): boolean => n >= 64 << 10 && n <= 4 << 20 && (n & (n - 1)) === 0;

/** Writes `r` into header buffer `b` at §4.3's offsets. KSC_E_INVALID for a field out of range. */
export function encodeOrigin(r: OriginRecord, b: Buffer): void {
  const id = Buffer.from(r.backupId, 'ascii');
  const loc = Buffer.from(r.location, 'utf8');
  if (!/^[\x21-\x7e]{1,64}$/.test(r.backupId)) throw new KscError('KSC_E_INVALID', `origin backup id "${r.backupId}" must be 1 … ${MAX_ID} printable ASCII characters`);
  if (loc.length > MAX_ORIGIN_LOCATION || r.location.includes('\0'))
    throw new KscError('KSC_E_INVALID', `origin repository location is ${loc.length} bytes; the limit is ${MAX_ORIGIN_LOCATION} (no NUL)`);
  if (!validChunkSize(r.chunkSize)) throw new KscError('KSC_E_INVALID', `origin chunk size ${r.chunkSize} is not a power of two from 64 KiB to 4 MiB`);
  for (const [name, v, n] of [
    ['repository id', r.repoId, 16],
    ['disk UUID', r.disk, 16],
    ['root', r.root, 16],
    ['bitmap suffix', r.bitmapSuffix, 8],
  ] as const) {
    if (v.length !== n) throw new KscError('KSC_E_INVALID', `origin ${name} must be ${n} bytes`);
  }
  if (r.token && r.token.length !== 16) throw new KscError('KSC_E_INVALID', 'origin token must be 16 bytes');
  const o = ORIGIN_OFFSET;
  b.fill(0, o, o + ORIGIN_SIZE);
  MAGIC.copy(b, o);
  r.repoId.copy(b, o + 8);
  r.disk.copy(b, o + 24);
  r.root.copy(b, o + 40);
  r.token?.copy(b, o + 56);
  r.bitmapSuffix.copy(b, o + 72);
  b.writeUInt32LE(r.chunkSize, o + 80);
  b.writeUInt8(id.length, o + 84);
  b.writeUInt16LE(loc.length, o + 86);
  id.copy(b, o + 88);
  loc.copy(b, o + 152);
  b.writeUInt32LE(crc32(b.subarray(o + 8, o + ORIGIN_SIZE)), o + 4);
}

const copy = (b: Buffer, at: number, n: number): Buffer => Buffer.from(b.subarray(at, at + n));

/** Reads §4.3 from header buffer `b` (rule 4's field checks; the bitmap checks are the image's). */
export function decodeOrigin(b: Buffer): OriginSlot {
  const o = ORIGIN_OFFSET;
  const rec = b.subarray(o, o + ORIGIN_SIZE);
  if (rec.every((x) => x === 0)) return { state: 'none' };
  const bad = (reason: string): OriginSlot => ({ state: 'damaged', reason });
  if (!rec.subarray(0, 4).equals(MAGIC)) return bad('origin_magic is not "ORIG"');
  if (rec.readUInt32LE(4) !== crc32(rec.subarray(8))) return bad('origin_crc mismatch');
  const idLen = rec.readUInt8(84);
  const locLen = rec.readUInt16LE(86);
  const chunkSize = rec.readUInt32LE(80);
  if (idLen < 1 || idLen > MAX_ID) return bad(`origin_id_length ${idLen} outside 1 … ${MAX_ID}`);
  if (locLen > MAX_ORIGIN_LOCATION) return bad(`origin_location_length ${locLen} above ${MAX_ORIGIN_LOCATION}`);
  if (!validChunkSize(chunkSize)) return bad(`origin_chunk_size ${chunkSize} is not a power of two from 64 KiB to 4 MiB`);
  const backupId = rec.subarray(88, 88 + idLen).toString('latin1');
  if (!/^[\x21-\x7e]+$/.test(backupId)) return bad('origin_backup_id is not printable ASCII');
  const locBytes = rec.subarray(152, 152 + locLen);
  const location = locBytes.toString('utf8');
  if (!Buffer.from(location, 'utf8').equals(locBytes) || location.includes('\0')) return bad('origin_location is not valid UTF-8');
  const reservedZero = rec[85] === 0 && rec.subarray(88 + idLen, 152).every((x) => x === 0) && rec.subarray(152 + locLen).every((x) => x === 0);
  if (!reservedZero) return bad('reserved bytes of the origin record are not zero');
  const token = copy(rec, 56, 16);
  return {
    state: 'ok',
    record: {
      repoId: copy(rec, 8, 16),
      disk: copy(rec, 24, 16),
      root: copy(rec, 40, 16),
      token: token.every((x) => x === 0) ? null : token,
      bitmapSuffix: copy(rec, 72, 8),
      chunkSize,
      backupId,
      location,
    },
  };
}
