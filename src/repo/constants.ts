/**
 * Every magic number, fixed size, limit and object name of the repository format (formats/repository.md),
 * in one place. The magics and sizes are frozen: a change here is a new format version, not a refactor.
 */
import { randomBytes } from 'node:crypto';

export const MIB = 1024 * 1024;

// §1 object names ---------------------------------------------------------------------------------------

/** A new pack, index object or repository id: 32 hex digits (128 random bits). */
export function randomHexId(): string {
  return randomBytes(16).toString('hex');
}
export const CONFIG_KEY = 'config';
export const packKey = (id: string): string => `packs/${id.slice(0, 2)}/${id}.pack`;
export const indexKey = (id: string): string => `index/${id}.idx`;
export const manifestKey = (id: string): string => `manifests/${id}.manifest`;
export const PACK_KEY_RE = /^packs\/[0-9a-f]{2}\/([0-9a-f]{32})\.pack$/;
export const INDEX_KEY_RE = /^index\/([0-9a-f]{32})\.idx$/;
export const MANIFEST_KEY_RE = /^manifests\/(.+)\.manifest$/;
/** The folders only a repository has (§3.1): a location holding any of them is a repository. */
export const REPO_PREFIXES = ['manifests/', 'index/', 'packs/', 'locks/', 'keys/'];

// §3 config ---------------------------------------------------------------------------------------------

export const CONFIG_FORMAT = 'kscinc-repository';
export const CONFIG_VERSION = 1;
/** §13.1: a config with a `features` list. */
export const CONFIG_VERSION_2 = 2;
export const FEATURE_ENCRYPTED = 'encrypted';
export const KNOWN_FEATURES = [FEATURE_ENCRYPTED];
/** §3: the smallest chunk size (64 KiB: one default bitmap granule, so an incremental reads only dirty granules). */
export const MIN_CHUNK = 64 * 1024;
export const MAX_CHUNK = 4 * MIB;
/** §3.2 rule 6: the chunk size of a repository created without one (256 KiB since session 15; why: the rule). */
export const DEFAULT_CHUNK = 256 * 1024;
export const MIN_PACK = 4 * MIB;
export const MAX_PACK = 256 * MIB;
export const DEFAULT_PACK = 32 * MIB;

// §5 packs ----------------------------------------------------------------------------------------------

export const PACK_MAGIC = Buffer.from('KSCPACK1');
export const PACK_END_MAGIC = Buffer.from('KSCPEND1');
export const PACK_VERSION = 1;
/** §13.5: the pack version of an encrypted repository (encrypted blobs, sealed footer). */
export const PACK_VERSION_ENCRYPTED = 2;
/** §13.5: an encrypted blob's magic ("KBLE" read as u32 LE). */
export const BLOB_MAGIC_ENCRYPTED = 0x454c424b;
/** §5.1: magic, version, reserved. */
export const PACK_HEADER = 16;
/** §5.3: id, offset, length, raw length. */
export const FOOTER_ENTRY = 48;
/** §5.3: count, entries CRC, entries offset, reserved, tail CRC, end magic. */
export const FOOTER_TAIL = 32;
/** §5.2: the smallest blob, a 32-byte header and one stored byte. */
export const MIN_BLOB = 33;

// §6 index objects --------------------------------------------------------------------------------------

export const INDEX_MAGIC = Buffer.from('KSCINDX1');
export const INDEX_VERSION = 1;
export const INDEX_HEADER = 32;
/** A pack id in the index's pack table. */
export const INDEX_PACK_ID = 16;
export const INDEX_ENTRY = 40;

// §7 manifests ------------------------------------------------------------------------------------------

export const MANIFEST_MAGIC = Buffer.from('KSCMANI1');
export const MANIFEST_END = Buffer.from('KEND');
export const MANIFEST_VERSION = 1;
export const MANIFEST_HEADER = 96;
export const MANIFEST_TRAILER = 32;
export const FLAG_FULL = 1;
/** §7.2: the chunk-id section is stored LZ4-compressed (u32 raw length + one block, as §5.4). Read only. */
export const FLAG_IDS_LZ4 = 2;
/** §7.2, §7.5: the chunk-id section is segmented. Every manifest written now has it. */
export const FLAG_IDS_SEGMENTED = 4;
/** §7.5: ids per segment of a segmented chunk-id section and of a ChunkList (1 MiB of ids; 256 × 256, so a full segment is one node of the Merkle tree's level 2). */
export const SEGMENT_IDS = 65536;
/** §7.5 segment encodings. */
export const SEG_ZERO = 0;
export const SEG_RAW = 1;
export const SEG_LZ4 = 2;
/** §7.2: the largest metadata JSON. */
export const MAX_META = 1024 * 1024;
/** The largest input one LZ4 block takes (an IDS_LZ4 chunk-id section, §7.2). */
export const MAX_LZ4_INPUT = 0x7e000000;
/** §7.1: a backup id, e.g. 20261126T125422123Z-1a2b3c4d. */
export const BACKUP_ID_RE = /^\d{8}T\d{9}Z-[0-9a-f]{8}$/;
