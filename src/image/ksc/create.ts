/**
 * Creating a ksc_inc file (formats/ksc_inc.md §4, §5): the metadata areas laid out after the header
 * slots, written and synced, then header slot A (slot B stays zero, invalid, until the first update).
 */
import { KscError } from '../../errors.js';
import { openHostFile } from '../../io/file.js';
import {
  AUTOCLEAR_BITMAPS,
  BackingFormat,
  BITMAP_DIR_ENTRY_SIZE,
  BITMAP_SLOTS,
  COMPAT_DATA_CSUM,
  DEFAULT_BLOCK_BITS,
  FIRST_FREE_OFFSET,
  HEADER_SLOTS,
  MAX_BLOCK_BITS,
  MAX_DIRECTORY_ENTRIES,
  MAX_INTENT_BITS,
  MAX_INTENT_REGIONS,
  MAX_VIRTUAL_SIZE,
  MIN_BLOCK_BITS,
} from '../../format/constants.js';
import { type Header, defaultIntentBits, directoryEntriesFor, encodeHeader, intentWordsFor } from '../../format/header.js';
import { isPowerOfTwo, log2 } from '../../util/size.js';
import { newUuidBytes } from '../../util/uuid.js';
import { alignUp } from '../allocator.js';
import { encodeBitmapSlot } from '../../format/bitmap-slot.js';
import { IntentLog } from '../intent.js';
import { MapTable } from '../maptable.js';
import type { CreateKscOptions } from './image.js';

/** Creates a new, empty image file (fails if the path exists). Errors name the path. */
export async function createKscFile(path: string, opts: CreateKscOptions): Promise<void> {
  try {
    await createFile(path, opts);
  } catch (e) {
    if (e instanceof KscError && !e.message.includes(path)) throw new KscError(e.code, `${path}: ${e.message}`, { cause: e });
    throw e;
  }
}

/** Block bits and intent bits for the options, checked against the limits of §4 and §7. */
function geometry(opts: CreateKscOptions): { blockBits: number; intentBits: number; dirEntries: number } {
  const blockSize = opts.blockSize ?? 2 ** DEFAULT_BLOCK_BITS;
  if (!isPowerOfTwo(blockSize) || log2(blockSize) < MIN_BLOCK_BITS || log2(blockSize) > MAX_BLOCK_BITS) {
    throw new KscError('KSC_E_INVALID', `block size ${blockSize} must be a power of two from 4 KiB to 2 MiB`);
  }
  const blockBits = log2(blockSize);
  if (!Number.isSafeInteger(opts.size) || opts.size < 1 || opts.size > MAX_VIRTUAL_SIZE) {
    throw new KscError('KSC_E_RANGE', `virtual size ${opts.size} must be 1 byte … 1 PiB`);
  }
  const dirEntries = directoryEntriesFor(opts.size, blockBits);
  if (dirEntries > MAX_DIRECTORY_ENTRIES) {
    throw new KscError('KSC_E_RANGE', `virtual size ${opts.size} is too large for block size ${blockSize}: use a larger block size`);
  }
  const intentBits = opts.intentRegion ? Math.max(blockBits, log2(opts.intentRegion)) : defaultIntentBits(opts.size, blockBits);
  if (intentBits > MAX_INTENT_BITS || (opts.intentRegion !== undefined && !isPowerOfTwo(opts.intentRegion))) {
    throw new KscError('KSC_E_INVALID', `intent region must be a power of two up to 1 GiB`);
  }
  if (Math.ceil(opts.size / 2 ** intentBits) > MAX_INTENT_REGIONS) {
    throw new KscError('KSC_E_INVALID', `intent region ${2 ** intentBits} is too small for virtual size ${opts.size}: at most ${MAX_INTENT_REGIONS} regions (§7)`);
  }
  return { blockBits, intentBits, dirEntries };
}

async function createFile(path: string, opts: CreateKscOptions): Promise<void> {
  const { blockBits, intentBits, dirEntries } = geometry(opts);
  const intentWords = intentWordsFor(opts.size, intentBits);
  let pos = FIRST_FREE_OFFSET;
  const place = (bytes: number): number => {
    const at = pos;
    pos = alignUp(pos + bytes, 4096);
    return at;
  };
  const directoryOffset = place(dirEntries * 16);
  const bitmapDirOffset = place(BITMAP_SLOTS * BITMAP_DIR_ENTRY_SIZE);
  const intentOffset = place(intentWords * 16);
  const backingName = opts.backingName ?? '';
  const header: Header = {
    version: 1,
    mapPageBits: 12,
    backingNameLength: Buffer.byteLength(opts.backingName ?? ''),
    generation: 1,
    incompatible: 0n,
    compatible: COMPAT_DATA_CSUM,
    autoclear: AUTOCLEAR_BITMAPS,
    diskUuid: opts.diskUuid ?? newUuidBytes(),
    virtualSize: opts.size,
    blockBits,
    directoryOffset,
    directoryEntries: dirEntries,
    intentBits,
    intentOffset,
    intentWords,
    bitmapSlots: BITMAP_SLOTS,
    bitmapDirOffset,
    freeListOffset: 0,
    freeListEntries: 0,
    backingFormat: backingName === '' ? BackingFormat.None : opts.backup ? BackingFormat.Backup : opts.backingFormat === 'raw' ? BackingFormat.Raw : BackingFormat.Ksc,
    backingName,
    backup: opts.backup ?? null,
    localBase: opts.localBase ?? null,
  };
  const headerBuf = encodeHeader(header); // validates the backing name before the file exists
  const file = await (opts.opener ?? openHostFile)(path, { write: true, create: true });
  try {
    const slots = Buffer.alloc(BITMAP_SLOTS * BITMAP_DIR_ENTRY_SIZE);
    for (let s = 0; s < BITMAP_SLOTS; s++) encodeBitmapSlot(s, null).copy(slots, s * BITMAP_DIR_ENTRY_SIZE);
    await file.write(MapTable.emptyDirectory(dirEntries), directoryOffset);
    await file.write(slots, bitmapDirOffset);
    await file.write(IntentLog.empty(intentWords), intentOffset);
    await file.truncate(pos);
    await file.sync();
    // Slot A holds the only header; slot B stays zero (invalid) until the first header update.
    await file.write(headerBuf, HEADER_SLOTS[0]);
    await file.sync();
  } finally {
    await file.close();
  }
}
