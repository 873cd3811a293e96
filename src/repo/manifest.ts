/**
 * Manifests (formats/repository.md §7): one backup's header, metadata, chunk-id section and trailer. The
 * writer makes the object as it is sent (manifestBody); the readers check everything and read a large
 * manifest in ranges (readManifestFrom), or only as far as its metadata (readManifestInfoFrom).
 */
import { crc32 } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { KscError } from '../errors.js';
import { ID_BYTES } from '../hash/chunkid.js';
import { compressInto, decompressInto, lz4Bound } from '../compress/lz4.js';
import { uuidToBytes, bytesToUuid } from '../util/uuid.js';
import { isoUtc } from '../util/time.js';
import type { StreamBody } from '../objstore/types.js';
import { ChunkList, ownBuffer, type SegmentStore } from './chunklist.js';
import {
  FLAG_FULL,
  FLAG_IDS_LZ4,
  FLAG_IDS_SEGMENTED,
  MANIFEST_END,
  MANIFEST_HEADER,
  MANIFEST_MAGIC,
  MANIFEST_TRAILER,
  MANIFEST_VERSION,
  MAX_LZ4_INPUT,
  MAX_META,
  SEGMENT_IDS,
  SEG_LZ4,
  SEG_RAW,
  SEG_ZERO,
} from './constants.js';
import { assertChunkSize } from './config.js';
import { corrupt, safeU64, unsupported } from './corrupt.js';

export interface BackupStats {
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  chunksDirty: number;
  durationMs: number;
}

export interface ManifestMeta {
  id: string;
  parent: string | null;
  tags: string[];
  source: string;
  bitmap: string | null;
  stats: BackupStats;
  /** §7.2: the disk's raw base (formats/ksc_inc.md §4.2 rule 9); read it through parseBaseRecord (src/repo/base-record.ts). */
  base?: unknown;
}

export interface Manifest {
  full: boolean;
  disk: string; // uuid text form, 8-4-4-4-12
  timeMs: number;
  size: number;
  chunkSize: number;
  bitmapToken: string | null; // 32 hex digits
  meta: ManifestMeta;
  /** The chunk ids in disk order (§7.2), in segments (all-zero ones not allocated). */
  ids: ChunkList;
  root: Buffer;
}

export function chunkCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize);
}

function manifestHead(m: Omit<Manifest, 'root' | 'ids'>, chunks: number, flags: number): Buffer {
  const meta = Buffer.from(JSON.stringify(m.meta));
  if (meta.length > MAX_META) throw new KscError('KSC_E_INVALID', 'manifest metadata above 1 MiB (too many or too long tags?)');
  const b = Buffer.alloc(MANIFEST_HEADER + meta.length);
  MANIFEST_MAGIC.copy(b, 0);
  b.writeUInt32LE(MANIFEST_VERSION, 8);
  b.writeUInt32LE(flags | (m.full ? FLAG_FULL : 0), 12);
  uuidToBytes(m.disk).copy(b, 16);
  b.writeBigUInt64LE(BigInt(m.timeMs), 32);
  b.writeBigUInt64LE(BigInt(m.size), 40);
  b.writeUInt32LE(m.chunkSize, 48);
  b.writeUInt32LE(meta.length, 52);
  b.writeBigUInt64LE(BigInt(chunks), 56);
  if (m.bitmapToken) b.write(m.bitmapToken, 64, 'hex');
  meta.copy(b, MANIFEST_HEADER);
  return b;
}

/** The trailer after bytes whose running CRC-32 is `crc`. */
function manifestTrailer(crc: number, root: Buffer): Buffer {
  const t = Buffer.alloc(MANIFEST_TRAILER);
  root.copy(t, 0);
  crc = crc32(t.subarray(0, 24), crc);
  t.writeUInt32LE(crc, 24);
  MANIFEST_END.copy(t, 28);
  return t;
}

/** Compressed segment payloads a manifest body keeps between its passes, at most (beyond: compressed again). */
const KEEP_COMPRESSED = 16 * 1024 * 1024;

/**
 * The manifest as a body made as it is sent (§7, IDS_SEGMENTED), holding one segment at a time, so a
 * densely written 16 TiB disk's manifest (256 MiB of ids) never sits whole in memory. The segment table
 * and the checksum need every payload before the first is sent, so the payloads are made in passes:
 * one for the table, one for the checksum, one per parts() call. LZ4 payloads are kept between passes up
 * to 16 MiB and compressed again beyond; RAW ones are views of the list's segments (do not change the list
 * while the body is in use).
 */
export function manifestBody(m: Omit<Manifest, 'root'>): StreamBody {
  const chunks = chunkCount(m.size, m.chunkSize);
  if (m.ids.length !== chunks) throw new KscError('KSC_E_INVALID', `manifest needs ${chunks} chunk ids, got ${m.ids.length}`);
  const n = m.ids.segmentCount;
  const head = manifestHead(m, chunks, FLAG_IDS_SEGMENTED);
  const table = Buffer.alloc(8 + 8 * n);
  table.writeUInt32LE(SEGMENT_IDS, 0);
  table.writeUInt32LE(n, 4);
  const kept = new Map<number, Buffer>();
  let keptBytes = 0;
  let scratch: Buffer | null = null;
  /** Segment i's encoding and stored payload (null: all zero); from `kept`, the list, or compressed afresh. */
  const payload = (i: number): { enc: number; p: Buffer } | null => {
    const k = kept.get(i);
    if (k) return { enc: SEG_LZ4, p: k };
    const seg = m.ids.segment(i);
    if (!seg) return null;
    scratch ??= Buffer.allocUnsafe(lz4Bound(SEGMENT_IDS * ID_BYTES));
    const c = compressInto(seg, scratch, 0);
    return c > 0 && c < seg.length ? { enc: SEG_LZ4, p: scratch.subarray(0, c) } : { enc: SEG_RAW, p: seg };
  };
  let size = head.length + table.length + MANIFEST_TRAILER;
  for (let i = 0; i < n; i++) {
    const got = payload(i);
    const e = 8 + 8 * i;
    table[e] = got?.enc ?? SEG_ZERO;
    if (!got) continue;
    table.writeUInt32LE(got.p.length, e + 4);
    size += got.p.length;
    if (got.enc === SEG_LZ4 && keptBytes + got.p.length <= KEEP_COMPRESSED) {
      kept.set(i, Buffer.from(got.p));
      keptBytes += got.p.length;
    }
  }
  let crc = crc32(table, crc32(head));
  for (let i = 0; i < n; i++) {
    const got = payload(i);
    if (got) crc = crc32(got.p, crc);
  }
  const trailer = manifestTrailer(crc, m.ids.merkleRoot());
  return {
    size,
    *parts(): Generator<Buffer> {
      yield head;
      yield table;
      for (let i = 0; i < n; i++) {
        const p = payload(i)?.p;
        // A fresh compression lands in the shared scratch buffer: hand out a copy, since the next one reuses it.
        if (p) yield scratch !== null && p.buffer === scratch.buffer ? Buffer.from(p) : p;
      }
      yield trailer;
    },
  };
}

/** The manifest as the pieces of one object (see manifestBody). */
export function encodeManifestParts(m: Omit<Manifest, 'root'>): Buffer[] {
  return [...manifestBody(m).parts()];
}

export function encodeManifest(m: Omit<Manifest, 'root'>): Buffer {
  return Buffer.concat(encodeManifestParts(m));
}

/** Where a decoded list of `chunks` ids keeps its segments (null: all in memory). */
export type StoreFor = (chunks: number) => SegmentStore | null;
const noStore: StoreFor = () => null;

/** §7.5: checks a segmented section's 8-byte header; returns the segment count. */
function segmentedHeader(h: Buffer, ids: ChunkList, chunks: number, object: string): number {
  const S = h.readUInt32LE(0);
  const n = h.readUInt32LE(4);
  if (S !== SEGMENT_IDS) throw corrupt(object, `the chunk-id section has ${S} ids per segment, not ${SEGMENT_IDS}`);
  if (n !== ids.segmentCount) throw corrupt(object, `the chunk-id section has ${n} segments; ${chunks} chunks need ${ids.segmentCount}`);
  return n;
}

/** §7.5: checks segment i's table entry; returns its encoding and stored length. */
function segmentEntry(table: Buffer, e: number, ids: ChunkList, i: number, n: number, object: string): { enc: number; len: number } {
  const enc = table[e]!;
  const len = table.readUInt32LE(e + 4);
  const raw = ids.segmentLength(i) * ID_BYTES;
  const what = `chunk-list segment ${i} of ${n}`;
  if (table[e + 1] !== 0 || table[e + 2] !== 0 || table[e + 3] !== 0) throw corrupt(object, `${what}: reserved bytes are not zero`);
  if (enc === SEG_ZERO && len !== 0) throw corrupt(object, `${what}: an all-zero segment with ${len} stored bytes`);
  if (enc !== SEG_ZERO && enc !== SEG_RAW && enc !== SEG_LZ4) throw corrupt(object, `${what}: unknown encoding ${enc}`);
  if (enc === SEG_RAW && len !== raw) throw corrupt(object, `${what}: ${len} stored bytes, a raw segment of ${raw / ID_BYTES} ids is ${raw}`);
  if (enc === SEG_LZ4 && len < 5) throw corrupt(object, `${what}: ${len} stored bytes is too short for an LZ4 segment`);
  return { enc, len };
}

/** §7.5: puts segment i's payload into the list. */
function putPayload(ids: ChunkList, i: number, n: number, enc: number, payload: Buffer, object: string): void {
  if (enc === SEG_RAW) {
    ids.putSegment(i, payload);
    return;
  }
  const raw = ids.segmentLength(i) * ID_BYTES;
  const what = `chunk-list segment ${i} of ${n}`;
  if (payload.readUInt32LE(0) !== raw) throw corrupt(object, `${what}: LZ4 raw length ${payload.readUInt32LE(0)}, the segment's ${raw / ID_BYTES} ids are ${raw} bytes`);
  const out = ownBuffer(raw);
  if (decompressInto(payload, out, 0) !== raw) throw corrupt(object, `${what}: the LZ4 block does not decode to ${raw} bytes`);
  ids.putSegment(i, out, true);
}

/** §7.5: decodes a segmented chunk-id section segment by segment. */
function decodeSegmented(section: Buffer, chunks: number, object: string, storeFor: StoreFor): ChunkList {
  if (section.length < 8) throw corrupt(object, `the chunk-id section is ${section.length} bytes, too short for its header (truncated?)`);
  const ids = new ChunkList(chunks, storeFor(chunks));
  const n = segmentedHeader(section, ids, chunks, object);
  if (section.length < 8 + 8 * n) throw corrupt(object, `the chunk-id section's table of ${n} segments is truncated`);
  let pos = 8 + 8 * n;
  for (let i = 0; i < n; i++) {
    const { enc, len } = segmentEntry(section, 8 + 8 * i, ids, i, n, object);
    if (enc === SEG_ZERO) continue;
    if (len > section.length - pos)
      throw corrupt(object, `chunk-list segment ${i} of ${n}: ${len} stored bytes at section offset ${pos} run past the end of the section (${section.length} bytes; truncated?)`);
    putPayload(ids, i, n, enc, section.subarray(pos, pos + len), object);
    pos += len;
  }
  if (pos !== section.length) throw corrupt(object, `the chunk-id section has ${section.length - pos} bytes after its last segment`);
  return ids;
}

/** The header fields of a manifest (§7.2) checked, from its first MANIFEST_HEADER bytes. */
function manifestFields(b: Buffer, object: string): { flags: number; size: number; chunkSize: number; metaLen: number; chunks: number } {
  if (b.length < MANIFEST_HEADER || !b.subarray(0, 8).equals(MANIFEST_MAGIC)) throw corrupt(object, 'not a manifest (bad magic or truncated)');
  if (b.readUInt32LE(8) !== MANIFEST_VERSION) throw unsupported(object, `manifest version ${b.readUInt32LE(8)} is not supported`);
  const flags = b.readUInt32LE(12);
  if (flags & ~(FLAG_FULL | FLAG_IDS_LZ4 | FLAG_IDS_SEGMENTED)) throw corrupt(object, `unknown flags 0x${flags.toString(16)}`);
  if (flags & FLAG_IDS_LZ4 && flags & FLAG_IDS_SEGMENTED) throw corrupt(object, 'flags IDS_LZ4 and IDS_SEGMENTED are both set');
  const size = safeU64(b, 40, object, 'virtual size');
  const chunkSize = b.readUInt32LE(48);
  try {
    assertChunkSize(chunkSize);
  } catch {
    throw corrupt(object, `chunk size ${chunkSize} is not a power of two from 64 KiB to 4 MiB`);
  }
  const metaLen = b.readUInt32LE(52);
  const chunks = safeU64(b, 56, object, 'chunk count');
  if (chunks !== chunkCount(size, chunkSize)) throw corrupt(object, `chunk count ${chunks} does not match size ${size}`);
  if (metaLen > MAX_META) throw corrupt(object, 'length does not match its header (truncated?)');
  return { flags, size, chunkSize, metaLen, chunks };
}

function manifestMeta(b: Buffer, object: string): ManifestMeta {
  let meta: ManifestMeta;
  try {
    meta = JSON.parse(b.toString('utf8')) as ManifestMeta;
  } catch {
    throw corrupt(object, 'metadata is not valid JSON');
  }
  if (typeof meta !== 'object' || meta === null || typeof meta.id !== 'string') throw corrupt(object, 'metadata lacks the backup id');
  meta.tags = Array.isArray(meta.tags) ? meta.tags.map(String) : [];
  meta.parent = typeof meta.parent === 'string' ? meta.parent : null;
  meta.bitmap = typeof meta.bitmap === 'string' ? meta.bitmap : null;
  meta.stats ??= { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksDirty: 0, durationMs: 0 };
  return meta;
}

function manifestOf(head: Buffer, flags: number, size: number, chunkSize: number, meta: ManifestMeta, ids: ChunkList, root: Buffer, object: string): Manifest {
  const token = head.subarray(64, 80);
  return {
    full: (flags & FLAG_FULL) !== 0,
    disk: bytesToUuid(head.subarray(16, 32)),
    timeMs: safeU64(head, 32, object, 'time'),
    size,
    chunkSize,
    bitmapToken: token.equals(Buffer.alloc(16)) ? null : token.toString('hex'),
    meta,
    ids,
    root: Buffer.from(root),
  };
}

/** A manifest without its chunk list: what its header and metadata say. */
export type ManifestInfo = Omit<Manifest, 'ids' | 'root'>;

/** Reads a manifest's header and metadata only (checked as far as they go; the checksum needs the whole). */
export async function readManifestInfoFrom(size: number, read: (offset: number, length: number) => Promise<Buffer>, object: string): Promise<ManifestInfo> {
  if (size < MANIFEST_HEADER + MANIFEST_TRAILER) throw corrupt(object, 'not a manifest (bad magic or truncated)');
  const head = await read(0, MANIFEST_HEADER);
  const f = manifestFields(head, object);
  if (size < MANIFEST_HEADER + f.metaLen + MANIFEST_TRAILER) throw corrupt(object, 'length does not match its header (truncated?)');
  const meta = manifestMeta(await read(MANIFEST_HEADER, f.metaLen), object);
  const { ids: _ids, root: _root, ...info } = manifestOf(head, f.flags, f.size, f.chunkSize, meta, new ChunkList(0), Buffer.alloc(16), object);
  return info;
}

/**
 * Decodes a manifest of `size` bytes read through `read` (ranges in order, about 8 MiB at a time), so a
 * large one never sits whole in memory: its segments go into a list kept by `store`. The checksum and the
 * Merkle root are checked at the end, as decodeManifest checks them, and with the same messages; forms other
 * than IDS_SEGMENTED are read whole.
 */
export async function readManifestFrom(size: number, read: (offset: number, length: number) => Promise<Buffer>, object: string, storeFor: StoreFor = noStore): Promise<Manifest> {
  if (size < MANIFEST_HEADER + MANIFEST_TRAILER) throw corrupt(object, 'not a manifest (bad magic or truncated)');
  const head = await read(0, MANIFEST_HEADER);
  const f = manifestFields(head, object);
  if (!(f.flags & FLAG_IDS_SEGMENTED)) return decodeManifest(Buffer.concat([head, await read(MANIFEST_HEADER, size - MANIFEST_HEADER)]), object, storeFor);
  const t = size - MANIFEST_TRAILER;
  if (size < MANIFEST_HEADER + f.metaLen + 8 + MANIFEST_TRAILER) throw corrupt(object, 'length does not match its header (truncated?)');
  const metaAndHeader = await read(MANIFEST_HEADER, f.metaLen + 8);
  let crc = crc32(metaAndHeader, crc32(head));
  const meta = manifestMeta(metaAndHeader.subarray(0, f.metaLen), object);
  const ids = new ChunkList(f.chunks, storeFor(f.chunks));
  const n = segmentedHeader(metaAndHeader.subarray(f.metaLen), ids, f.chunks, object);
  let pos = MANIFEST_HEADER + f.metaLen + 8;
  if (t - pos < 8 * n) throw corrupt(object, `the chunk-id section's table of ${n} segments is truncated`);
  const table = await read(pos, 8 * n);
  crc = crc32(table, crc);
  pos += 8 * n;
  const entries = Array.from({ length: n }, (_, i) => segmentEntry(table, 8 * i, ids, i, n, object));
  // Payloads in reads of about 8 MiB, each holding whole segments.
  for (let i = 0; i < n;) {
    let j = i,
      len = 0;
    while (j < n && (j === i || len + entries[j]!.len <= 8 * 1024 * 1024)) len += entries[j++]!.len;
    if (len > t - pos) {
      let at = pos;
      for (let q = i; q < j; q++) {
        if (entries[q]!.len > t - at)
          throw corrupt(
            object,
            `chunk-list segment ${q} of ${n}: ${entries[q]!.len} stored bytes at section offset ${at - MANIFEST_HEADER - f.metaLen} run past the end of the section (${t - MANIFEST_HEADER - f.metaLen} bytes; truncated?)`,
          );
        at += entries[q]!.len;
      }
    }
    const buf = len > 0 ? await read(pos, len) : Buffer.alloc(0);
    crc = crc32(buf, crc);
    let at = 0;
    for (; i < j; i++) {
      const { enc, len: l } = entries[i]!;
      if (enc !== SEG_ZERO) putPayload(ids, i, n, enc, buf.subarray(at, at + l), object);
      at += l;
    }
    pos += len;
  }
  if (pos !== t) throw corrupt(object, `the chunk-id section has ${t - pos} bytes after its last segment`);
  const trailer = await read(t, MANIFEST_TRAILER);
  if (!trailer.subarray(28).equals(MANIFEST_END)) throw corrupt(object, 'trailer magic missing (truncated?)');
  if (trailer.readUInt32LE(24) !== crc32(trailer.subarray(0, 24), crc)) throw corrupt(object, 'checksum mismatch');
  if (!ids.merkleRoot().equals(trailer.subarray(0, 16))) throw corrupt(object, 'Merkle root does not match the chunk list');
  return manifestOf(head, f.flags, f.size, f.chunkSize, meta, ids, trailer.subarray(0, 16), object);
}

export function decodeManifest(b: Buffer, object: string, storeFor: StoreFor = noStore): Manifest {
  if (b.length < MANIFEST_HEADER + MANIFEST_TRAILER || !b.subarray(0, 8).equals(MANIFEST_MAGIC)) throw corrupt(object, 'not a manifest (bad magic or truncated)');
  if (b.readUInt32LE(8) !== MANIFEST_VERSION) throw unsupported(object, `manifest version ${b.readUInt32LE(8)} is not supported`);
  const t = b.length - MANIFEST_TRAILER;
  if (!b.subarray(t + 28).equals(MANIFEST_END)) throw corrupt(object, 'trailer magic missing (truncated?)');
  if (b.readUInt32LE(t + 24) !== crc32(b.subarray(0, t + 24))) throw corrupt(object, 'checksum mismatch');
  const { flags, size, chunkSize, metaLen, chunks } = manifestFields(b, object);
  const plain = (flags & (FLAG_IDS_LZ4 | FLAG_IDS_SEGMENTED)) === 0;
  if (b.length < MANIFEST_HEADER + metaLen + MANIFEST_TRAILER || (plain && b.length !== MANIFEST_HEADER + metaLen + chunks * ID_BYTES + MANIFEST_TRAILER))
    throw corrupt(object, 'length does not match its header (truncated?)');
  const meta = manifestMeta(b.subarray(MANIFEST_HEADER, MANIFEST_HEADER + metaLen), object);
  const section = b.subarray(MANIFEST_HEADER + metaLen, t);
  let ids: ChunkList;
  if (flags & FLAG_IDS_SEGMENTED) ids = decodeSegmented(section, chunks, object, storeFor);
  else if (flags & FLAG_IDS_LZ4) {
    if (chunks * ID_BYTES > MAX_LZ4_INPUT) throw corrupt(object, `${chunks} chunk ids are too many for a compressed list`);
    const flat = Buffer.allocUnsafe(chunks * ID_BYTES);
    if (section.length < 4 || section.readUInt32LE(0) !== flat.length || decompressInto(section, flat, 0) !== flat.length) {
      throw corrupt(object, 'the compressed chunk list does not decode to its chunk count');
    }
    ids = ChunkList.fromBuffer(flat, storeFor(chunks));
  } else ids = ChunkList.fromBuffer(section, storeFor(chunks));
  if (!ids.merkleRoot().equals(b.subarray(t, t + 16))) throw corrupt(object, 'Merkle root does not match the chunk list');
  return manifestOf(b, flags, size, chunkSize, meta, ids, b.subarray(t, t + 16), object);
}

/** §7.1 backup id for a start time. */
export function backupId(timeMs: number, rand = randomBytes(4).toString('hex')): string {
  const iso = isoUtc(timeMs); // 2026-11-26T12:54:22.123Z
  return iso.replace(/[-:]/g, '').replace('.', '') + '-' + rand;
}
