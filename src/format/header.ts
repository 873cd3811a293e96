/** Header slot codec (formats/ksc_inc.md §4). Pure: no I/O. */
import { crc32 } from 'node:zlib';
import { KscError, corrupt } from '../errors.js';
import {
  BackingFormat,
  BITMAP_SLOTS,
  HEADER_SIZE,
  KNOWN_INCOMPAT,
  MAGIC,
  MAP_PAGE_BITS,
  MAX_BACKING_NAME,
  DEFAULT_INTENT_BITS,
  MAX_BLOCK_BITS,
  MAX_DEFAULT_INTENT_REGIONS,
  MAX_DIRECTORY_ENTRIES,
  MAX_INTENT_BITS,
  MAX_VIRTUAL_SIZE,
  MIN_BLOCK_BITS,
  VERSION,
} from './constants.js';
import { decodeOrigin, encodeOrigin, type OriginSlot } from './origin.js';
import { decodeLocalBase, encodeLocalBase, localBaseProblem, type LocalBaseRef } from './local-base.js';

/** §4.2: the backup a live-restored image reads through to (backing_format 3). */
export interface BackupRef {
  /** The manifest's disk UUID, 16 bytes. */
  disk: Buffer;
  /** The manifest's Merkle root (repository.md §7.3), 16 bytes: its fingerprint. */
  root: Buffer;
  chunkSize: number;
  id: string;
}

/** §4.2 byte offsets and limits of backup_backing. */
export const BACKUP_REF_OFFSET = 1168;
export const MAX_BACKUP_ID = 64;

export interface Header {
  version: number;
  mapPageBits: number;
  backingNameLength: number;
  generation: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  diskUuid: Buffer;
  virtualSize: number;
  blockBits: number;
  directoryOffset: number;
  directoryEntries: number;
  intentBits: number;
  intentOffset: number;
  intentWords: number;
  bitmapSlots: number;
  bitmapDirOffset: number;
  freeListOffset: number;
  freeListEntries: number;
  backingFormat: BackingFormat;
  backingName: string;
  /** With backingFormat Backup (3): the backup (§4.2); absent or null otherwise. */
  backup?: BackupRef | null;
  /** §4.3: the backup a restored image is a copy of; written only when `ok` (a damaged record is dropped). */
  origin?: OriginSlot;
  /** §4.2 rule 9: with backingFormat Backup, the local copy of the disk's raw base; absent or null when none. */
  localBase?: LocalBaseRef | null;
}

function encodeBackupRef(r: BackupRef, b: Buffer): void {
  const id = Buffer.from(r.id, 'ascii');
  if (id.length < 1 || id.length > MAX_BACKUP_ID || !/^[\x21-\x7e]+$/.test(r.id)) throw new KscError('KSC_E_INVALID', `backup id "${r.id}" must be 1 … ${MAX_BACKUP_ID} printable ASCII characters`);
  if (r.disk.length !== 16 || r.root.length !== 16) throw new KscError('KSC_E_INVALID', 'a backup backing needs a 16-byte disk UUID and Merkle root');
  const o = BACKUP_REF_OFFSET;
  r.disk.copy(b, o);
  r.root.copy(b, o + 16);
  b.writeUInt32LE(r.chunkSize, o + 32);
  b.writeUInt8(id.length, o + 36);
  id.copy(b, o + 40);
}

function decodeBackupRef(b: Buffer): BackupRef {
  const o = BACKUP_REF_OFFSET;
  const n = b.readUInt8(o + 36);
  return {
    disk: Buffer.from(b.subarray(o, o + 16)),
    root: Buffer.from(b.subarray(o + 16, o + 32)),
    chunkSize: b.readUInt32LE(o + 32),
    id: b.subarray(o + 40, o + 40 + Math.min(n, MAX_BACKUP_ID)).toString('latin1') + (n > MAX_BACKUP_ID ? '\0' : ''),
  };
}

export function encodeHeader(h: Omit<Header, 'version' | 'mapPageBits' | 'backingNameLength'>): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(VERSION, 8);
  b.writeUInt32LE(HEADER_SIZE, 12);
  b.writeBigUInt64LE(BigInt(h.generation), 16);
  b.writeBigUInt64LE(h.incompatible, 24);
  b.writeBigUInt64LE(h.compatible, 32);
  b.writeBigUInt64LE(h.autoclear, 40);
  h.diskUuid.copy(b, 48, 0, 16);
  b.writeBigUInt64LE(BigInt(h.virtualSize), 64);
  b.writeUInt32LE(h.blockBits, 72);
  b.writeUInt32LE(MAP_PAGE_BITS, 76);
  b.writeBigUInt64LE(BigInt(h.directoryOffset), 80);
  b.writeUInt32LE(h.directoryEntries, 88);
  b.writeUInt32LE(h.intentBits, 92);
  b.writeBigUInt64LE(BigInt(h.intentOffset), 96);
  b.writeUInt32LE(h.intentWords, 104);
  b.writeUInt32LE(h.bitmapSlots, 108);
  b.writeBigUInt64LE(BigInt(h.bitmapDirOffset), 112);
  b.writeBigUInt64LE(BigInt(h.freeListOffset), 120);
  b.writeUInt32LE(h.freeListEntries, 128);
  b.writeUInt32LE(h.backingFormat, 132);
  const name = Buffer.from(h.backingName, 'utf8');
  if (name.length > MAX_BACKING_NAME) {
    throw new KscError('KSC_E_INVALID', `backing file name is ${name.length} bytes; the limit is ${MAX_BACKING_NAME}`);
  }
  b.writeUInt16LE(name.length, 136);
  name.copy(b, 144);
  if (h.backingFormat === BackingFormat.Backup) {
    if (!h.backup) throw new KscError('KSC_E_INVALID', 'backing_format 3 needs the backup it names (§4.2)');
    encodeBackupRef(h.backup, b);
  }
  if (h.origin?.state === 'ok') encodeOrigin(h.origin.record, b);
  if (h.localBase) {
    if (h.backingFormat !== BackingFormat.Backup) throw new KscError('KSC_E_INVALID', 'a local base goes with backing_format 3 only (§4.2 rule 9)');
    encodeLocalBase(h.localBase, b);
  }
  b.writeUInt32LE(crc32(b.subarray(0, HEADER_SIZE - 4)), HEADER_SIZE - 4);
  return b;
}

export type SlotResult = { ok: true; header: Header } | { ok: false; reason: string; hasMagic: boolean };

/** Checks the slot's own integrity (magic, version, size, CRC); field ranges are checked by validateHeader. */
export function decodeHeaderSlot(b: Buffer): SlotResult {
  const hasMagic = b.length >= 8 && b.subarray(0, 8).equals(MAGIC);
  if (b.length < HEADER_SIZE) return { ok: false, reason: 'truncated', hasMagic };
  if (!hasMagic) return { ok: false, reason: 'bad magic', hasMagic };
  // A slot whose CRC fails is torn or damaged: the other slot may serve. A slot whose CRC matches says what
  // its writer meant, so its field values are judged by validateHeader, which refuses the image.
  if (b.readUInt32LE(HEADER_SIZE - 4) !== crc32(b.subarray(0, HEADER_SIZE - 4))) {
    return { ok: false, reason: 'checksum mismatch', hasMagic };
  }
  const big = (off: number): number => {
    const v = b.readBigUInt64LE(off);
    return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(v);
  };
  const nameLen = b.readUInt16LE(136);
  const header: Header = {
    version: b.readUInt32LE(8),
    mapPageBits: b.readUInt32LE(76),
    backingNameLength: nameLen,
    generation: big(16),
    incompatible: b.readBigUInt64LE(24),
    compatible: b.readBigUInt64LE(32),
    autoclear: b.readBigUInt64LE(40),
    diskUuid: Buffer.from(b.subarray(48, 64)),
    virtualSize: big(64),
    blockBits: b.readUInt32LE(72),
    directoryOffset: big(80),
    directoryEntries: b.readUInt32LE(88),
    intentBits: b.readUInt32LE(92),
    intentOffset: big(96),
    intentWords: b.readUInt32LE(104),
    bitmapSlots: b.readUInt32LE(108),
    bitmapDirOffset: big(112),
    freeListOffset: big(120),
    freeListEntries: b.readUInt32LE(128),
    backingFormat: b.readUInt32LE(132) as BackingFormat,
    backingName: nameLen <= MAX_BACKING_NAME ? b.subarray(144, 144 + nameLen).toString('utf8') : '',
    backup: b.readUInt32LE(132) === BackingFormat.Backup ? decodeBackupRef(b) : null,
    origin: decodeOrigin(b),
    localBase: decodeLocalBase(b),
  };
  return { ok: true, header };
}

export function directoryEntriesFor(virtualSize: number, blockBits: number): number {
  return Math.ceil(virtualSize / 2 ** (blockBits + MAP_PAGE_BITS));
}

/** §7: the intent_bits a new image gets when its creator does not choose (see DEFAULT_INTENT_BITS). */
export function defaultIntentBits(virtualSize: number, blockBits: number): number {
  let bits = Math.max(blockBits, DEFAULT_INTENT_BITS);
  while (bits < MAX_INTENT_BITS && Math.ceil(virtualSize / 2 ** bits) > MAX_DEFAULT_INTENT_REGIONS) bits++;
  return bits;
}

export function intentWordsFor(virtualSize: number, intentBits: number): number {
  return Math.ceil(Math.ceil(virtualSize / 2 ** intentBits) / 64);
}

/** §4: every field in range and every structure inside the file. Throws KSC_E_CORRUPT / KSC_E_FORMAT. */
export function validateHeader(h: Header, file: string, fileSize: number): void {
  const bad = (field: string, why: string): never => {
    throw corrupt(file, 'header', `field ${field} ${why}`);
  };
  if (h.version !== VERSION) {
    throw new KscError('KSC_E_FORMAT', `image ${file}: format version ${h.version} is not supported (this kscinc reads version ${VERSION})`);
  }
  if (h.mapPageBits !== MAP_PAGE_BITS) {
    throw new KscError('KSC_E_FORMAT', `image ${file}: map_page_bits ${h.mapPageBits} is not supported (version 1 requires ${MAP_PAGE_BITS})`);
  }
  if (!Number.isSafeInteger(h.generation) || h.generation > 2 ** 52) bad('generation', 'is above 2^52');
  if (h.backingNameLength > MAX_BACKING_NAME) bad('backing_name_length', `${h.backingNameLength} is above ${MAX_BACKING_NAME}`);
  if (h.backingName.includes('\0')) bad('backing_name', 'contains a NUL byte');
  const unknown = h.incompatible & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    throw new KscError('KSC_E_FORMAT', `image ${file}: unknown incompatible features 0x${unknown.toString(16)}; a newer kscinc wrote it`);
  }
  if (!(h.virtualSize >= 1 && h.virtualSize <= MAX_VIRTUAL_SIZE)) bad('virtual_size', `${Number.isFinite(h.virtualSize) ? h.virtualSize : 'above 2^53'} outside 1 … 2^50`);
  if (!(h.blockBits >= MIN_BLOCK_BITS && h.blockBits <= MAX_BLOCK_BITS)) bad('block_bits', `${h.blockBits} outside 12 … 21`);
  if (h.directoryEntries !== directoryEntriesFor(h.virtualSize, h.blockBits)) bad('directory_entries', 'does not match virtual_size');
  if (h.directoryEntries > MAX_DIRECTORY_ENTRIES) bad('directory_entries', 'above 2^22');
  if (!(h.intentBits >= h.blockBits && h.intentBits <= MAX_INTENT_BITS)) bad('intent_bits', `${h.intentBits} outside block_bits … 30`);
  if (h.intentWords !== intentWordsFor(h.virtualSize, h.intentBits)) bad('intent_words', 'does not match virtual_size');
  if (!(h.bitmapSlots >= 1 && h.bitmapSlots <= BITMAP_SLOTS)) bad('bitmap_slots', `${h.bitmapSlots} outside 1 … 64`);
  const inFile = (field: string, offset: number, bytes: number): void => {
    if (!Number.isSafeInteger(offset) || offset % 4096 !== 0 || offset < 8192) bad(field, `${offset} is not a valid offset`);
    if (offset + bytes > fileSize) {
      throw corrupt(file, 'header', `field ${field} points past the end of the file (${offset + bytes} > ${fileSize}): the file is truncated`);
    }
  };
  inFile('directory_offset', h.directoryOffset, h.directoryEntries * 16);
  inFile('intent_offset', h.intentOffset, h.intentWords * 16);
  inFile('bitmap_dir_offset', h.bitmapDirOffset, h.bitmapSlots * 128);
  if (h.freeListOffset !== 0) inFile('free_list_offset', h.freeListOffset, h.freeListEntries * 16);
  if (h.backingFormat > 3) bad('backing_format', `${h.backingFormat} unknown`);
  if (h.backingFormat === BackingFormat.Backup) {
    const r = h.backup!;
    if (!/^[\x21-\x7e]{1,64}$/.test(r.id)) bad('backup_id', 'is not 1 … 64 printable ASCII characters');
    if (!(r.chunkSize >= 64 << 10 && r.chunkSize <= 4 << 20 && (r.chunkSize & (r.chunkSize - 1)) === 0)) bad('chunk_size', `${r.chunkSize} is not a power of two from 64 KiB to 4 MiB`);
  }
  if ((h.backingFormat === 0) !== (h.backingName.length === 0)) bad('backing_name_length', 'disagrees with backing_format');
  const lb = h.localBase ? localBaseProblem(h.localBase, h.backingFormat) : null;
  if (lb) bad(lb[0], lb[1]);
}
