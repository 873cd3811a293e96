/** Constants of formats/ksc_inc.md; each names its section. */

/** §4: frozen magic "KSC_INC\0". */
export const MAGIC = Buffer.from([0x4b, 0x53, 0x43, 0x5f, 0x49, 0x4e, 0x43, 0x00]);
export const VERSION = 1;
export const HEADER_SIZE = 4096;
/** §4: slot A at 0, slot B at 4096. */
export const HEADER_SLOTS = [0, 4096] as const;
/** First host offset available to structures and clusters. */
export const FIRST_FREE_OFFSET = 8192;

/** §4.1 feature bits. */
export const INCOMPAT_DIRTY = 1n;
/** §4.1: the disk was migrated to another host; this copy is stale and writers refuse it unless forced. */
export const INCOMPAT_MIGRATED_AWAY = 2n;
export const KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_MIGRATED_AWAY;
export const COMPAT_DATA_CSUM = 1n;
/** §4.1: the image is the backing of a snapshot overlay; writers refuse data changes unless forced. */
export const COMPAT_FROZEN = 2n;
export const AUTOCLEAR_BITMAPS = 1n;
export const KNOWN_AUTOCLEAR = AUTOCLEAR_BITMAPS;

/** §11 limits. */
export const MIN_BLOCK_BITS = 12;
export const MAX_BLOCK_BITS = 21;
export const DEFAULT_BLOCK_BITS = 16;
export const MAX_VIRTUAL_SIZE = 2 ** 50;
export const MAX_DIRECTORY_ENTRIES = 2 ** 22;
export const MAP_PAGE_BITS = 12;
export const MAP_PAGE_ENTRIES = 1 << MAP_PAGE_BITS;
export const RECORD_SIZE = 16;
export const MAP_PAGE_BYTES = MAP_PAGE_ENTRIES * RECORD_SIZE;
/**
 * §7/§11: the default intent region is 256 KiB (at least the block size), made coarser only as far as
 * needed to keep a disk at most MAX_DEFAULT_INTENT_REGIONS regions (65 536 intent words, 1 MiB, read at
 * every open): 256 KiB up to 1 TiB, 4 MiB at 16 TiB. Smaller regions mark less after a crash; larger ones
 * cost fewer first-touch syncs and fewer words (bench/crash-overmark.mjs, bench races 3 and 4).
 */
export const DEFAULT_INTENT_BITS = 18;
export const MAX_DEFAULT_INTENT_REGIONS = 2 ** 22;
/** §7: a writer creates no image with more intent regions (2^18 words, 4 MiB), whatever region it is asked for. */
export const MAX_INTENT_REGIONS = 2 ** 24;
export const MAX_INTENT_BITS = 30;
export const BITMAP_SLOTS = 64;
export const BITMAP_DIR_ENTRY_SIZE = 128;
export const MAX_BITMAP_NAME = 64;
export const MIN_GRANULARITY_BITS = 12;
export const MAX_GRANULARITY_BITS = 26;
/** §6.3: a bitmap page is 256 words of 64 bits. */
export const WORDS_PER_PAGE = 256;
export const BITS_PER_PAGE = WORDS_PER_PAGE * 64;
export const BITMAP_PAGE_BYTES = WORDS_PER_PAGE * RECORD_SIZE;
export const MAX_BACKING_NAME = 1024;
export const MAX_CHAIN_DEPTH = 64;

/** §3 record tags. */
export const TAG_DIR = 1;
export const TAG_MAP = 2;
export const TAG_BITMAP_DIR = 3;
export const tagBitmapTable = (slot: number): number => 4 + 256 * slot;
export const tagBitmapWord = (slot: number): number => 5 + 256 * slot;
export const TAG_INTENT = 6;
export const TAG_FREE = 7;

/** §5.2 map entry states. */
export const enum BlockState {
  Unallocated = 0,
  Zero = 1,
  Data = 2,
}
export const DESC_STATE_MASK = 3;
export const DESC_CSUM_VALID = 4;
export const DESC_RESERVED_MASK = 0xff8;

export const enum BackingFormat {
  None = 0,
  Raw = 1,
  Ksc = 2,
  /** §4.2: a backup in a repository (live restore). */
  Backup = 3,
}
