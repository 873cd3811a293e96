/**
 * A bitmap directory slot (formats/ksc_inc.md §6.1): 128 sealed bytes naming a bitmap, its granularity,
 * whether it is enabled, and where its table is. Encoding, decoding with range checks, and a best guess
 * at what a damaged slot said (§6.4).
 */
import { corrupt, KscError } from '../errors.js';
import { BITMAP_DIR_ENTRY_SIZE, BITS_PER_PAGE, MAX_BITMAP_NAME, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS, TAG_BITMAP_DIR } from './constants.js';
import { seal, sealOk } from './seal.js';

const FLAG_IN_USE = 1;
const FLAG_ENABLED = 2;

/** §6.1: table entries of a bitmap of `granularityBits` over `virtualSize` bytes. */
export function bitmapTableEntries(virtualSize: number, granularityBits: number): number {
  return Math.ceil(Math.ceil(virtualSize / 2 ** granularityBits) / BITS_PER_PAGE);
}

/** Encodes a 128-byte bitmap directory slot (§6.1). */
export function encodeBitmapSlot(slot: number, b: { name: string; granularityBits: number; enabled: boolean; tableEntries: number; tableOffset: number } | null): Buffer {
  const rec = Buffer.alloc(BITMAP_DIR_ENTRY_SIZE);
  if (b) {
    const name = Buffer.from(b.name, 'utf8');
    rec[0] = FLAG_IN_USE | (b.enabled ? FLAG_ENABLED : 0);
    rec[1] = b.granularityBits;
    rec[2] = name.length;
    rec.writeUInt32LE(b.tableEntries, 4);
    rec.writeBigUInt64LE(BigInt(b.tableOffset), 8);
    name.copy(rec, 16);
  }
  seal(rec, TAG_BITMAP_DIR, slot);
  return rec;
}

export interface DecodedSlot {
  name: string;
  granularityBits: number;
  enabled: boolean;
  tableEntries: number;
  tableOffset: number;
}

export function decodeBitmapSlot(rec: Buffer, slot: number, file: string, virtualSize: number, fileSize: number): DecodedSlot | null {
  const bad = (why: string): never => {
    throw corrupt(file, 'bitmap directory', `slot ${slot} ${why}`);
  };
  if (!sealOk(rec, TAG_BITMAP_DIR, slot)) bad('checksum mismatch');
  const flags = rec[0]!;
  if ((flags & FLAG_IN_USE) === 0) {
    if (rec.subarray(0, 124).some((x) => x !== 0)) bad('is unused but not empty');
    return null;
  }
  if ((flags & ~(FLAG_IN_USE | FLAG_ENABLED)) !== 0) bad(`has unknown flags 0x${flags.toString(16)}`);
  const g = rec[1]!;
  if (g < MIN_GRANULARITY_BITS || g > MAX_GRANULARITY_BITS) bad(`granularity_bits ${g} outside 12 … 26`);
  const nameLen = rec[2]!;
  if (nameLen < 1 || nameLen > MAX_BITMAP_NAME) bad(`name_length ${nameLen} outside 1 … 64`);
  const tableEntries = rec.readUInt32LE(4);
  if (tableEntries !== bitmapTableEntries(virtualSize, g)) bad('table_entries does not match the virtual size');
  const tableOffset = Number(rec.readBigUInt64LE(8));
  if (tableOffset % 4096 !== 0 || tableOffset < 8192 || tableOffset + tableEntries * 16 > fileSize) bad('table_offset is outside the file');
  return { name: rec.subarray(16, 16 + nameLen).toString('utf8'), granularityBits: g, enabled: (flags & FLAG_ENABLED) !== 0, tableEntries, tableOffset };
}

/** Throws KSC_E_INVALID unless `name` is 1 … 64 bytes of UTF-8 (§6.1). */
export function assertBitmapName(name: string): void {
  const len = Buffer.byteLength(name, 'utf8');
  if (len < 1 || len > MAX_BITMAP_NAME) throw new KscError('KSC_E_INVALID', `bitmap name "${name}" must be 1 … 64 bytes`);
}

/**
 * What a damaged directory slot (§6.4) most likely said, for listing it: its name when the name bytes are
 * plausible UTF-8 (else "damaged-slot-N"), its granularity when in range (else `defaultBits`), its flags.
 */
export function guessBitmapSlot(rec: Buffer, slot: number, defaultBits: number): { name: string; granularityBits: number; enabled: boolean } {
  const g = rec[1]!;
  const nameLen = rec[2]!;
  let name = `damaged-slot-${slot}`;
  if (nameLen >= 1 && nameLen <= MAX_BITMAP_NAME) {
    try {
      const n = new TextDecoder('utf-8', { fatal: true }).decode(rec.subarray(16, 16 + nameLen));
      if (![...n].some((ch) => ch.charCodeAt(0) < 0x20)) name = n; // no control characters
    } catch {
      // not UTF-8: keep the placeholder
    }
  }
  return { name, granularityBits: g >= MIN_GRANULARITY_BITS && g <= MAX_GRANULARITY_BITS ? g : defaultBits, enabled: (rec[0]! & FLAG_ENABLED) !== 0 };
}
