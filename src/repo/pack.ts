/**
 * Pack objects (formats/repository.md §5): the header, the footer (entries and tail), reading a pack's
 * footer back, and PackWriter, which groups blobs into packs and uploads them. The blobs themselves
 * (§5.2) are made and checked by compress/.
 */
import { crc32 } from 'node:zlib';
import { KscError } from '../errors.js';
import { ID_BYTES } from '../hash/chunkid.js';
import type { ObjectStore } from '../objstore/types.js';
import { FOOTER_ENTRY, FOOTER_TAIL, MIN_BLOB, PACK_END_MAGIC, PACK_HEADER, PACK_MAGIC, PACK_VERSION, PACK_VERSION_ENCRYPTED, packKey, randomHexId } from './constants.js';
import { AuthError, KIND_PACK_FOOTER, SEAL_OVERHEAD, open as openSealed, seal } from '../crypto/aead.js';
import { corrupt, safeU64, unsupported } from './corrupt.js';
import { ChunkIndex } from './chunkindex.js';
import type { IndexEntry } from './index-object.js';
import type { Repository } from './repository.js';

export interface PackEntry {
  id: Buffer;
  offset: number;
  length: number;
  rawLength: number;
}

export function packHeader(encrypted = false): Buffer {
  const h = Buffer.alloc(PACK_HEADER);
  PACK_MAGIC.copy(h, 0);
  h.writeUInt32LE(encrypted ? PACK_VERSION_ENCRYPTED : PACK_VERSION, 8);
  return h;
}

/** Checks a pack's 16-byte header (§5.1, §13.4): magic, version 1 (2 in an encrypted repository), reserved zero. */
export function assertPackHeader(h: Buffer, object: string, encrypted = false): void {
  if (h.length !== PACK_HEADER || !h.subarray(0, 8).equals(PACK_MAGIC)) throw corrupt(object, 'pack header magic missing (not a pack, or damaged)');
  const v = h.readUInt32LE(8);
  if (v === PACK_VERSION_ENCRYPTED && !encrypted) throw unsupported(object, 'pack version 2 (encrypted) in a repository read without encryption');
  if (v === PACK_VERSION && encrypted) throw corrupt(object, 'pack version 1 (not encrypted) in an encrypted repository');
  if (v !== (encrypted ? PACK_VERSION_ENCRYPTED : PACK_VERSION)) throw unsupported(object, `pack version ${v} is not supported`);
  if (h.readUInt32LE(12) !== 0) throw corrupt(object, 'pack header reserved field is not zero');
}

/**
 * The footer (entries and tail) of a pack whose blobs end at `entriesOffset`; with `sealWith`, the entries
 * sealed (§13.4) under the data key for the pack's object key.
 */
export function packFooter(entries: PackEntry[], entriesOffset: number, sealWith?: { dataKey: Buffer; key: string }): Buffer {
  if (sealWith) {
    const plain = packFooter(entries, entriesOffset).subarray(0, entries.length * FOOTER_ENTRY);
    const sealed = seal(sealWith.dataKey, KIND_PACK_FOOTER, sealWith.key, plain);
    const tail = Buffer.alloc(FOOTER_TAIL);
    tail.writeUInt32LE(entries.length, 0);
    tail.writeUInt32LE(crc32(sealed), 4);
    tail.writeBigUInt64LE(BigInt(entriesOffset), 8);
    tail.writeUInt32LE(crc32(tail.subarray(0, 20)), 20);
    PACK_END_MAGIC.copy(tail, 24);
    return Buffer.concat([sealed, tail]);
  }
  const f = Buffer.alloc(entries.length * FOOTER_ENTRY + FOOTER_TAIL);
  entries.forEach((e, i) => {
    const o = i * FOOTER_ENTRY;
    e.id.copy(f, o, 0, ID_BYTES);
    f.writeBigUInt64LE(BigInt(e.offset), o + 16);
    f.writeUInt32LE(e.length, o + 24);
    f.writeUInt32LE(e.rawLength, o + 28);
  });
  const t = entries.length * FOOTER_ENTRY;
  f.writeUInt32LE(entries.length, t);
  f.writeUInt32LE(crc32(f.subarray(0, t)), t + 4);
  f.writeBigUInt64LE(BigInt(entriesOffset), t + 8);
  f.writeUInt32LE(crc32(f.subarray(t, t + 20)), t + 20);
  PACK_END_MAGIC.copy(f, t + 24);
  return f;
}

/** Decodes the 32-byte tail of a pack of `packSize` bytes: where the entries are and how many. */
export function decodePackTail(tail: Buffer, packSize: number, object: string, sealed = false): { count: number; entriesOffset: number; entriesCrc: number } {
  if (tail.length !== FOOTER_TAIL) throw corrupt(object, `footer tail is ${tail.length} bytes, not 32 (truncated pack?)`);
  if (!tail.subarray(24, 32).equals(PACK_END_MAGIC)) throw corrupt(object, 'footer magic missing (truncated or not a pack)');
  if (tail.readUInt32LE(20) !== crc32(tail.subarray(0, 20))) throw corrupt(object, 'footer tail checksum mismatch');
  const count = tail.readUInt32LE(0);
  const entriesOffset = safeU64(tail, 8, object, 'footer offset');
  if (entriesOffset < PACK_HEADER || entriesOffset + count * FOOTER_ENTRY + (sealed ? SEAL_OVERHEAD : 0) + FOOTER_TAIL !== packSize) {
    throw corrupt(object, `footer says ${count} entries at ${entriesOffset}, which does not fit a ${packSize}-byte pack`);
  }
  return { count, entriesOffset, entriesCrc: tail.readUInt32LE(4) };
}

export function decodePackEntries(buf: Buffer, count: number, crc: number, entriesOffset: number, object: string): PackEntry[] {
  if (buf.length !== count * FOOTER_ENTRY) throw corrupt(object, 'footer entries truncated');
  if (crc32(buf) !== crc) throw corrupt(object, 'footer entries checksum mismatch');
  const out: PackEntry[] = [];
  for (let i = 0; i < count; i++) {
    const o = i * FOOTER_ENTRY;
    const offset = safeU64(buf, o + 16, object, 'blob offset');
    const length = buf.readUInt32LE(o + 24);
    if (offset < PACK_HEADER || offset + length > entriesOffset || length < MIN_BLOB) throw corrupt(object, `footer entry ${i} (offset ${offset}, length ${length}) is outside the blobs`);
    out.push({ id: Buffer.from(buf.subarray(o, o + 16)), offset, length, rawLength: buf.readUInt32LE(o + 28) });
  }
  return out;
}

/** Reads and checks the footer (§5.3) of pack `pack` in `store` (`size` bytes: else a stat): the chunks it holds. */
export async function readPackFooter(store: ObjectStore, pack: string, size?: number, dataKey?: Buffer): Promise<PackEntry[]> {
  const key = packKey(pack);
  const name = `${store.name}/${key}`;
  const total = size ?? (await store.stat(key))?.size;
  if (total === undefined) throw new KscError('KSC_E_NOT_FOUND', `repository object ${name} is missing`);
  if (total < PACK_HEADER + FOOTER_TAIL) throw corrupt(name, `${total} bytes is too short for a pack (truncated?)`);
  const tail = decodePackTail(await store.getRange(key, total - FOOTER_TAIL, FOOTER_TAIL), total, name, dataKey !== undefined);
  if (!dataKey) {
    const entries = await store.getRange(key, tail.entriesOffset, tail.count * FOOTER_ENTRY);
    return decodePackEntries(entries, tail.count, tail.entriesCrc, tail.entriesOffset, name);
  }
  // §13.4: the sealed entries are authenticated before they are decoded.
  const sealed = await store.getRange(key, tail.entriesOffset, tail.count * FOOTER_ENTRY + SEAL_OVERHEAD);
  if (crc32(sealed) !== tail.entriesCrc) throw corrupt(name, 'footer entries checksum mismatch');
  let plain: Buffer;
  try {
    plain = openSealed(dataKey, KIND_PACK_FOOTER, key, sealed);
  } catch (e) {
    if (e instanceof AuthError) throw corrupt(name, `footer ${e.message}`);
    throw e;
  }
  return decodePackEntries(plain, tail.count, crc32(plain), tail.entriesOffset, name);
}

/** The chunks of one pack, 32 bytes each. */
interface PackGroup {
  pack: string;
  ids: Buffer;
  offset: Float64Array;
  length: Uint32Array;
  rawLength: Uint32Array;
}

/** Index entries of `groups`, made as they are iterated (each iteration starts afresh). */
function entriesOf(groups: PackGroup[]): Iterable<IndexEntry> {
  return {
    *[Symbol.iterator](): Generator<IndexEntry> {
      for (const g of groups) {
        for (let i = 0; i < g.offset.length; i++) {
          yield { id: g.ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES), pack: g.pack, offset: g.offset[i]!, length: g.length[i]!, rawLength: g.rawLength[i]! };
        }
      }
    },
  };
}

/**
 * Groups blobs into packs of about `packSize` bytes and uploads each when full (at most `uploads` in
 * flight, so memory stays bounded at (uploads + 1) × packSize). `entries` lists every chunk of every pack
 * whose upload completed (§9 rule 1: only these may go into an index object).
 */
export class PackWriter {
  private parts: Buffer[] = [];
  private pending: PackEntry[] = [];
  private bytes = 0;
  private inFlight = new Set<Promise<void>>();
  private error: unknown = null;
  /** The chunks of the uploaded packs, 32 bytes each (a full backup of a large disk writes millions). */
  private readonly written: PackGroup[] = [];
  /** The chunks of the packs sealed since the last flushIndex, uploaded or still in flight. */
  private sealed: PackGroup[] = [];
  private writtenCount = 0;
  readonly packsWritten: string[] = [];
  bytesUploaded = 0;
  /** Ids queued or stored by this writer (so one backup never stores a chunk twice), as a compact set. */
  private seen = new ChunkIndex({ locations: false });
  /** Index objects flushIndex wrote. */
  readonly indexObjects: string[] = [];

  constructor(
    readonly repo: Repository,
    private readonly maxUploads: number,
  ) {}

  has(id: Buffer | string): boolean {
    return this.seen.has(id);
  }

  /**
   * Every chunk of every pack whose upload completed. Each iteration starts afresh and makes its entries
   * as it goes (nothing is held per entry but the 32 bytes above).
   */
  get entries(): Iterable<IndexEntry> & { readonly count: number } {
    return { count: this.writtenCount, [Symbol.iterator]: () => entriesOf(this.written)[Symbol.iterator]() };
  }

  /**
   * Adds a blob: `blob`, then `tail` when given (a blob whose stored bytes are a view of the chunk as read:
   * PackedChunk.tail); resolves when there is room for more (back-pressure).
   */
  async add(id: Buffer, blob: Buffer, rawLength: number, tail?: Buffer): Promise<void> {
    if (this.error) throw this.error;
    if (this.seen.has(id)) return;
    this.seen.addAt(id, 0, '', 0, 0, 0);
    if (this.parts.length === 0) {
      this.parts.push(packHeader(this.repo.encrypted));
      this.bytes = PACK_HEADER;
    }
    const length = blob.length + (tail?.length ?? 0);
    this.pending.push({ id: Buffer.from(id), offset: this.bytes, length, rawLength });
    this.parts.push(blob); // a view into a worker's result buffer, kept until the pack is uploaded
    if (tail) this.parts.push(tail);
    this.bytes += length;
    if (this.bytes >= this.repo.config.packSize) await this.seal();
  }

  private async seal(): Promise<void> {
    if (this.pending.length === 0) return;
    const parts = this.parts;
    const entries = this.pending;
    const id = randomHexId();
    const footer = packFooter(entries, this.bytes, this.repo.keys ? { dataKey: this.repo.keys.data, key: packKey(id) } : undefined);
    parts.push(footer);
    const size = this.bytes + footer.length;
    this.parts = [];
    this.pending = [];
    this.bytes = 0;
    while (this.inFlight.size >= this.maxUploads) await Promise.race(this.inFlight);
    if (this.error) throw this.error;
    const n = entries.length;
    const g = { pack: id, ids: Buffer.allocUnsafe(n * ID_BYTES), offset: new Float64Array(n), length: new Uint32Array(n), rawLength: new Uint32Array(n) };
    entries.forEach((e, i) => {
      e.id.copy(g.ids, i * ID_BYTES, 0, ID_BYTES);
      g.offset[i] = e.offset;
      g.length[i] = e.length;
      g.rawLength[i] = e.rawLength;
    });
    this.sealed.push(g);
    const p = this.repo.store
      .put(packKey(id), parts)
      .then(
        () => {
          this.written.push(g);
          this.writtenCount += n;
          this.packsWritten.push(id);
          this.bytesUploaded += size;
        },
        (e) => {
          this.error ??= e;
        },
      )
      .finally(() => this.inFlight.delete(p));
    this.inFlight.add(p);
  }

  /** Seals the last pack and waits for every upload; throws the first upload error. */
  async finish(): Promise<void> {
    if (!this.error) await this.seal().catch((e) => (this.error ??= e));
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
    if (this.error) throw this.error;
  }

  /** Ids queued or stored since the last flushIndex (what `has` answers from). */
  get seenCount(): number {
    return this.seen.size;
  }

  /**
   * Seals the open pack and writes one index object naming the chunks of the packs sealed since the last
   * flush and `extra`; the object is made while the last uploads are in flight and gets its key only once
   * every one of them has completed (§9 rule 1), not at all when one failed (that error is thrown). Then
   * forgets them, `has` included: from here on the repository's index objects name them. Returns the
   * object's id (null when there was nothing to name).
   */
  async flushIndex(extra: IndexEntry[] = []): Promise<string | null> {
    if (!this.error) await this.seal().catch((e) => (this.error ??= e));
    const groups = this.sealed;
    this.sealed = [];
    const uploaded = this.finish();
    let id: string | null = null;
    if (groups.length + extra.length > 0) {
      const packs = entriesOf(groups);
      id = await this.repo.putIndex(
        {
          *[Symbol.iterator]() {
            yield* packs;
            yield* extra;
          },
        },
        uploaded,
      );
      this.indexObjects.push(id);
    } else await uploaded;
    this.written.length = 0;
    this.writtenCount = 0;
    this.seen = new ChunkIndex({ locations: false });
    return id;
  }

  /** Waits for uploads already started (used when abandoning: never leaves promises dangling). */
  async abandon(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
  }
}
