/**
 * Small READs answered in the turn their header is read (formats/nbd.md §2, "Small READs at once"): the fields
 * read as numbers (no Request, no BigInt), the range's host spans asked of the device (capabilities.ts
 * HostSpans, valid until the event loop turns), the data read from the page cache (preadv2 RWF_NOWAIT, the
 * addon's readCachedAt) straight into its place in the connection's batch of replies, behind its header.
 * No promise, no buffer of its own, one socket write per turn's replies. Whatever cannot be answered so (not
 * all of it cached, a span the device cannot name, data and holes mixed in a structured reply, the socket
 * not taking replies now) goes the general way (Transmission.handle) with the same admission.
 */
import { hostSpansOf, type HostSpans } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import type { NativeOps } from '../io/native.js';
import type { SessionState } from './state.js';
import type { Link } from './types.js';
import { CHUNK, CHUNK_FLAG_DONE, CMD, CMD_FLAG, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, type Request } from './wire.js';

/** READs up to this long are tried at once (larger ones: the general path, zero-copy from 64 KiB). */
export const FAST_READ_MAX = 32 * 1024;

/** READs of this process answered at once (for tests and bench). */
export const fastReadStats = { replies: 0 };

type ReadAt = NonNullable<NativeOps['readCachedAt']>;

/** A READ's fields, checked as validateRequest would let them through. */
export class FastRead {
  constructor(
    readonly flags: number,
    readonly cookieHi: number,
    readonly cookieLo: number,
    readonly offset: number,
    readonly length: number,
  ) {}

  /** The request as decodeRequest gives it (for the general path). */
  request(): Request {
    const cookie = (BigInt(this.cookieHi) << 32n) | BigInt(this.cookieLo);
    return { magic: REQUEST_MAGIC, flags: this.flags, type: CMD.READ, cookie, offset: BigInt(this.offset), length: this.length };
  }
}

export class FastReads {
  private readonly spans: HostSpans;
  private readonly allowed: number;
  /** Found unsupported (the file system has no RWF_NOWAIT): every READ goes the general way. */
  off = false;

  private constructor(
    private readonly dev: BlockDevice,
    spans: HostSpans,
    private readonly readAt: ReadAt,
    private readonly structured: boolean,
  ) {
    this.spans = spans;
    this.allowed = CMD_FLAG.FUA | (structured ? CMD_FLAG.DF : 0);
  }

  /** Small READs at once for this connection, or null (no addon, no host spans, a link without a batch). */
  static of(dev: BlockDevice, ops: NativeOps | null, state: Readonly<SessionState>, link: Link): FastReads | null {
    const spans = hostSpansOf(dev);
    const readAt = ops?.readCachedAt;
    if (!spans || !readAt || !link.replySpace || !link.commitReply) return null;
    return new FastReads(dev, spans, readAt, state.structuredReplies);
  }

  /** The READ header at h[at…] when this path may take it (the checks of validateRequest), else null. */
  take(h: Buffer, at: number, length: number): FastRead | null {
    if (u16(h, at + 6) !== CMD.READ || u32(h, at) !== REQUEST_MAGIC || length === 0 || length > FAST_READ_MAX) return null;
    const flags = u16(h, at + 4);
    if ((flags & ~this.allowed) !== 0) return null;
    const hi = u32(h, at + 16);
    const offset = hi * 0x1_0000_0000 + u32(h, at + 20);
    if (hi >= 0x20_0000 || offset + length > this.dev.size) return null;
    return new FastRead(flags, u32(h, at + 8), u32(h, at + 12), offset, length);
  }

  /**
   * Answers `r` now: true once its reply is in the batch (`sent` runs when the socket has taken it); false,
   * nothing queued and nothing called, when it must go the general way.
   */
  run(link: Link, r: FastRead, sent: () => void): boolean {
    const spans = this.spans.hostSpans(r.offset, r.length);
    if (!spans || spans.length === 0) return false;
    let data = 0;
    for (const s of spans) if (s.fd >= 0) data++;
    const structured = this.structured;
    // A structured reply without DF answers holes as OFFSET_HOLE (formats/nbd.md §2): here only all of one kind.
    const holes = structured && (r.flags & CMD_FLAG.DF) === 0;
    if (holes && data === 0) {
      const b = link.replySpace!(32);
      if (!b) return false;
      const at = link.replyAt!;
      chunkHeader(b, at, CHUNK.OFFSET_HOLE, r, 12);
      putOffset(b, at + 20, r.offset);
      put32(b, at + 28, r.length);
      link.commitReply!(32, sent);
      fastReadStats.replies++;
      return true;
    }
    if (holes && data !== spans.length) return false;
    const hdr = structured ? 28 : 16;
    const b = link.replySpace!(hdr + r.length);
    if (!b) return false;
    const at = link.replyAt!;
    let to = at + hdr;
    try {
      for (const s of spans) {
        if (s.fd < 0) b.fill(0, to, to + s.length);
        else {
          const n = this.readAt(s.fd, b, to, s.length, s.position);
          if (n === -2) this.off = true; // RWF_NOWAIT unsupported here: never again on this connection
          if (n !== s.length) return false;
        }
        to += s.length;
      }
    } catch {
      return false; // the general path reads again and answers the error
    }
    if (structured) {
      chunkHeader(b, at, CHUNK.OFFSET_DATA, r, 8 + r.length);
      putOffset(b, at + 20, r.offset);
    } else {
      put32(b, at, SIMPLE_REPLY_MAGIC);
      put32(b, at + 4, 0);
      put32(b, at + 8, r.cookieHi);
      put32(b, at + 12, r.cookieLo);
    }
    link.commitReply!(hdr + r.length, sent);
    fastReadStats.replies++;
    return true;
  }
}

/** A structured reply chunk's header (DONE: the reply's only chunk) at b[at…]. */
function chunkHeader(b: Buffer, at: number, type: number, r: FastRead, length: number): void {
  put32(b, at, STRUCTURED_REPLY_MAGIC);
  b[at + 4] = 0;
  b[at + 5] = CHUNK_FLAG_DONE;
  b[at + 6] = type >>> 8;
  b[at + 7] = type & 0xff;
  put32(b, at + 8, r.cookieHi);
  put32(b, at + 12, r.cookieLo);
  put32(b, at + 16, length);
}

function putOffset(b: Buffer, at: number, v: number): void {
  put32(b, at, Math.floor(v / 0x1_0000_0000));
  put32(b, at + 4, v >>> 0);
}

// Fields by hand, as in transmission.ts: Node's shared readUInt32BE and the like take V8's generic lookups.
function put32(b: Buffer, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

function u16(b: Buffer, at: number): number {
  return (b[at]! << 8) | b[at + 1]!;
}

function u32(b: Buffer, at: number): number {
  return b[at]! * 0x100_0000 + ((b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!);
}
