/**
 * The client side of the fixed-newstyle handshake (formats/nbd.md §1, proto.md): greeting, client flags,
 * STRUCTURED_REPLY (when asked for), LIST_META_CONTEXT / SET_META_CONTEXT, then GO. Every length the
 * server sends is checked before anything is allocated for it; a server that breaks the protocol gets a
 * KscError (KSC_E_IO) naming what it sent, and the caller closes the socket.
 */
import { KscError } from '../errors.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, NBDMAGIC, OPT, OPT_REPLY_MAGIC, REP, encodeOptionHeader } from './wire.js';

/** Bytes a server may send in one option reply before we call it hostile. */
const MAX_OPTION_REPLY = 64 * 1024;

/** Reads exactly n bytes from the connection (the caller's buffered reader). */
export type ReadExact = (n: number) => Promise<Buffer>;

export interface HandshakeRequest {
  exportName: string;
  /** Negotiate structured replies (needed for meta contexts). */
  structured: boolean;
  /** LIST_META_CONTEXT queries sent before GO; the names returned are collected. */
  listContexts: string[];
  /** Contexts selected with SET_META_CONTEXT before GO. */
  setContexts: string[];
  /** TLS: sends NBD_OPT_STARTTLS first and, once ACKed, runs this (the TLS handshake; read/send then go through TLS). */
  startTls?: () => Promise<void>;
}

export interface HandshakeResult {
  size: number;
  transmissionFlags: number;
  structured: boolean;
  /** Names the server returned to LIST_META_CONTEXT. */
  listed: string[];
  /** Names the server selected at SET_META_CONTEXT, by the id it gave them. */
  selected: Map<number, string>;
  /** The server's preferred and maximum block sizes (NBD_INFO_BLOCK_SIZE), when it sent them. */
  preferredBlockSize: number | null;
  maxPayload: number | null;
}

function bad(what: string, detail: string): KscError {
  return new KscError('KSC_E_IO', `NBD server ${what}: ${detail}`);
}

function u32String(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  const h = Buffer.alloc(4);
  h.writeUInt32BE(b.length, 0);
  return Buffer.concat([h, b]);
}

/** u32 name length, name, u32 n, n × (u32 length, query). */
function metaContextData(name: string, queries: string[]): Buffer {
  const n = Buffer.alloc(4);
  n.writeUInt32BE(queries.length, 0);
  return Buffer.concat([u32String(name), n, ...queries.map(u32String)]);
}

/** u32 name length, name, u16 n, n × u16 info: asks for BLOCK_SIZE. */
function goData(name: string): Buffer {
  const tail = Buffer.alloc(4);
  tail.writeUInt16BE(1, 0);
  tail.writeUInt16BE(INFO.BLOCK_SIZE, 2);
  return Buffer.concat([u32String(name), tail]);
}

interface OptionReply {
  type: number;
  data: Buffer;
}

class ClientNegotiation {
  constructor(
    private readonly read: ReadExact,
    private readonly send: (b: Buffer) => void,
    private readonly where: string,
  ) {}

  sendOption(option: number, data: Buffer): void {
    this.send(Buffer.concat([encodeOptionHeader(option, data.length), data]));
  }

  async reply(option: number): Promise<OptionReply> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw bad(this.where, `bad option reply magic 0x${h.readBigUInt64BE(0).toString(16)}`);
    const opt = h.readUInt32BE(8);
    if (opt !== option) throw bad(this.where, `answered option ${opt} while we asked ${option}`);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (len > MAX_OPTION_REPLY) throw bad(this.where, `option reply of ${len} bytes (limit ${MAX_OPTION_REPLY})`);
    return { type, data: len > 0 ? await this.read(len) : Buffer.alloc(0) };
  }

  /** Reads replies up to ACK; an error reply throws with the server's message. */
  async replies(option: number, what: string, each: (r: OptionReply) => void): Promise<void> {
    for (;;) {
      const r = await this.reply(option);
      if (r.type === REP.ACK) return;
      if (r.type >= 0x80000000) {
        const msg = r.data.toString('utf8');
        const code = r.type === REP.ERR_UNKNOWN ? 'KSC_E_NOT_FOUND' : r.type === REP.ERR_POLICY ? 'KSC_E_PERMISSION' : 'KSC_E_IO';
        throw new KscError(code, `NBD server ${this.where} refused ${what} (error 0x${r.type.toString(16)})${msg ? `: ${msg}` : ''}`);
      }
      each(r);
    }
  }
}

/** Greeting and client flags. */
async function greet(read: ReadExact, send: (b: Buffer) => void, where: string): Promise<void> {
  const g = await read(18);
  if (g.readBigUInt64BE(0) !== NBDMAGIC) throw bad(where, 'is not an NBD server (no NBDMAGIC)');
  if (g.readBigUInt64BE(8) !== IHAVEOPT) throw bad(where, 'speaks the old-style protocol, not fixed newstyle');
  const flags = g.readUInt16BE(16);
  if (!(flags & FLAG_FIXED_NEWSTYLE)) throw bad(where, 'does not speak fixed newstyle');
  const c = Buffer.alloc(4);
  c.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES ? CLIENT_FLAG_NO_ZEROES : 0), 0);
  send(c);
}

/** NBD_OPT_STARTTLS (formats/nbd.md §5): anything but ACK refuses (a plain server, or one without TLS). */
async function starttls(n: ClientNegotiation, where: string, startTls: () => Promise<void>): Promise<void> {
  n.sendOption(OPT.STARTTLS, Buffer.alloc(0));
  const r = await n.reply(OPT.STARTTLS);
  if (r.type !== REP.ACK) {
    const msg = r.type >= 0x80000000 ? r.data.toString('utf8') : '';
    throw new KscError('KSC_E_IO', `NBD server ${where} refused STARTTLS (reply 0x${r.type.toString(16)})${msg ? `: ${msg}` : ''}: it serves no TLS`);
  }
  if (r.data.length !== 0) throw bad(where, `answered STARTTLS with ${r.data.length} bytes of data`);
  await startTls();
}

/** Runs the handshake; resolves when the connection is in transmission. */
export async function clientHandshake(read: ReadExact, send: (b: Buffer) => void, where: string, req: HandshakeRequest): Promise<HandshakeResult> {
  await greet(read, send, where);
  const n = new ClientNegotiation(read, send, where);
  if (req.startTls) await starttls(n, where, req.startTls);
  let structured = false;
  const wantsContexts = req.listContexts.length > 0 || req.setContexts.length > 0;
  if (req.structured || wantsContexts) {
    n.sendOption(OPT.STRUCTURED_REPLY, Buffer.alloc(0));
    const r = await n.reply(OPT.STRUCTURED_REPLY);
    structured = r.type === REP.ACK;
  }
  const listed: string[] = [];
  const selected = new Map<number, string>();
  if (structured && req.listContexts.length > 0) {
    n.sendOption(OPT.LIST_META_CONTEXT, metaContextData(req.exportName, req.listContexts));
    await n.replies(OPT.LIST_META_CONTEXT, 'LIST_META_CONTEXT', (r) => {
      if (r.type === REP.META_CONTEXT && r.data.length >= 4) listed.push(r.data.subarray(4).toString('utf8'));
    });
  }
  if (structured && req.setContexts.length > 0) {
    n.sendOption(OPT.SET_META_CONTEXT, metaContextData(req.exportName, req.setContexts));
    await n.replies(OPT.SET_META_CONTEXT, 'SET_META_CONTEXT', (r) => {
      if (r.type === REP.META_CONTEXT && r.data.length >= 4) selected.set(r.data.readUInt32BE(0), r.data.subarray(4).toString('utf8'));
    });
  }
  n.sendOption(OPT.GO, goData(req.exportName));
  const res: HandshakeResult = { size: -1, transmissionFlags: 0, structured, listed, selected, preferredBlockSize: null, maxPayload: null };
  await n.replies(OPT.GO, `export "${req.exportName}"`, (r) => {
    if (r.type !== REP.INFO || r.data.length < 2) return;
    const t = r.data.readUInt16BE(0);
    if (t === INFO.EXPORT && r.data.length >= 12) {
      const size = r.data.readBigUInt64BE(2);
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(where, `export size ${size} is above 2^53`);
      res.size = Number(size);
      res.transmissionFlags = r.data.readUInt16BE(10);
    } else if (t === INFO.BLOCK_SIZE && r.data.length >= 14) {
      res.preferredBlockSize = r.data.readUInt32BE(6);
      res.maxPayload = r.data.readUInt32BE(10);
    }
  });
  if (res.size < 0) throw bad(where, `entered transmission for export "${req.exportName}" without telling its size`);
  return res;
}
