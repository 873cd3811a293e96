/**
 * NBD wire format (the subset in formats/nbd.md): constants and pure encode/decode functions. All
 * integers are big-endian. Nothing here touches a socket.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const CLIENT_FLAG_NO_ZEROES = 1 << 1;

/** Options. */
export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

/** Option reply types. */
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;

/** NBD_INFO_* types in NBD_REP_INFO replies and in GO/INFO requests. */
export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags. */
export const TF = {
  HAS_FLAGS: 0x1,
  READ_ONLY: 0x2,
  SEND_FLUSH: 0x4,
  SEND_FUA: 0x8,
  ROTATIONAL: 0x10,
  SEND_TRIM: 0x20,
  SEND_WRITE_ZEROES: 0x40,
  SEND_DF: 0x80,
  CAN_MULTI_CONN: 0x100,
  SEND_RESIZE: 0x200,
  SEND_CACHE: 0x400,
  SEND_FAST_ZERO: 0x800,
} as const;

/** Commands. */
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;

/** Command flags. */
export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

/** Structured reply chunk types and flags. */
export const CHUNK = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;
export const CHUNK_FLAG_DONE = 1;

/** Errors on the wire (Linux errno values, as the spec fixes them). */
export const ERR = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

/** base:allocation flags. */
export const STATE_HOLE = 1;
export const STATE_ZERO = 2;
/** qemu:dirty-bitmap:NAME flag. */
export const STATE_DIRTY = 1;

export const REQUEST_SIZE = 28;
export const OPTION_HEADER_SIZE = 16;
export const MAX_PAYLOAD = 32 * 1024 * 1024;

// ------------------------------------------------------------------ handshake

/** Server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags (18 bytes). */
export function encodeGreeting(flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(flags, 16);
  return b;
}

export interface OptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

/** Client option header: u64 IHAVEOPT, u32 option, u32 length (16 bytes). */
export function decodeOptionHeader(b: Buffer): OptionHeader {
  if (b.length < OPTION_HEADER_SIZE) throw new Error('option header too short');
  return { magic: b.readBigUInt64BE(0), option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export function encodeOptionHeader(option: number, length: number): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_SIZE);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(length, 12);
  return b;
}

/** Option reply: u64 magic, u32 option, u32 reply type, u32 length, data. */
export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

/** NBD_REP_INFO payload NBD_INFO_EXPORT: u16 type 0, u64 size, u16 transmission flags (12 bytes). */
export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(INFO.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

/** A big-endian u16 or u32 followed by UTF-8 texts (no lengths, no NULs). */
function numberThenText(bytes: 2 | 4, n: number, ...texts: string[]): Buffer {
  const head = Buffer.alloc(bytes);
  if (bytes === 2) head.writeUInt16BE(n, 0);
  else head.writeUInt32BE(n, 0);
  return Buffer.concat([head, ...texts.map((t) => Buffer.from(t, 'utf8'))]);
}

/** NBD_INFO_NAME (1) or NBD_INFO_DESCRIPTION (2): u16 type, UTF-8 text (no length, no NUL). */
export function encodeInfoText(type: number, text: string): Buffer {
  return numberThenText(2, type, text);
}

/** NBD_INFO_BLOCK_SIZE: u16 type 3, u32 minimum, u32 preferred, u32 maximum payload (14 bytes). */
export function encodeInfoBlockSize(min: number, preferred: number, maxPayload: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maxPayload, 10);
  return b;
}

/** NBD_REP_SERVER payload: u32 name length, name, description. */
export function encodeRepServer(name: string, description = ''): Buffer {
  return numberThenText(4, Buffer.byteLength(name, 'utf8'), name, description);
}

/** NBD_REP_META_CONTEXT payload: u32 context id, name. */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  return numberThenText(4, id, name);
}

/** Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, 124 zero bytes unless NO_ZEROES was negotiated. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

/** A little cursor for option payloads; every read throws a RangeError when the data runs out. */
export class OptionData {
  private pos = 0;
  constructor(private readonly b: Buffer) {}
  u16(): number {
    this.need(2);
    const v = this.b.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.b.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  bytes(n: number): Buffer {
    this.need(n);
    const v = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
  /** u32 length then that many bytes of UTF-8. */
  string(max = 4096): string {
    const n = this.u32();
    if (n > max) throw new RangeError(`string of ${n} bytes is too long`);
    return this.bytes(n).toString('utf8');
  }
  get remaining(): number {
    return this.b.length - this.pos;
  }
  private need(n: number): void {
    if (this.pos + n > this.b.length) throw new RangeError('option data too short');
  }
}

/** GO/INFO data: u32 name length, name, u16 count, count × u16 info types. */
export function decodeGoData(data: Buffer): { name: string; infos: number[] } {
  const r = new OptionData(data);
  const name = r.string();
  const n = r.u16();
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(r.u16());
  if (r.remaining !== 0) throw new RangeError('trailing bytes in GO/INFO data');
  return { name, infos };
}

/** LIST_/SET_META_CONTEXT data: u32 name length, name, u32 count, count × (u32 length, query). */
export function decodeMetaContextData(data: Buffer): { name: string; queries: string[] } {
  const r = new OptionData(data);
  const name = r.string();
  const n = r.u32();
  if (n > 1024) throw new RangeError('too many meta context queries');
  const queries: string[] = [];
  for (let i = 0; i < n; i++) queries.push(r.string());
  if (r.remaining !== 0) throw new RangeError('trailing bytes in meta context data');
  return { name, queries };
}

// ------------------------------------------------------------------ transmission

export interface Request {
  magic: number;
  flags: number;
  type: number;
  cookie: bigint;
  /** As a bigint: a hostile client may send any u64. */
  offset: bigint;
  length: number;
}

/** Request header: u32 magic, u16 command flags, u16 type, u64 cookie, u64 offset, u32 length (28 bytes). */
export function decodeRequest(b: Buffer): Request {
  if (b.length < REQUEST_SIZE) throw new Error('request header too short');
  return {
    magic: b.readUInt32BE(0),
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8),
    offset: b.readBigUInt64BE(16),
    length: b.readUInt32BE(24),
  };
}

export function encodeRequest(r: Omit<Request, 'magic'> & { magic?: number }): Buffer {
  const b = Buffer.alloc(REQUEST_SIZE);
  b.writeUInt32BE(r.magic ?? REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

/** Simple reply header: u32 magic, u32 error, u64 cookie (16 bytes); read data follows on success. */
export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

/**
 * A simple reply of success written at b[at…] (16 bytes), the cookie as its two 32-bit halves: by hand, as
 * numbers (Node's readUInt32BE and the like are shared by every caller and take V8's generic lookups).
 */
export function putSimpleSuccess(b: Buffer, at: number, cookieHi: number, cookieLo: number): void {
  put32(b, at, SIMPLE_REPLY_MAGIC);
  put32(b, at + 4, 0);
  put32(b, at + 8, cookieHi);
  put32(b, at + 12, cookieLo);
}

function put32(b: Buffer, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

/** Structured reply chunk header: u32 magic, u16 flags, u16 type, u64 cookie, u32 payload length (20 bytes). */
export function encodeChunkHeader(flags: number, type: number, cookie: bigint, length: number): Buffer {
  const b = Buffer.alloc(20);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** OFFSET_DATA chunk header plus its u64 offset (28 bytes); the `dataLength` bytes of data follow. */
export function encodeOffsetDataHeader(cookie: bigint, offset: number, dataLength: number, done: boolean): Buffer {
  const h = encodeChunkHeader(done ? CHUNK_FLAG_DONE : 0, CHUNK.OFFSET_DATA, cookie, 8 + dataLength);
  const b = Buffer.alloc(28);
  h.copy(b, 0);
  b.writeBigUInt64BE(BigInt(offset), 20);
  return b;
}

/** OFFSET_HOLE chunk: header, u64 offset, u32 hole size (32 bytes). */
export function encodeOffsetHole(cookie: bigint, offset: number, length: number, done: boolean): Buffer {
  const b = Buffer.alloc(32);
  encodeChunkHeader(done ? CHUNK_FLAG_DONE : 0, CHUNK.OFFSET_HOLE, cookie, 12).copy(b, 0);
  b.writeBigUInt64BE(BigInt(offset), 20);
  b.writeUInt32BE(length, 28);
  return b;
}

/** NONE chunk (only with DONE): ends a structured reply that carried no final chunk. */
export function encodeNoneChunk(cookie: bigint): Buffer {
  return encodeChunkHeader(CHUNK_FLAG_DONE, CHUNK.NONE, cookie, 0);
}

/** ERROR chunk: header, u32 error, u16 message length, message. */
export function encodeErrorChunk(cookie: bigint, error: number, message: string, done = true): Buffer {
  const m = Buffer.from(message, 'utf8').subarray(0, 4096);
  const b = Buffer.alloc(20 + 6 + m.length);
  encodeChunkHeader(done ? CHUNK_FLAG_DONE : 0, CHUNK.ERROR, cookie, 6 + m.length).copy(b, 0);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(m.length, 24);
  m.copy(b, 26);
  return b;
}

export interface StatusExtent {
  length: number;
  flags: number;
}

/** BLOCK_STATUS chunk: header, u32 context id, n × (u32 length, u32 flags). */
export function encodeBlockStatusChunk(cookie: bigint, contextId: number, extents: StatusExtent[], done: boolean): Buffer {
  const b = Buffer.alloc(20 + 4 + 8 * extents.length);
  encodeChunkHeader(done ? CHUNK_FLAG_DONE : 0, CHUNK.BLOCK_STATUS, cookie, 4 + 8 * extents.length).copy(b, 0);
  b.writeUInt32BE(contextId, 20);
  extents.forEach((e, i) => {
    b.writeUInt32BE(e.length, 24 + 8 * i);
    b.writeUInt32BE(e.flags >>> 0, 28 + 8 * i);
  });
  return b;
}
